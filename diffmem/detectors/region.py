"""Replication on the memorized region only: Bright Ending masks of the very generations being scored.

A model that copies part of a training image (a logo, a watermark, a face on an otherwise new picture) reproduces
only that region. Compared as a whole, such a generation looks new; compared on the copied region, it is a copy.
Chen et al. (ICLR 2025) find that region without training data: at the last denoising step the copied patches
attend abnormally to the prompt's end token (:mod:`.bright_ending`).

:func:`generate_with_end_token_maps` generates exactly as :func:`diffmem.sampling.generate_images` (same seeds,
same images) and captures, for every generation, the end-token attention map at its own last step.
:func:`region_similarities` then scores each generation against its reference on its mask only
(:func:`.local.masked_similarity`). :func:`diffmem.evaluation.evaluate` uses both when
``EvalConfig(region="bright-ending")``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import SamplerConfig
from ..errors import ConfigError, DiffmemError
from ..sampling import generate_images, image_size, latent_shape
from ..targets import get_denoiser
from .bright_ending import EndTokenAttention, _normalise, _to_grid, end_token_positions
from .local import MASKED_METRICS, masked_similarity

logger = logging.getLogger(__name__)

__all__ = ["REGIONS", "generate_with_end_token_maps", "region_similarities", "is_regional_copy"]

REGIONS = ("full", "bright-ending")
"""Where replication is measured: the whole image, or the generation's Bright Ending mask."""


@torch.no_grad()
def generate_with_end_token_maps(pipe: Any, prompts: Sequence[str], *, num_seeds: int = 1, seed: int = 0,
                                 batch_size: int = 64, end_tokens: str = "first", layers: str | None = None,
                                 progress: bool = True, desc: str = "generate",
                                 sampler: SamplerConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_seeds`` images per prompt and each generation's end-token attention map at its last step.

    The images are those of :func:`~diffmem.sampling.generate_images` with the same arguments (image ``j`` of every
    prompt from seed ``seed + j``); the attention capture (:class:`.bright_ending.EndTokenAttention`) leaves the
    model's output unchanged. Each map is the end-token attention of the conditional half, averaged over heads and
    cross-attention layers, laid on the latent grid, resized to image size and min-max normalised per generation.

    Args:
        pipe: A CFG pipeline whose denoiser has cross-attention (Stable Diffusion, SDXL, PixArt).
        prompts: Prompts.
        num_seeds: Generations per prompt.
        seed: First seed.
        batch_size: Generations per pipeline call (rounded down to whole prompts, at least one prompt).
        end_tokens: ``"first"``: the end token after the prompt (the paper's); ``"all"``: it and the padding.
        layers: Regex on the names of the cross-attention modules to average (``None``: all).
        progress: Show a progress bar.
        desc: Progress bar label.
        sampler: The sampler settings (``None``: the pipeline's own defaults).

    Returns:
        ``(images, maps)``: ``uint8 [P, num_seeds, H, W, 3]`` and ``float32 [P, num_seeds, H, W]`` in [0, 1].

    Raises:
        DiffmemError: The denoiser has no cross-attention, or the last step was not seen.
    """
    prompts = list(prompts)
    denoiser = get_denoiser(pipe)
    height, width = image_size(pipe, *((sampler.height, sampler.width) if sampler is not None else (None, None)))
    _, lh, lw = latent_shape(pipe, height, width)
    positions = end_token_positions(pipe, prompts, end_tokens)
    capture = EndTokenAttention(denoiser, layers)

    def pre_hook(module, args, kwargs) -> None:
        # the pipeline has set the scheduler's timesteps by its first denoiser call; the map of the last call wins
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        capture.active = float(torch.as_tensor(t).flatten()[0]) == float(pipe.scheduler.timesteps[-1])
        if capture.active:
            capture.maps.clear()

    per_call = max(1, batch_size // num_seeds)
    images, maps = [], []
    handle = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with capture:
            for start in tqdm(range(0, len(prompts), per_call), desc=desc, disable=not progress):
                group = prompts[start : start + per_call]
                capture.positions = [p for p in positions[start : start + per_call] for _ in range(num_seeds)]
                capture.maps.clear()
                images.append(generate_images(pipe, group, num_seeds=num_seeds, seed=seed,
                                              batch_size=len(group) * num_seeds, progress=False, sampler=sampler))
                if not capture.maps:
                    raise DiffmemError("the last denoising step was not seen (the scheduler's last timestep was not "
                                       "called)")
                raw = torch.stack([_to_grid(m.float().cpu(), (lh, lw)) for m in capture.maps.values()]).mean(0)
                up = F.interpolate(raw[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
                maps.append(_normalise(up).view(len(group), num_seeds, height, width).numpy().astype(np.float32))
    finally:
        handle.remove()
    if not prompts:
        return np.zeros((0, num_seeds, height, width, 3), np.uint8), np.zeros((0, num_seeds, height, width), np.float32)
    return np.concatenate(images), np.concatenate(maps)


def region_similarities(images: Sequence[np.ndarray], reference: np.ndarray, masks: Sequence[np.ndarray],
                        metric: str = "ssim") -> np.ndarray:
    """Similarity of each generation to the reference on that generation's mask only.

    Args:
        images: Generations, each ``[H, W, 3]``.
        reference: The reference image, same size.
        masks: One ``[H, W]`` mask (bool or weights) per generation.
        metric: A metric of :func:`.local.masked_similarity` (``ssim``, ``psnr``, ``mse``, ``l2``).

    Returns:
        ``float64 [len(images)]``.
    """
    if len(images) != len(masks):
        raise ConfigError(f"{len(images)} images and {len(masks)} masks: one mask per generation")
    return np.array([masked_similarity(img, reference, m, metric) for img, m in zip(images, masks)], dtype=np.float64)


def is_regional_copy(similarity: np.ndarray, threshold: float, metric: str = "ssim") -> np.ndarray:
    """Which masked similarities count as a copy: at or above ``threshold``; at or below it for ``mse`` (a
    distance)."""
    if metric not in MASKED_METRICS:
        raise ConfigError(f"metric={metric!r} is invalid: choose one of {', '.join(MASKED_METRICS)}")
    s = np.asarray(similarity)
    return s <= threshold if metric == "mse" else s >= threshold
