"""Batched, seed-stable image generation shared by evaluation, attacks and checks."""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["initial_latents", "generate_images"]


def initial_latents(pipe, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """Initial noise for each seed, made on the CPU so that a seed gives the same noise on any device or batch."""
    from diffmem.hooks import initial_latents as seed_noise

    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    channels = denoiser.config.in_channels
    f = pipe.vae_scale_factor
    shape = (channels, height // f, width // f)
    return torch.cat([seed_noise(shape, s) for s in seeds])


def default_size(pipe) -> tuple[int, int]:
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    size = denoiser.config.sample_size * pipe.vae_scale_factor
    return size, size


@torch.no_grad()
def generate_images(
    pipe,
    prompts: list[str],
    num_seeds: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "generate",
    **call_kwargs,
) -> np.ndarray:
    """Generate ``num_seeds`` images for each prompt; image ``j`` of every prompt uses seed ``seed + j``.

    The result does not depend on ``batch_size``: each image's initial noise is drawn from its own seed.

    Args:
        pipe: A text-to-image pipeline that accepts ``latents=``.
        prompts: Prompts.
        num_seeds: Images per prompt.
        seed: First seed.
        batch_size: Images per pipeline call.
        progress: Show a progress bar.
        desc: Progress bar label.
        **call_kwargs: Passed to the pipeline (``num_inference_steps``, ``guidance_scale``, ...).

    Returns:
        ``uint8 [len(prompts), num_seeds, H, W, 3]``.
    """
    height = call_kwargs.pop("height", None)
    width = call_kwargs.pop("width", None)
    dh, dw = default_size(pipe)
    height, width = height or dh, width or dw
    jobs = [(p, seed + j) for p in prompts for j in range(num_seeds)]
    out: list[np.ndarray] = []
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress):
        chunk = jobs[start : start + batch_size]
        lat = initial_latents(pipe, [s for _, s in chunk], height, width).to(denoiser.device, denoiser.dtype)
        res = pipe(
            [p for p, _ in chunk], latents=lat, height=height, width=width, output_type="np", **call_kwargs
        ).images
        out.append((np.clip(res, 0, 1) * 255).round().astype(np.uint8))
    imgs = np.concatenate(out) if out else np.zeros((0, height, width, 3), np.uint8)
    return imgs.reshape(len(prompts), num_seeds, *imgs.shape[1:])
