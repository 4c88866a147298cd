import numpy as np
import pytest

from diffmem.metrics import calibrate_threshold, quantile_threshold, roc_auc, roc_curve, tpr_at_fpr


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


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_roc_curve_hand_computed():
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    # Tied scores form one point.
    fpr, tpr, thr = roc_curve([1.0, 1.0, 0.0], [1, 0, 0])
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1, 1])


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


def test_thresholds():
    assert calibrate_threshold([1, 2, 3, 4], m=3.0) == pytest.approx(2.5 + 3 * np.sqrt(5 / 3))
    assert calibrate_threshold([1, 2, 3, 4], m=0.0) == pytest.approx(2.5)
    assert quantile_threshold(np.arange(101), 0.01) == pytest.approx(99.0)
    values = np.random.default_rng(1).normal(size=10_000)
    assert np.mean(values > quantile_threshold(values, 0.05)) == pytest.approx(0.05, abs=1e-3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: roc_auc([0.1, 0.2], [1, 1]),
        lambda: roc_auc([0.1, 0.2, 0.3], [1, 0]),
        lambda: roc_auc([np.nan, 0.2], [1, 0]),
        lambda: roc_auc([0.1, 0.2], [2, 0]),
        lambda: tpr_at_fpr([0.1, 0.2], [1, 0], fpr=1.5),
        lambda: calibrate_threshold([1.0]),
        lambda: quantile_threshold([1.0, 2.0], rate=-0.1),
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call()
