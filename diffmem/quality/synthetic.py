"""Synthetic image sets with a known answer, for checking the quality metrics (tests and ``bench_quality``):
plausible small images, and the dark, structureless noise a broken edit can render."""

from __future__ import annotations

import numpy as np

__all__ = ["shape_images", "dark_noise_images"]


def shape_images(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` plausible ``size``-px images (``uint8``, ``[n, size, size, 3]``): a flat background with 1-3 coloured
    discs or rectangles, plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3))
    for i in range(n):
        img = np.broadcast_to(rng.uniform(40, 220, 3), (size, size, 3)).copy()
        for _ in range(rng.integers(1, 4)):
            colour = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                cx, cy = rng.uniform(0.2, 0.8, 2) * size
                r = rng.uniform(0.1, 0.3) * size
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            else:
                x0, y0 = rng.uniform(0.0, 0.6, 2) * size
                w, h = rng.uniform(0.2, 0.4, 2) * size
                inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            img[inside] = colour
        out[i] = img + rng.normal(0.0, 12.0, img.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def dark_noise_images(n: int, size: int, seed: int) -> np.ndarray:
    """What a broken edit can render: ``n`` images of dark, structureless noise (``uint8``)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(12.0, 10.0, (n, size, size, 3)), 0, 255).astype(np.uint8)
