"""Image similarity scorers behind a registry: ``get_scorer("sscd")``, ``get_scorer("ssim")``, ...

Registered names: ``sscd``, ``clip``, ``ssim``, ``ms-ssim``, ``tiled-l2``. Every scorer accepts PIL images or a
uint8 ``[B, H, W, 3]`` array, and ``similarity(a, b)`` returns a float32 ``[len(a), len(b)]`` tensor where
higher means more similar.
"""

from __future__ import annotations

from . import base
from .base import (
    EmbeddingScorer,
    Images,
    PixelScorer,
    Scorer,
    ScorerUnavailableError,
    get_scorer,
    list_scorers,
    register_scorer,
    resize_uint8,
    to_uint8_batch,
    to_uint8_list,
)
from .clip import ClipScorer
from .sscd import SSCDScorer
from .ssim import MSSSIMScorer, SSIMScorer, ms_ssim
from .tiled_l2 import TiledL2Scorer, tiled_l2_distance

__all__ = [
    *base.__all__,
    "SSCDScorer",
    "ClipScorer",
    "SSIMScorer",
    "MSSSIMScorer",
    "TiledL2Scorer",
    "ms_ssim",
    "tiled_l2_distance",
]
