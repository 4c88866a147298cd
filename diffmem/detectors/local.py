"""Local memorization: similarity on a mask's region only, and overlays of a mask on an image.

Bright Ending's masks (:mod:`.bright_ending`) mark the patches a model reproduces. Scoring a generation against
its training image on that region only tells a local copy (a logo, a face) from a globally different image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["MASKED_METRICS", "masked_similarity", "mask_overlay", "save_mask_overlay"]

MASKED_METRICS = ("ssim", "psnr", "mse", "l2")


def _as_float_image(image: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ConfigError(f"{name} must be [H, W] or [H, W, C], not shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[h, w]`` mask (bool or weights in [0, 1]) at ``size = (H, W)``, bilinear for weights, nearest for bool."""
    mask = np.asarray(mask)
    if mask.shape == size:
        return mask.astype(np.float64)
    as_bool = mask.dtype == bool
    img = Image.fromarray((mask.astype(np.float32) * (255 if as_bool else 1)).astype(np.uint8 if as_bool else np.float32))
    out = np.asarray(img.resize((size[1], size[0]), Image.NEAREST if as_bool else Image.BILINEAR), dtype=np.float64)
    return out / 255.0 if as_bool else out


def masked_similarity(gen: np.ndarray, ref: np.ndarray, mask: np.ndarray, metric: str = "ssim") -> float:
    """Similarity of a generation to a reference on the masked region only.

    Args:
        gen: Generated image, ``uint8`` or float in [0, 1], ``[H, W]`` or ``[H, W, C]``.
        ref: Reference image of the same size.
        mask: ``[h, w]`` boolean mask or weights in [0, 1] (e.g. a Bright Ending mask or map); resized to the
            images when its size differs. Pixel ``p`` counts with weight ``mask[p]``.
        metric: ``"ssim"``: the mean of the local SSIM map (scikit-image, 7x7 window, data range 1) over the mask;
            ``"psnr"``: PSNR in dB of the masked mean squared error; ``"mse"``: masked mean squared error;
            ``"l2"``: one minus the masked root mean squared error (1 for identical regions). Higher is more
            similar for ``ssim``, ``psnr`` and ``l2``; ``mse`` is a distance.

    Returns:
        The masked value. An empty mask raises.

    Raises:
        ConfigError: Unknown metric, mismatched sizes or an empty mask.
    """
    if metric not in MASKED_METRICS:
        raise ConfigError(f"metric={metric!r} is invalid: choose one of {', '.join(MASKED_METRICS)}")
    x, y = _as_float_image(gen, "gen"), _as_float_image(ref, "ref")
    if x.shape != y.shape:
        raise ConfigError(f"gen {x.shape} and ref {y.shape} differ in shape; resize one first")
    w = _resize_mask(mask, x.shape[:2])
    if w.min() < 0 or w.sum() <= 0:
        raise ConfigError("the mask is empty (or has negative weights): nothing to compare")
    if metric == "ssim":
        win = min(7, *(d if d % 2 else d - 1 for d in x.shape[:2]))
        _, smap = structural_similarity(x, y, channel_axis=-1, data_range=1.0, full=True, win_size=max(win, 3))
        return float((smap.mean(-1) * w).sum() / w.sum())
    mse = float((((x - y) ** 2).mean(-1) * w).sum() / w.sum())
    if metric == "mse":
        return mse
    if metric == "l2":
        return 1.0 - float(np.sqrt(mse))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def mask_overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0),
                 alpha: float = 0.5) -> np.ndarray:
    """The image with the mask painted over it in ``color`` (weights blend proportionally).

    Args:
        image: ``uint8`` or float ``[H, W]`` / ``[H, W, C]`` image.
        mask: ``[h, w]`` bool mask or weights in [0, 1], resized to the image.
        color: RGB of the overlay.
        alpha: Opacity where the mask is 1.

    Returns:
        ``uint8 [H, W, 3]``.
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha={alpha!r} is invalid: must be in [0, 1]")
    x = _as_float_image(image, "image")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x[..., :3]
    w = np.clip(_resize_mask(mask, x.shape[:2]), 0, 1)[..., None] * alpha
    out = x * (1 - w) + np.asarray(color, dtype=np.float64)[None, None] / 255.0 * w
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def save_mask_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray, scale: int = 1, **kwargs) -> Path:
    """Write :func:`mask_overlay` as a PNG, next to the plain image when ``scale`` enlarges small images.

    Args:
        path: Output ``.png`` path.
        image: The image.
        mask: The mask or map.
        scale: Integer upscaling (nearest) for small images, e.g. 8 for a 32 px generation.
        **kwargs: ``color`` and ``alpha`` of :func:`mask_overlay`.

    Returns:
        The written path.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"path={str(path)!r} is invalid: the overlay is a .png")
    if scale < 1:
        raise ConfigError(f"scale={scale!r} is invalid: must be >= 1")
    over = Image.fromarray(mask_overlay(image, mask, **kwargs))
    if scale > 1:
        over = over.resize((over.width * scale, over.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    over.save(path)
    return path
