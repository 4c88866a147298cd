"""Distances between two sets of image features: the Fréchet distance and the kernel distance (KID)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .features import ImageFeatures

__all__ = ["frechet_distance", "kernel_inception_distance", "default_subset_size"]


def _feature_matrix(feats: ImageFeatures | np.ndarray | torch.Tensor, arg: str, min_rows: int = 2) -> np.ndarray:
    values = feats.values if isinstance(feats, ImageFeatures) else feats
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    x = np.asarray(values)
    if x.ndim != 2:
        raise ValueError(f"{arg} must be a 2-D [N, D] feature array, got shape {tuple(x.shape)}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{arg} must hold numbers, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{arg} needs at least {min_rows} rows (images), got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{arg} has no feature columns")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{arg} holds NaN or inf")
    return x


def _check_pair(feats_a: Any, feats_b: Any, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(feats_a, ImageFeatures) and isinstance(feats_b, ImageFeatures) and feats_a.name != feats_b.name:
        raise ValueError(f"feats_a and feats_b come from different features: {feats_a.name!r} and {feats_b.name!r}")
    a = _feature_matrix(feats_a, "feats_a", min_rows)
    b = _feature_matrix(feats_b, "feats_b", min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b differ in feature dimension: {a.shape[1]} and {b.shape[1]}")
    return a, b


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    feats_a: ImageFeatures | np.ndarray | torch.Tensor, feats_b: ImageFeatures | np.ndarray | torch.Tensor
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with sample covariances (``ddof=1``), computed in
    float64. The trace of the matrix square root is taken as ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))``, the sum of
    the square roots of the eigenvalues of a symmetric PSD matrix, which stays real and stable when the covariances
    are singular (fewer images than feature dimensions, as in small reports).

    FD is biased upward at small n: two samples of one distribution give FD > 0. The bias falls like 1/n once n
    is well above the feature dimension, and more slowly below it (on 512-d SSCD features of synthetic images it
    fell from 0.72 at n = 8 to 0.36 at n = 64; see ``docs/scorers.md``). FD values are therefore comparable only
    between sets of the same size; at a few dozen images prefer KID.

    Args:
        feats_a: ``[N_a, D]`` features (array, tensor or :class:`ImageFeatures`), at least 2 rows.
        feats_b: ``[N_b, D]`` features of the same kind.

    Returns:
        The distance, ``>= 0`` (rounding below zero is clipped).

    Raises:
        ValueError: A feature array is not 2-D, has fewer than 2 rows, holds NaN, or the dimensions differ.
    """
    a, b = _check_pair(feats_a, feats_b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    """Unbiased MMD^2 with the kernel ``(gamma <x, y> + coef)^degree`` between two samples of equal size."""
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef) ** degree
    k_yy = (y @ y.T * gamma + coef) ** degree
    k_xy = (x @ y.T * gamma + coef) ** degree
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def default_subset_size(n_a: int, n_b: int) -> int:
    """KID subset size used when none is given: half the smaller set (at least 2, at most 1000)."""
    return int(min(1000, max(2, min(n_a, n_b) // 2)))


def kernel_inception_distance(
    feats_a: ImageFeatures | np.ndarray | torch.Tensor,
    feats_b: ImageFeatures | np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int | None = None,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel distance (KID; Bińkowski et al., 2018) between two feature sets: mean and std over random subsets.

    Each subset draws ``subset_size`` rows of each set without replacement and computes the unbiased MMD^2 with
    the cubic polynomial kernel ``k(x, y) = (<x, y> / D + 1)^3``, as torchmetrics and torch-fidelity do (the std
    over subsets is the population std, as theirs). The estimate is unbiased at any size: its expectation is 0
    for two samples of one distribution, so small negative values occur. ``subset_size`` equal to both set sizes
    gives the deterministic full-set estimate (std 0).

    Args:
        feats_a: ``[N_a, D]`` features (array, tensor or :class:`ImageFeatures`).
        feats_b: ``[N_b, D]`` features of the same kind.
        subsets: Number of random subsets.
        subset_size: Rows drawn from each set per subset, ``2 <= subset_size <= min(N_a, N_b)``; default half
            the smaller set (see :func:`default_subset_size`), so that the std says how much the estimate moves.
        degree: Kernel degree.
        gamma: Kernel scale; ``1 / D`` when ``None``.
        coef: Kernel offset.
        seed: Seed of the subset draws (results are deterministic).

    Returns:
        ``(mean, std)`` over the subsets.

    Raises:
        ValueError: Invalid features (see :func:`frechet_distance`), ``subsets < 1`` or a ``subset_size`` out of
            range.
    """
    a, b = _check_pair(feats_a, feats_b)
    if subsets < 1:
        raise ValueError(f"subsets={subsets} must be >= 1")
    size = default_subset_size(a.shape[0], b.shape[0]) if subset_size is None else int(subset_size)
    if size < 2:
        raise ValueError(f"subset_size={size} must be >= 2")
    for arg, x in (("feats_a", a), ("feats_b", b)):
        if size > x.shape[0]:
            raise ValueError(f"subset_size={size} exceeds the {x.shape[0]} rows of {arg}")
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        ia = rng.permutation(a.shape[0])[:size]
        ib = rng.permutation(b.shape[0])[:size]
        values[s] = _poly_mmd2_unbiased(a[ia], b[ib], degree, g, coef)
    return float(values.mean()), float(values.std())

