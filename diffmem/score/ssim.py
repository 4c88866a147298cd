"""Structural similarity: SSIM (scikit-image) and multi-scale SSIM (Wang, Simoncelli & Bovik, 2003)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity
from skimage.transform import pyramid_reduce

from ..errors import ConfigError
from .base import PixelScorer, register_scorer

__all__ = ["SSIMScorer", "MSSSIMScorer", "MS_SSIM_WEIGHTS", "ms_ssim"]

logger = logging.getLogger(__name__)

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of Wang et al. (2003), finest scale first."""

_K1, _K2 = 0.01, 0.03


@register_scorer("ssim")
class SSIMScorer(PixelScorer):
    """SSIM of RGB images (``skimage.metrics.structural_similarity`` with ``channel_axis=-1``, data range 255).

    Args:
        gaussian_weights: Use Wang et al.'s 11x11 Gaussian window (sigma 1.5, population covariance) instead of
            scikit-image's default 7x7 uniform window.
        threshold: Replication threshold (default 0.6).
    """

    threshold = 0.6

    def __init__(self, gaussian_weights: bool = False, threshold: float | None = None) -> None:
        self.gaussian_weights = gaussian_weights
        if threshold is not None:
            self.threshold = float(threshold)

    def _pair(self, x: np.ndarray, y: np.ndarray) -> float:
        if self.gaussian_weights:
            kwargs: dict[str, Any] = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
        else:
            kwargs = {}
        return float(structural_similarity(x, y, channel_axis=-1, data_range=255, **kwargs))

    def describe(self) -> dict[str, Any]:
        window = "11x11 Gaussian window (sigma 1.5)" if self.gaussian_weights else "7x7 uniform window"
        return {
            **super().describe(),
            "source": "skimage.metrics.structural_similarity",
            "preprocessing": f"RGB uint8, data_range 255, {window}, mean over channels; the larger image of a pair "
            "is resized (bicubic) to the smaller one's size",
        }


def _ssim_terms(x: np.ndarray, y: np.ndarray, sigma: float, win_size: int) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term of two float ``[H, W, C]`` images in [0, 1]."""
    truncate = ((win_size - 1) / 2) / sigma
    sig = (sigma, sigma, 0)

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=sig, truncate=truncate, mode="reflect")

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = _K1**2, _K2**2
    cs_map = (2 * cxy + c2) / (vx + vy + c2)
    l_map = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    pad = (win_size - 1) // 2
    valid = (slice(pad, -pad or None), slice(pad, -pad or None))
    return float((l_map * cs_map)[valid].mean()), float(cs_map[valid].mean())


def _num_scales(height: int, width: int, max_scales: int, win_size: int) -> int:
    """Number of scales whose coarsest image still holds a whole window (each scale halves the size, rounding up)."""
    n, h, w = 0, height, width
    while n < max_scales and min(h, w) >= win_size:
        n += 1
        h, w = -(-h // 2), -(-w // 2)
    return n


def ms_ssim(
    x: np.ndarray, y: np.ndarray, max_scales: int = 5, sigma: float = 1.5, win_size: int = 11
) -> tuple[float, int]:
    """Multi-scale SSIM of two uint8 ``[H, W, 3]`` images of equal size.

    Scales come from a Gaussian pyramid (``skimage.transform.pyramid_reduce``, factor 2). Images too small for
    all five scales use fewer, with the first weights of :data:`MS_SSIM_WEIGHTS` renormalised to sum to 1.
    Negative terms are clipped to 0 before the weighted product.

    Args:
        x: First image.
        y: Second image.
        max_scales: Most scales to use (1 to 5).
        sigma: Gaussian window sigma.
        win_size: Window size; the coarsest scale must be at least this large.

    Returns:
        ``(ms_ssim, scales_used)``.
    """
    if x.shape != y.shape:
        raise ValueError(f"ms_ssim needs images of equal shape, got {x.shape} and {y.shape}")
    if not 1 <= max_scales <= len(MS_SSIM_WEIGHTS):
        raise ConfigError(f"max_scales={max_scales} must be in [1, {len(MS_SSIM_WEIGHTS)}]")
    n = _num_scales(x.shape[0], x.shape[1], max_scales, win_size)
    if n == 0:
        raise ConfigError(f"images of {x.shape[0]}x{x.shape[1]} px are smaller than the {win_size}-px MS-SSIM window")
    weights = np.asarray(MS_SSIM_WEIGHTS[:n])
    weights = weights / weights.sum()
    a, b = x.astype(np.float64) / 255.0, y.astype(np.float64) / 255.0
    value = 1.0
    for level in range(n):
        ssim_val, cs_val = _ssim_terms(a, b, sigma, win_size)
        term = ssim_val if level == n - 1 else cs_val
        value *= max(term, 0.0) ** weights[level]
        if level < n - 1:
            a = pyramid_reduce(a, downscale=2, channel_axis=-1)
            b = pyramid_reduce(b, downscale=2, channel_axis=-1)
    return float(value), n


@register_scorer("ms-ssim")
class MSSSIMScorer(PixelScorer):
    """Multi-scale SSIM (see :func:`ms_ssim`).

    Args:
        max_scales: Most pyramid scales (5 is the standard; fewer are used automatically for small images:
            32x32 images get 2, 64x64 get 3, and all 5 need at least 161 px).
        threshold: Replication threshold (default 0.6, as for SSIM; calibrate with
            :func:`diffmem.metrics.threshold_mean_std` on non-memorized generations for a new image size).
    """

    threshold = 0.6
    sigma = 1.5
    win_size = 11

    def __init__(self, max_scales: int = 5, threshold: float | None = None) -> None:
        if not 1 <= max_scales <= len(MS_SSIM_WEIGHTS):
            raise ConfigError(f"max_scales={max_scales} must be in [1, {len(MS_SSIM_WEIGHTS)}]")
        self.max_scales = max_scales
        if threshold is not None:
            self.threshold = float(threshold)
        self.scales_used: dict[str, int] = {}

    def _pair(self, x: np.ndarray, y: np.ndarray) -> float:
        value, n = ms_ssim(x, y, self.max_scales, self.sigma, self.win_size)
        key = f"{x.shape[0]}x{x.shape[1]}"
        if key not in self.scales_used:
            self.scales_used[key] = n
            if n < self.max_scales:
                logger.info(
                    "ms-ssim: %s px images allow %d of %d scales; weights renormalised", key, n, self.max_scales
                )
        return value

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": "diffmem ms_ssim (Wang et al. 2003)",
            "preprocessing": (
                f"RGB in [0, 1]; {self.win_size}x{self.win_size} Gaussian window (sigma {self.sigma}); Gaussian "
                f"pyramid (skimage pyramid_reduce, factor 2); up to {self.max_scales} scales with weights "
                f"{MS_SSIM_WEIGHTS[: self.max_scales]}, reduced automatically (and renormalised) so the coarsest scale "
                f"is at least {self.win_size} px; the larger image of a pair is resized (bicubic) to the smaller"
            ),
            "scales_used": dict(self.scales_used),
        }
