"""The ``record`` verb: run a pipeline over prompts (or precomputed prompt embeddings) in batches and return the
streamed FFN activation statistics of an :class:`~diffmem.recording.ActivationRecorder`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import RecordConfig
from ..errors import ConfigError, DiffmemError
from ..sampling import image_size, latent_shape, seed_noise
from ..stats import ActivationStats, prompts_sha256
from ..targets import get_denoiser, model_source
from .clock import call_pipeline
from .recorder import ActivationRecorder

logger = logging.getLogger(__name__)

__all__ = ["record"]


def _tensor_sha256(tensor: Tensor) -> str:
    """Hex sha256 of a tensor's dtype, shape and bytes (the ``prompts_sha256`` of precomputed conditionings).

    Args:
        tensor: Any tensor; it is copied to the CPU.

    Returns:
        The hex digest.
    """
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}\n".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()



def _named_parameters(pipe: Any) -> set[str]:
    """Names of the keyword arguments the pipeline's ``__call__`` declares (``**kwargs`` excluded)."""
    try:
        parameters = inspect.signature(pipe.__call__).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in kinds}


def _row_generator(seed: int, latents_given: bool) -> torch.Generator:
    """The CPU generator of one generation, for the random draws the pipeline makes itself.

    Args:
        seed: The generation's seed.
        latents_given: The initial noise comes from :func:`~diffmem.sampling.seed_noise` (seeded with ``seed``),
            so the generator (used for sampler noise only) gets a child seed that does not repeat that noise;
            otherwise it is seeded with ``seed`` and also draws the initial noise.

    Returns:
        A seeded ``torch.Generator`` on the CPU.
    """
    if not latents_given:
        return torch.Generator().manual_seed(int(seed))
    child = np.random.SeedSequence(int(seed) % 2**64, spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(child))


def _check_conditioning(
    prompts: Sequence[str] | None,
    prompt_embeds: Tensor | None,
    negative_prompt_embeds: Tensor | None,
    config: RecordConfig,
) -> tuple[list[str] | None, int, dict[str, Any]]:
    """Validate the prompts or embeddings given to :func:`record`.

    Returns:
        The prompts as a list (or ``None``), the number of conditionings ``P`` and their metadata.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise ConfigError("give exactly one of prompts or prompt_embeds")
    meta: dict[str, Any] = {}
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompts must be a non-empty list of strings")
        count = len(prompts)
        meta["prompts_sha256"] = prompts_sha256(prompts)
    else:
        if not isinstance(prompt_embeds, Tensor) or prompt_embeds.dim() != 3 or prompt_embeds.shape[0] < 1:
            shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, Tensor) else type(prompt_embeds).__name__
            raise ConfigError(f"prompt_embeds must be a [P, L, D] tensor with P >= 1, got {shape}")
        count = int(prompt_embeds.shape[0])
        meta["prompts_sha256"] = _tensor_sha256(prompt_embeds)
        meta["conditioning"] = "prompt_embeds"
    if negative_prompt_embeds is not None:
        if config.negative_prompt is not None:
            raise ConfigError("give config.negative_prompt or negative_prompt_embeds, not both")
        ok = isinstance(negative_prompt_embeds, Tensor) and negative_prompt_embeds.dim() == 3
        if not ok or int(negative_prompt_embeds.shape[0]) not in (1, count):
            shape = tuple(negative_prompt_embeds.shape) if isinstance(negative_prompt_embeds, Tensor) else None
            raise ConfigError(f"negative_prompt_embeds must be a [1 or {count}, L, D] tensor, got {shape}")
        meta["negative_prompt_embeds_sha256"] = _tensor_sha256(negative_prompt_embeds)
    return prompts, count, meta


def record(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    config: RecordConfig | None = None,
    *,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    stats: ActivationStats | None = None,
    progress: bool = True,
    model_id: str | None = None,
    pipe_kwargs: dict[str, Any] | None = None,
    cfg_call_order: tuple[str, str] = ("uncond", "cond"),
) -> ActivationStats:
    """Record FFN activation statistics of a text-to-image (or image-to-image) pipeline over prompts.

    Conditionings (prompts, or rows of ``prompt_embeds``) run in batches of ``config.batch_size``, each with
    ``config.num_seeds`` generations: generation ``j`` of every conditioning uses seed ``seed + j``, whatever the
    batching. When the pipeline takes ``latents``, its initial noise is :func:`~diffmem.sampling.seed_noise` of
    that seed; when it takes ``generator``, it gets one CPU generator per generation (seeded with the seed when the
    pipeline draws the initial noise itself, with a child seed otherwise), so that stochastic samplers (ancestral,
    SDE) are seeded too. A ``generator`` or ``latents`` in ``pipe_kwargs`` overrides these.

    Steps are sampler steps (see :class:`~diffmem.recording.ActivationRecorder`), counted from the first step the
    pipeline runs. Each call stops right after step ``record_steps - 1`` has made all its denoiser calls; no image is
    decoded.
    For an image-to-image pipeline pass ``image`` (and ``strength``) in ``pipe_kwargs``: it runs only the last
    ``int(num_inference_steps * strength)`` steps of its schedule, so ``record_steps`` must not exceed that.

    Args:
        pipe: A diffusers pipeline (Stable Diffusion text-to-image or image-to-image, PixArt, SD3, ...).
        prompts: Prompts, in order; or ``None`` with ``prompt_embeds``.
        config: Recording settings.
        prompt_embeds: ``[P, L, D]`` precomputed conditionings (text-encoder outputs, e.g. adversarially
            optimised ones) used instead of prompts. ``meta["prompts_sha256"]`` is then the sha256 of the tensor
            (dtype, shape and bytes) and ``meta["conditioning"]`` is ``"prompt_embeds"``.
        negative_prompt_embeds: ``[1, L, D]`` or ``[P, L, D]`` conditioning of the unconditional half, instead of
            the pipeline's encoding of ``config.negative_prompt`` (or of the empty prompt).
        stats: Existing statistics (e.g. of earlier shards) to merge the new ones into.
        progress: Show a tqdm bar over batches.
        model_id: Model id for the metadata (default: the pipeline's ``_name_or_path``).
        pipe_kwargs: Extra keyword arguments for every pipeline call.
        cfg_call_order: For pipelines that run the two CFG halves as two denoiser calls per step: the halves in
            call order (diffusers' convention is unconditional first).

    Returns:
        The statistics (``stats`` itself when given), on the CPU.

    Raises:
        DiffmemError: The pipeline ran fewer sampler steps than ``record_steps``, the CFG batch layout was
            ambiguous, or activations were not finite.
    """
    if isinstance(pipe, nn.Module):
        raise TypeError("record() needs a pipeline; drive a bare denoiser with ActivationRecorder instead")
    if config is None:
        raise TypeError("record() needs a RecordConfig (config=...)")
    prompts, count, conditioning_meta = _check_conditioning(prompts, prompt_embeds, negative_prompt_embeds, config)
    from .. import __version__

    denoiser = get_denoiser(pipe)
    accepted = _named_parameters(pipe)
    takes_latents = "latents" in accepted
    device = getattr(pipe, "_execution_device", None) or next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    seeds = [config.seed + k for k in range(config.num_seeds)]
    size: dict[str, int] = {}
    if takes_latents or "height" in accepted or "width" in accepted:
        height, width = image_size(pipe, config.sampler.height, config.sampler.width)
        size = {key: value for key, value in (("height", height), ("width", width)) if key in accepted}
    # the sampler's own arguments, with the size only where the pipeline takes one (image-to-image takes none)
    sampler_kwargs = {k: v for k, v in config.sampler.call_kwargs(pipe).items() if k not in ("height", "width")}
    noise = [seed_noise(latent_shape(pipe, height, width), s) for s in seeds] if takes_latents else []
    if not takes_latents and "generator" not in accepted:
        logger.warning("%s takes neither latents nor generator: its noise is not seeded", type(pipe).__name__)

    meta = {
        "model_id": model_id or model_source(pipe),
        **conditioning_meta,
        "num_prompts": count,
        "diffmem_version": __version__,
    }
    recorder = ActivationRecorder(pipe, config, num_prompts=count, meta=meta, cfg_call_order=cfg_call_order)
    batches = range(0, count, config.batch_size)
    logger.info(
        "recording %d layers over %d %s x %d seeds, %d of %d sampler steps",
        len(recorder.targets), count, "prompts" if prompts is not None else "conditionings", config.num_seeds,
        config.record_steps, config.sampler.num_inference_steps,
    )
    with recorder:
        for start in tqdm(batches, desc="record", unit="batch", disable=not progress):
            batch = list(range(start, min(start + config.batch_size, count)))
            index = [i for i in batch for _ in seeds]
            kwargs: dict[str, Any] = {**sampler_kwargs, "num_images_per_prompt": config.num_seeds,
                                      "output_type": "latent", **size}
            if prompts is not None:
                kwargs["prompt"] = [prompts[i] for i in batch]
            else:
                kwargs["prompt_embeds"] = prompt_embeds[batch[0] : batch[-1] + 1].to(device)
            if takes_latents:
                kwargs["latents"] = torch.cat([noise[k] for _ in batch for k in range(len(seeds))]).to(device, dtype)
            if "generator" in accepted:
                kwargs["generator"] = [_row_generator(s, takes_latents) for _ in batch for s in seeds]
            if config.negative_prompt is not None:
                kwargs["negative_prompt"] = [config.negative_prompt] * len(batch)
            if negative_prompt_embeds is not None:
                rows = negative_prompt_embeds
                rows = rows.expand(len(batch), -1, -1) if rows.shape[0] == 1 else rows[batch[0] : batch[-1] + 1]
                kwargs["negative_prompt_embeds"] = rows.to(device)
            kwargs.update(pipe_kwargs or {})
            recorder.start_batch(len(index), prompt_index=index)
            call_pipeline(pipe, kwargs)
            if recorder.steps_recorded < config.record_steps:
                strength = kwargs.get("strength")
                hint = f" (strength={strength} leaves fewer steps)" if strength is not None else ""
                raise DiffmemError(
                    f"the pipeline ran {recorder.steps_recorded} sampler steps, fewer than "
                    f"record_steps={config.record_steps}{hint}"
                )
    new = recorder.stats
    if config.do_cfg and "uncond" not in new.halves:
        logger.info("guidance_scale=%s but the pipeline ran without CFG; only the cond half was recorded",
                    config.sampler.guidance_scale)
    if stats is None:
        return new
    return stats.merge_(new)
