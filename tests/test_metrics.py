"""Detection metrics and thresholds: AUC against an independent statistic, everything else against hand counts."""

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from diffmem.metrics import (
    quantile_threshold,
    roc_auc,
    roc_curve,
    threshold_at_false_flag_rate,
    threshold_mean_std,
    tpr_at_fpr,
)


def test_auc_perfect_reversed_and_ties():
    labels = [0, 0, 0, 1, 1]
    assert roc_auc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0
    assert roc_auc([0.5] * 5, labels) == 0.5


def test_auc_hand_computed():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered correctly.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie between classes counts one half: (0.5 + 1) / 2.
    assert roc_auc([1.0, 1.0, 0.0], [True, False, False]) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [3, 5, 1000])  # few levels: many ties within and between the classes
def test_auc_is_the_mann_whitney_u_statistic(seed, levels):
    """AUC = U / (n_pos * n_neg), with U the Mann-Whitney statistic of the positives (ties count one half)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 80))
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    labels[:2] = [True, False]  # both classes present
    scores = (rng.integers(0, levels, size=n) + labels).astype(float)  # positives shifted up by one level
    pos, neg = scores[labels], scores[~labels]
    if levels <= 5:
        assert np.isin(pos, neg).any(), "the case must hold ties between the classes"
    u = mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic").statistic
    assert roc_auc(scores, labels) == pytest.approx(u / (pos.size * neg.size), abs=1e-12)
    assert roc_auc(-scores, labels) == pytest.approx(1.0 - u / (pos.size * neg.size), abs=1e-12)


def test_roc_curve_hand_computed():
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    # Tied scores form one point.
    fpr, tpr, thr = roc_curve([1.0, 1.0, 0.0], [1, 0, 0])
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1, 1])


def test_roc_curve_points_are_counts_at_each_threshold():
    # Every point is (negatives >= t) / n_neg, (positives >= t) / n_pos for its threshold t, counted by hand.
    scores = [3, 1, 2, 2, 5, 4, 2]
    labels = [1, 0, 1, 0, 1, 0, 0]
    fpr, tpr, thr = roc_curve(scores, labels)
    np.testing.assert_array_equal(thr, [np.inf, 5, 4, 3, 2, 1])
    # t = 5: {5+}; t = 4: {5+, 4-}; t = 3: {5+, 4-, 3+}; t = 2: adds 2+, 2-, 2-; t = 1: adds 1-.
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 4, 1 / 4, 3 / 4, 1])


def test_tpr_at_fpr_hand_case():
    negatives = np.arange(10.0)  # 0 .. 9
    positives = np.array([9.5, 8.5, 5.0])
    scores = np.r_[negatives, positives]
    labels = np.r_[np.zeros(10), np.ones(3)]
    # Threshold 9.5 catches one positive and no negative; 8.5 catches two positives and one negative (FPR 0.1).
    assert tpr_at_fpr(scores, labels, fpr=0.0) == pytest.approx(1 / 3)
    assert tpr_at_fpr(scores, labels, fpr=0.01) == pytest.approx(1 / 3)
    assert tpr_at_fpr(scores, labels, fpr=0.1) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, labels, fpr=1.0) == 1.0


def test_tpr_at_fpr_with_a_tie_across_the_classes():
    # 4 negatives, 2 positives; one positive ties with the top negative at 7: the threshold 7 flags both, so the
    # tied positive is reached only at FPR 1/4. Below that budget only the positive at 9 counts.
    scores = [9, 7, 7, 3, 2, 1]
    labels = [1, 1, 0, 0, 0, 0]
    assert tpr_at_fpr(scores, labels, fpr=0.0) == 0.5
    assert tpr_at_fpr(scores, labels, fpr=0.24) == 0.5
    assert tpr_at_fpr(scores, labels, fpr=0.25) == 1.0


def test_mean_std_threshold():
    # mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3
    assert threshold_mean_std([1, 2, 3, 4], m=3.0) == pytest.approx(2.5 + 3 * np.sqrt(5 / 3))
    assert threshold_mean_std([1, 2, 3, 4], m=0.0) == pytest.approx(2.5)
    assert threshold_mean_std([2.0, 2.0], m=5.0) == 2.0


def test_quantile_threshold():
    assert quantile_threshold(np.arange(101), 0.01) == pytest.approx(99.0)
    assert quantile_threshold([1.0, 2.0, 3.0], 0.0) == 3.0
    assert quantile_threshold([1.0, 2.0, 3.0], 1.0) == 1.0
    values = np.random.default_rng(1).normal(size=10_000)
    assert np.mean(values > quantile_threshold(values, 0.05)) == pytest.approx(0.05, abs=1e-3)


def test_false_flag_rate_threshold_hand_computed():
    strengths = [0.1, 0.9, 0.5, 0.3]
    t, rate = threshold_at_false_flag_rate(strengths, 0.0)  # k = 0: just above the largest
    assert t == np.nextafter(0.9, np.inf) and rate == 0.0
    t, rate = threshold_at_false_flag_rate(strengths, 0.25)  # k = floor(0.25 * 4) = 1: just above the 2nd largest
    assert t == np.nextafter(0.5, np.inf) and rate == 0.25
    t, rate = threshold_at_false_flag_rate(strengths, 0.3)  # floor(1.2) = 1 as well
    assert t == np.nextafter(0.5, np.inf) and rate == 0.25
    t, rate = threshold_at_false_flag_rate([0.9, 0.9, 0.5, 0.3], 0.25)  # a tie at the order statistic flags none
    assert t == np.nextafter(0.9, np.inf) and rate == 0.0
    t, rate = threshold_at_false_flag_rate([0.8, 0.1, 0.7, 0.6, 0.2, 0.3, 0.4, 0.5], 0.25)  # k = 2: above the 3rd
    assert t == np.nextafter(0.6, np.inf) and rate == 0.25
    t, rate = threshold_at_false_flag_rate(np.arange(100.0), 0.29)  # 0.29 * 100 is 28.999999999999996: k = 29
    assert t == np.nextafter(70.0, np.inf) and rate == 0.29
    t, rate = threshold_at_false_flag_rate([0.4, -np.inf, 0.2], 0.5)  # -inf strengths (no clique) are values too
    assert t == np.nextafter(0.2, np.inf) and rate == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="false_flag_rate"):
        threshold_at_false_flag_rate(strengths, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        threshold_at_false_flag_rate([], 0.1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: roc_auc([0.1, 0.2], [1, 1]),
        lambda: roc_auc([0.1, 0.2, 0.3], [1, 0]),
        lambda: roc_auc([np.nan, 0.2], [1, 0]),
        lambda: roc_auc([0.1, 0.2], [2, 0]),
        lambda: tpr_at_fpr([0.1, 0.2], [1, 0], fpr=1.5),
        lambda: tpr_at_fpr([0.1, 0.2], [1, 0], fpr=-0.1),
        lambda: threshold_mean_std([1.0]),
        lambda: threshold_mean_std([1.0, np.inf]),
        lambda: quantile_threshold([1.0, 2.0], rate=-0.1),
        lambda: quantile_threshold([], rate=0.1),
        lambda: threshold_at_false_flag_rate([0.1, np.nan], 0.1),
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call()
