"""Detection metrics and thresholds: pure functions of numpy arrays (higher score = more likely positive)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["roc_auc", "roc_curve", "tpr_at_fpr", "calibrate_threshold", "quantile_threshold"]


def _scores_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} and {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1")
        y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"labels need both classes, got {n_pos} positives and {y.size - n_pos} negatives")
    return s, y


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of the last member of each tie group
    mean_rank = upper - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); a tie between classes counts one half.

    Args:
        scores: One score per sample, higher = more likely positive.
        labels: 1/True for positives, 0/False for negatives.

    Returns:
        The AUC in [0, 1].
    """
    s, y = _scores_labels(scores, labels)
    ranks = _average_ranks(s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, one point per distinct score (predict positive when ``score >= threshold``).

    Args:
        scores: One score per sample, higher = more likely positive.
        labels: 1/True for positives, 0/False for negatives.

    Returns:
        ``(fpr, tpr, thresholds)``: thresholds decreasing from ``+inf`` (the (0, 0) point) to the lowest score;
        fpr and tpr increase to 1.
    """
    s, y = _scores_labels(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_group]
    fp = (last_of_group + 1) - tp
    fpr = np.r_[0.0, fp / (y.size - y.sum())]
    tpr = np.r_[0.0, tp / y.sum()]
    thresholds = np.r_[np.inf, s[last_of_group]]
    return fpr, tpr, thresholds


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, fpr: float = 0.01) -> float:
    """Best true-positive rate among the thresholds whose false-positive rate is at most ``fpr`` (no interpolation).

    Args:
        scores: One score per sample, higher = more likely positive.
        labels: 1/True for positives, 0/False for negatives.
        fpr: Largest allowed false-positive rate, in [0, 1].

    Returns:
        The TPR in [0, 1].
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr={fpr} must be in [0, 1]")
    f, t, _ = roc_curve(scores, labels)
    return float(t[f <= fpr + 1e-12].max())


def calibrate_threshold(values: ArrayLike, m: float = 3.0) -> float:
    """Threshold ``mean + m * std`` of reference values (e.g. scores of non-memorized prompts).

    Args:
        values: Reference values; at least two.
        m: Number of standard deviations (sample standard deviation, ``ddof=1``).

    Returns:
        The threshold.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError(f"calibrate_threshold needs at least 2 values, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    return float(v.mean() + m * v.std(ddof=1))


def quantile_threshold(values: ArrayLike, rate: float) -> float:
    """Threshold that a fraction ``rate`` of reference values exceed: their ``1 - rate`` quantile.

    For example ``quantile_threshold(nonmem_scores, 0.01)`` flags about 1 % of non-memorized prompts.

    Args:
        values: Reference values.
        rate: Target exceedance rate, in [0, 1].

    Returns:
        The threshold (linear interpolation between order statistics).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate} must be in [0, 1]")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("quantile_threshold needs at least 1 value")
    if np.isnan(v).any():
        raise ValueError("values contain NaN")
    return float(np.quantile(v, 1.0 - rate))
