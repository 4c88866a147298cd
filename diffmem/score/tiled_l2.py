"""Tiled l2 distance of Carlini et al. (2023), "Extracting Training Data from Diffusion Models"."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import PixelScorer, register_scorer

__all__ = ["TiledL2Scorer", "tiled_l2_distance"]


def tiled_l2_distance(x: np.ndarray, y: np.ndarray, tiles: int = 4) -> float:
    """Largest per-tile RMS distance between two images on [0, 1] pixels.

    Each image is cut into a ``tiles`` x ``tiles`` grid (edge tiles absorb the remainder when the size does not
    divide); a tile's distance is ``||a - b||_2 / sqrt(numel)``, i.e. its RMS pixel difference.

    Args:
        x: uint8 ``[H, W, 3]`` image.
        y: uint8 image of the same shape.
        tiles: Tiles per side.

    Returns:
        The maximum tile distance, in [0, 1] (0 for identical images).
    """
    if x.shape != y.shape:
        raise ValueError(f"tiled_l2_distance needs images of equal shape, got {x.shape} and {y.shape}")
    if tiles < 1 or tiles > min(x.shape[:2]):
        raise ConfigError(f"tiles={tiles} must be in [1, {min(x.shape[:2])}] for {x.shape[0]}x{x.shape[1]} images")
    diff = (x.astype(np.float64) - y.astype(np.float64)) / 255.0
    worst = 0.0
    for band in np.array_split(diff, tiles, axis=0):
        for tile in np.array_split(band, tiles, axis=1):
            worst = max(worst, float(np.sqrt(np.mean(tile * tile))))
    return worst


@register_scorer("tiled-l2")
class TiledL2Scorer(PixelScorer):
    """Negated tiled l2 distance, so that higher means more similar (identical images score 0).

    The default threshold -0.15 is Carlini et al.'s delta = 0.15 on the RMS distance of [0, 1] pixels: a pair
    counts as a copy when every one of the 16 tiles differs by at most 0.15 RMS (about 38 grey levels).

    Args:
        tiles: Tiles per side (4 gives Carlini et al.'s 16 tiles).
        threshold: Replication threshold on the negated distance (default -0.15).
    """

    threshold = -0.15

    def __init__(self, tiles: int = 4, threshold: float | None = None) -> None:
        if tiles < 1:
            raise ConfigError(f"tiles={tiles} must be >= 1")
        self.tiles = tiles
        if threshold is not None:
            self.threshold = float(threshold)

    def _pair(self, x: np.ndarray, y: np.ndarray) -> float:
        distance = tiled_l2_distance(x, y, self.tiles)
        return -distance if distance > 0 else 0.0

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": "Carlini et al. 2023 tiled l2",
            "preprocessing": (
                f"RGB scaled to [0, 1]; {self.tiles}x{self.tiles} tiles; per-tile l2 / sqrt(tile numel); distance = "
                "max over tiles; similarity = -distance; the larger image of a pair is resized (bicubic) to the smaller"
            ),
        }
