"""Detection metrics and thresholds: pure functions of numpy arrays (higher score = more likely positive)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from .errors import ConfigError

__all__ = [
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
    "threshold_mean_std",
    "threshold_at_false_flag_rate",
    "quantile_threshold",
]


def _scores_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ConfigError(f"scores and labels differ in length: {s.size} and {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ConfigError("labels must be booleans or 0/1")
        y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ConfigError(f"labels need both classes, got {n_pos} positives and {y.size - n_pos} negatives")
    return s, y


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); a tie between classes counts one half.

    Args:
        scores: One score per sample, higher = more likely positive.
        labels: 1/True for positives, 0/False for negatives.

    Returns:
        The AUC in [0, 1].
    """
    from sklearn.metrics import roc_auc_score

    s, y = _scores_labels(scores, labels)
    return float(roc_auc_score(y, s))


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (``sklearn.metrics.roc_curve`` with every threshold kept): predict positive when ``score >= t``.

    Args:
        scores: One score per sample, higher = more likely positive.
        labels: 1/True for positives, 0/False for negatives.

    Returns:
        ``(fpr, tpr, thresholds)``, starting at ``(0, 0)`` with threshold ``+inf``.
    """
    from sklearn.metrics import roc_curve as sk_roc_curve

    s, y = _scores_labels(scores, labels)
    fpr, tpr, thr = sk_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, fpr: float = 0.01) -> float:
    """Largest true-positive rate at a false-positive rate of at most ``fpr``.

    Args:
        scores: One score per sample, higher = more likely positive.
        labels: 1/True for positives, 0/False for negatives.
        fpr: The false-positive budget.

    Returns:
        The TPR.

    Raises:
        ValueError: ``fpr`` is outside ``[0, 1]``, or the scores and labels are invalid.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ConfigError(f"fpr={fpr!r} is invalid: must be in [0, 1]")
    f, t, _ = roc_curve(scores, labels)
    return float(t[f <= fpr + 1e-12].max())


def threshold_mean_std(values: ArrayLike, m: float = 3.0) -> float:
    """Threshold ``mean + m * std`` of reference values (e.g. scores of non-memorized prompts).

    Args:
        values: Reference values; at least two.
        m: Number of standard deviations (sample standard deviation, ``ddof=1``).

    Returns:
        The threshold.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise ConfigError(f"calibration needs at least 2 values, got {v.size}")
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
        raise ConfigError(f"rate={rate} must be in [0, 1]")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ConfigError("quantile_threshold needs at least 1 value")
    if np.isnan(v).any():
        raise ValueError("values contain NaN")
    return float(np.quantile(v, 1.0 - rate))


def threshold_at_false_flag_rate(values: ArrayLike, false_flag_rate: float) -> tuple[float, float]:
    """Smallest threshold that flags (``value >= threshold``) at most ``floor(rate * n)`` of ``n`` reference values.

    With the values sorted in descending order ``s(1) >= ... >= s(n)`` and ``k = floor(rate * n)`` (with a 1e-9
    slack so that ``0.29 * 100`` gives 29), the threshold is the smallest float64 strictly above ``s(k + 1)``;
    fewer than ``k`` are flagged when values tie at ``s(k + 1)``. A rate of 0 gives the value just above the
    largest one.

    Args:
        values: Reference values (e.g. clique strengths of non-memorized prompts); not NaN.
        false_flag_rate: Target rate in ``[0, 1)``.

    Returns:
        ``(threshold, achieved_rate)``: the fraction of ``values`` the threshold flags (``<= false_flag_rate``).
    """
    s = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ConfigError("calibration needs at least one reference value")
    if np.isnan(s).any():
        raise ValueError("calibration values hold NaN")
    if not 0.0 <= false_flag_rate < 1.0:
        raise ConfigError(f"false_flag_rate={false_flag_rate!r} is invalid: must be in [0, 1)")
    k = math.floor(false_flag_rate * s.size + 1e-9)
    threshold = float(np.nextafter(np.sort(s)[::-1][k], np.inf))
    return threshold, float(np.count_nonzero(s >= threshold)) / s.size
