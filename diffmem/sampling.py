"""Seeded initial noise, image size, and batched, seed-stable image generation.

This module is the one home of three helpers that every stage needs: the initial noise of a seed
(:func:`seed_noise`, :func:`initial_latents`), the pipeline's image size for UNet and transformer denoisers
(:func:`image_size`), and :func:`generate_images`, which generates ``num_seeds`` images per prompt (or per
precomputed conditioning) so that image ``j`` of every prompt uses seed ``seed + j`` whatever the batching.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .targets import get_denoiser

if TYPE_CHECKING:
    from .config import SamplerConfig

logger = logging.getLogger(__name__)

__all__ = ["seed_noise", "initial_latents", "image_size", "latent_shape", "generate_images", "to_uint8",
           "pipeline_extras", "attention_mask_of"]


def _call_parameters(pipe: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(type(pipe).__call__).parameters)
    except (TypeError, ValueError):
        return set()


def pipeline_extras(pipe: Any) -> dict[str, Any]:
    """Arguments diffmem passes to every call of this pipeline: PixArt's resolution binning off (diffmem always
    gives the size itself, and binning would resize small models' images to a 256 px bin)."""
    return {"use_resolution_binning": False} if "use_resolution_binning" in _call_parameters(pipe) else {}


def attention_mask_of(embeds: torch.Tensor) -> torch.Tensor:
    """The text attention mask of a conditioning whose padded tokens are zero vectors (PixArt's convention in
    diffmem: :func:`diffmem.objective.encode_conditioning` zeroes them, and optimisation keeps them zero)."""
    return (embeds.abs().sum(-1) > 0).long()


def seed_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Initial noise of one generation, independent of batching and device.

    Args:
        shape: ``(C, h, w)`` latent shape.
        seed: Seed of a fresh CPU ``torch.Generator``.

    Returns:
        fp32 ``[1, C, h, w]`` standard normal noise on the CPU.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)


def image_size(pipe: Any, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The image size a pipeline generates: the given values, else its default for UNet or transformer denoisers.

    Args:
        pipe: A diffusers pipeline.
        height: Requested height in pixels, or ``None``.
        width: Requested width in pixels, or ``None``.

    Returns:
        ``(height, width)`` in pixels.
    """
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    default = getattr(pipe, "default_sample_size", None) or get_denoiser(pipe).config.get("sample_size") or 64
    dh, dw = (default, default) if isinstance(default, int) else (int(default[0]), int(default[1]))
    return int(height or dh * scale), int(width or dw * scale)


def latent_shape(pipe: Any, height: int, width: int) -> tuple[int, int, int]:
    """``(channels, latent_h, latent_w)`` of the pipeline's initial latents for an image of ``height x width``."""
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    channels = int(get_denoiser(pipe).config.get("in_channels"))
    return channels, height // scale, width // scale


def initial_latents(pipe: Any, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Initial noise for each seed, made on the CPU so that a seed gives the same noise on any device or batch.

    Returns:
        fp32 ``[len(seeds), C, h, w]`` on the CPU.
    """
    shape = latent_shape(pipe, height, width)
    return torch.cat([seed_noise(shape, s) for s in seeds])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (as pipelines return with ``output_type="np"``) to uint8."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _rows(tensor: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``tensor[index]``, or its single row repeated ``len(index)`` times."""
    if tensor.shape[0] == 1:
        return tensor.expand(len(index), *tensor.shape[1:])
    return tensor[index]


@torch.no_grad()
def generate_images(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    num_seeds: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "generate",
    *,
    prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    sampler: SamplerConfig | None = None,
) -> np.ndarray:
    """Generate ``num_seeds`` images for each prompt (or each conditioning); image ``j`` uses seed ``seed + j``.

    The result does not depend on ``batch_size``: each image's initial noise is drawn from its own seed.

    Args:
        pipe: A text-to-image pipeline that accepts ``latents=``.
        prompts: Prompts; or ``None`` with ``prompt_embeds``.
        num_seeds: Images per prompt.
        seed: First seed.
        batch_size: Images per pipeline call.
        progress: Show a progress bar.
        desc: Progress bar label.
        prompt_embeds: ``[P, L, D]`` text-encoder outputs used instead of prompts (the unconditional half is the
            empty prompt's, encoded by the pipeline).
        pooled_prompt_embeds: ``[P, D']`` pooled text embeddings that go with ``prompt_embeds`` on pipelines that
            take them (SDXL, SD3). Without explicit negatives such a pipeline makes its own unconditional half.
        negative_prompt_embeds: ``[1, L, D]`` or ``[P, L, D]`` conditioning of the unconditional half, instead of
            the empty prompt's.
        negative_pooled_prompt_embeds: ``[1, D']`` or ``[P, D']`` pooled embeddings of the unconditional half.
        sampler: The sampler settings (its ``call_kwargs(pipe)`` go to the pipeline); ``None``: the pipeline's
            own defaults.

    Returns:
        ``uint8 [P, num_seeds, H, W, 3]``.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise ConfigError("give exactly one of prompts or prompt_embeds")
    extras = {
        "pooled_prompt_embeds": pooled_prompt_embeds,
        "negative_prompt_embeds": negative_prompt_embeds,
        "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
    }
    if prompt_embeds is None and any(v is not None for v in extras.values()):
        given = ", ".join(k for k, v in extras.items() if v is not None)
        raise ConfigError(f"{given} need prompt_embeds, not prompts")
    if negative_pooled_prompt_embeds is not None and negative_prompt_embeds is None:
        raise ConfigError("negative_pooled_prompt_embeds needs negative_prompt_embeds")
    count = len(prompts) if prompts is not None else int(prompt_embeds.shape[0])
    for name in ("pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        value = extras[name]
        allowed = (count,) if name == "pooled_prompt_embeds" else (1, count)
        if value is not None and int(value.shape[0]) not in allowed:
            raise ConfigError(f"{name} has {int(value.shape[0])} rows; expected {' or '.join(map(str, allowed))}")
    call_kwargs = sampler.call_kwargs(pipe) if sampler is not None else pipeline_extras(pipe)
    height, width = image_size(pipe, call_kwargs.pop("height", None), call_kwargs.pop("width", None))
    jobs = [(i, seed + j) for i in range(count) for j in range(num_seeds)]
    out: list[np.ndarray] = []
    denoiser = get_denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress):
        chunk = jobs[start : start + batch_size]
        lat = initial_latents(pipe, [s for _, s in chunk], height, width).to(device, dtype)
        index = [i for i, _ in chunk]
        if prompts is not None:
            cond: dict[str, Any] = {"prompt": [prompts[i] for i in index]}
        else:
            cond = {"prompt_embeds": prompt_embeds[index].to(device, dtype)}
            masked = "prompt_attention_mask" in _call_parameters(pipe)
            if masked:  # PixArt: padded tokens are zero vectors; its own negatives come with their own mask
                cond["prompt_attention_mask"] = attention_mask_of(prompt_embeds[index]).to(device)
            if pooled_prompt_embeds is not None:
                cond["pooled_prompt_embeds"] = pooled_prompt_embeds[index].to(device, dtype)
            if negative_prompt_embeds is not None:
                cond["negative_prompt_embeds"] = _rows(negative_prompt_embeds, index).to(device, dtype)
                if negative_pooled_prompt_embeds is not None:
                    cond["negative_pooled_prompt_embeds"] = _rows(negative_pooled_prompt_embeds, index).to(
                        device, dtype
                    )
            elif pooled_prompt_embeds is None and not masked and call_kwargs.get("guidance_scale", 7.5) > 1:
                empty = pipe.encode_prompt([""], device, 1, False)[0]
                cond["negative_prompt_embeds"] = empty.expand(len(index), -1, -1).to(dtype)
        res = pipe(**cond, latents=lat, height=height, width=width, output_type="np", **call_kwargs).images
        out.append(to_uint8(res))
    imgs = np.concatenate(out) if out else np.zeros((0, height, width, 3), np.uint8)
    return imgs.reshape(count, num_seeds, *imgs.shape[1:])
