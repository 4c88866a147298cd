"""Detectors beyond Wen et al.'s noise norm, registered in :mod:`diffmem.detection` on import.

* ``bright_ending`` (:mod:`.bright_ending`): Chen et al. (ICLR 2025), end-token cross-attention at the last
  denoising step; scores and a per-pixel memorization mask per prompt.
* ``sharpness`` (:mod:`.sharpness`): Jeon et al. (ICML 2025), the Hessian-score product at the first step.
* ``anisotropy`` (:mod:`.anisotropy`): Asthana & Belagiannis (ICLR 2026), the first-step norm plus the
  low-noise alignment of the guidance with the unconditional prediction, both on pure noise.
* :mod:`.local`: similarity on a mask's region only (:func:`masked_similarity`) and mask overlays.
* :mod:`.region`: generations with their own Bright Ending masks, for replication measured on the memorized region
  (``EvalConfig(region="bright-ending")``).
"""

from __future__ import annotations

from .anisotropy import AnisotropyConfig, anisotropy_scores
from .bright_ending import BrightEndingConfig, bright_ending_scores, end_token_positions
from .local import mask_overlay, masked_similarity, save_mask_overlay
from .sharpness import SharpnessConfig, sharpness_scores

__all__ = [
    "AnisotropyConfig",
    "anisotropy_scores",
    "BrightEndingConfig",
    "bright_ending_scores",
    "end_token_positions",
    "SharpnessConfig",
    "sharpness_scores",
    "masked_similarity",
    "mask_overlay",
    "save_mask_overlay",
]
