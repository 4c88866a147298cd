"""The frozen model's side of re-extraction: its conditioning, its training objective and its denoiser call.

The re-extraction attack (:mod:`diffmem.reextraction`) and the robust mitigation (:mod:`diffmem.mitigation`) both
work on a frozen pipeline through the same pieces:

* the conditioning the denoiser's cross-attention consumes: :func:`encode_conditioning` (the text encoder's output,
  plus the pooled embedding on SDXL/SD3) and the attack's starting point, :func:`initial_conditioning`;
* the training latent of an image, :func:`encode_reference` (the VAE posterior mean, shifted and scaled);
* the model's training objective, :class:`DiffusionObjective` (noisy latents, timesteps and targets from the
  scheduler's config), and :func:`conditioning_loss`, that objective for one conditioning on fixed draws;
* the denoiser as a function ``(x_t, t, cond, pooled) -> prediction``, :func:`denoiser_call` (UNet, SD3 and PixArt
  transformers);
* ``_frozen``, which freezes every weight of the pipeline for the duration of an optimisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .errors import DiffmemError
from .sampling import attention_mask_of
from .targets import get_denoiser

if TYPE_CHECKING:
    from .reextraction import ReextractConfig

__all__ = [
    "initial_conditioning",
    "encode_conditioning",
    "encode_reference",
    "conditioning_loss",
    "DiffusionObjective",
    "denoiser_call",
]


# ----------------------------------------------------------------------------------------------------------------
# Freezing the pipeline


def _components(pipe: Any) -> list[nn.Module]:
    comps = getattr(pipe, "components", None)
    if isinstance(comps, dict):
        mods = [m for m in comps.values() if isinstance(m, nn.Module)]
    else:
        mods = []
    denoiser = get_denoiser(pipe)
    if not any(m is denoiser for m in mods):
        mods.append(denoiser)
    return mods


@contextmanager
def _frozen(pipe: Any) -> Iterator[None]:
    """Freeze every parameter of the pipeline's modules and put them in eval mode; restore both on exit."""
    saved: list[tuple[torch.nn.Parameter, bool]] = []
    modes: list[tuple[nn.Module, bool]] = []
    seen: set[int] = set()
    for module in _components(pipe):
        for sub in module.modules():
            modes.append((sub, sub.training))
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                saved.append((p, p.requires_grad))
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for module in _components(pipe):
            module.eval()
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for sub, mode in modes:
            sub.training = mode


# ----------------------------------------------------------------------------------------------------------------
# Encoders


def _is_pixart(pipe: Any) -> bool:
    """Whether the denoiser is a PixArt transformer (T5 conditioning with an attention mask)."""
    return type(get_denoiser(pipe)).__name__ == "PixArtTransformer2DModel"


def _has_pooled(pipe: Any) -> bool:
    """Whether the pipeline's denoiser consumes a pooled text embedding (SDXL, SD3)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    denoiser = get_denoiser(pipe)
    if isinstance(denoiser, SD3Transformer2DModel):
        return True
    return isinstance(denoiser, UNet2DConditionModel) and denoiser.config.get("addition_embed_type") == "text_time"


@torch.no_grad()
def encode_conditioning(pipe: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text-encoder outputs of prompts, as the pipeline computes them for sampling.

    Args:
        pipe: A diffusers text-to-image pipeline with ``encode_prompt``.
        prompts: The prompts.

    Returns:
        fp32 ``[P, L, D]`` conditioning and fp32 ``[P, D']`` pooled embeddings (``None`` when the pipeline has
        none), on the CPU.
    """
    device = get_denoiser(pipe).device
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {"device": device, "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    for extra in ("prompt_2", "prompt_3"):
        if extra in params:
            kwargs[extra] = None
    out = pipe.encode_prompt(prompt=list(prompts), **kwargs)
    embeds = out[0].detach().float().cpu()
    if _is_pixart(pipe):  # padded tokens become zero vectors: the mask travels inside the conditioning
        embeds = embeds * out[1].detach().float().cpu()[..., None]
    pooled = out[2].detach().float().cpu() if _has_pooled(pipe) and len(out) >= 3 and out[2] is not None else None
    return embeds, pooled


def _random_like(reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian directions scaled to ``reference``'s norm along the last axis (per token, or per pooled vector)."""
    z = torch.randn(reference.shape, generator=generator, dtype=torch.float32)
    norms = reference.float().norm(dim=-1, keepdim=True)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norms


def initial_conditioning(
    pipe: Any, prompts: Sequence[str], config: ReextractConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starting conditioning of each prompt under ``config.init``.

    Args:
        pipe: The pipeline.
        prompts: One prompt per row.
        config: The attack settings (``init`` and ``seed`` are used).

    Returns:
        fp32 ``[P, L, D]`` starts and ``[P, D']`` pooled starts (``None`` without pooled embeddings), on the CPU.
        A random start of row ``i`` is drawn from seed ``config.seed + i``.
    """
    other = config.init_prompt
    if other is not None:
        embeds, pooled = encode_conditioning(pipe, [other])
        count = len(prompts)
        return embeds.expand(count, -1, -1).clone(), None if pooled is None else pooled.expand(count, -1).clone()
    embeds, pooled = encode_conditioning(pipe, prompts)
    if config.init == "random":
        rand_e, rand_p = [], []
        for i in range(len(prompts)):
            gen = torch.Generator().manual_seed(config.seed + i)
            rand_e.append(_random_like(embeds[i : i + 1], gen))
            if pooled is not None:
                rand_p.append(_random_like(pooled[i : i + 1], gen))
        embeds = torch.cat(rand_e)
        pooled = torch.cat(rand_p) if pooled is not None else None
    return embeds, pooled


@torch.no_grad()
def encode_reference(pipe: Any, reference: np.ndarray) -> torch.Tensor:
    """The training latent of an image: the VAE posterior mean, shifted and scaled as diffusers' training does.

    Args:
        pipe: A pipeline with a ``vae``.
        reference: uint8 ``[H, W, 3]`` image, sides divisible by the VAE's scale factor.

    Returns:
        ``[1, C, H / f, W / f]`` latent on the VAE's device, fp32.

    Raises:
        DiffmemError: The image is not uint8 RGB or its size does not fit the VAE.
    """
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise DiffmemError(f"{type(pipe).__name__} has no vae to encode the reference image with")
    if not isinstance(reference, np.ndarray) or reference.dtype != np.uint8 or reference.ndim != 3:
        raise DiffmemError(f"reference must be a uint8 [H, W, 3] array, got {getattr(reference, 'shape', reference)}")
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    h, w = reference.shape[:2]
    if h % scale or w % scale:
        raise DiffmemError(f"reference of {h}x{w} px does not fit the VAE: sides must be multiples of {scale}")
    x = torch.from_numpy(np.array(reference, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    param = next(vae.parameters())
    latent = vae.encode(x.to(param.device, param.dtype)).latent_dist.mean.float()
    shift = vae.config.get("shift_factor", None)
    if shift is not None:
        latent = latent - float(shift)
    latent = latent * float(vae.config.get("scaling_factor", 1.0))
    if not torch.isfinite(latent).all():
        raise DiffmemError(f"the VAE ({param.dtype}) encodes the reference to non-finite values; use an fp32 VAE")
    return latent


# ----------------------------------------------------------------------------------------------------------------
# The training objective and the denoiser call


_Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(noisy latents, timesteps, conditioning, pooled or None) -> the denoiser's prediction``."""


class DiffusionObjective:
    """Noisy latents, targets and timesteps of the model's training objective, from the pipeline scheduler's config.

    DDPM-family schedules (``epsilon``, ``v_prediction``, ``sample``; any beta schedule, zero-terminal-SNR rescaling)
    use :class:`diffusers.DDPMScheduler`; flow-matching pipelines (SD3) use
    :class:`diffusers.FlowMatchEulerDiscreteScheduler`'s training sigmas with ``x_t = (1 - s) x0 + s noise`` and
    target ``noise - x0``.
    """

    def __init__(self, pipe: Any) -> None:
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        config = pipe.scheduler.config
        name = type(pipe.scheduler).__name__
        self.flow = name.startswith("FlowMatch")
        if self.flow:
            sched = FlowMatchEulerDiscreteScheduler.from_config(config)
            self.sigmas = sched.sigmas.float()[: len(sched.timesteps)]
            self.timesteps = sched.timesteps.float()
            self.prediction_type = "flow"
            self.num = len(self.timesteps)
        else:
            self.sched = DDPMScheduler.from_config(config)
            self.prediction_type = self.sched.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise DiffmemError(f"scheduler {name} predicts {self.prediction_type!r}; re-extraction supports "
                                   "epsilon, v_prediction, sample and flow matching")
            self.num = int(self.sched.config.num_train_timesteps)

    def draw(
        self, x0: torch.Tensor, batch: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh noise and uniform timesteps for ``batch`` copies of ``x0``.

        Returns:
            ``(noisy latents, timesteps for the denoiser, target)`` on ``x0``'s device, fp32.
        """
        shape = (batch, *x0.shape[1:])
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(x0.device)
        idx = torch.randint(0, self.num, (batch,), generator=generator)
        x0 = x0.float().expand(shape)
        if self.flow:
            s = self.sigmas[idx].to(x0.device).view(-1, 1, 1, 1)
            return (1.0 - s) * x0 + s * noise, self.timesteps[idx].to(x0.device), noise - x0
        t = idx.to(x0.device)
        noisy = self.sched.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.sched.get_velocity(x0, noise, t)
        else:
            target = x0
        return noisy, t, target


def denoiser_call(pipe: Any, height: int, width: int) -> _Predict:
    """A function ``(x_t, t, cond, pooled) -> prediction`` for the pipeline's denoiser."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    denoiser = get_denoiser(pipe)
    in_channels = int(denoiser.config.get("in_channels"))

    def first_half(pred: torch.Tensor) -> torch.Tensor:
        # learned-variance models predict [mean; variance]; the training loss is on the first half
        return pred[:, :in_channels] if pred.shape[1] == 2 * in_channels else pred

    if isinstance(denoiser, UNet2DConditionModel):
        kind = denoiser.config.get("addition_embed_type")
        if kind not in (None, "text_time"):
            raise DiffmemError(f"re-extraction does not support UNet addition_embed_type={kind!r}")

        def unet(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
            added = None
            if kind == "text_time":
                if pooled is None:
                    raise DiffmemError("this UNet (SDXL) needs pooled embeddings; pass pooled=")
                ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=x.dtype, device=x.device)
                added = {"text_embeds": pooled, "time_ids": ids.expand(x.shape[0], -1)}
            return first_half(denoiser(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample)

        return unet
    if isinstance(denoiser, SD3Transformer2DModel):

        def transformer(
            x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None
        ) -> torch.Tensor:
            if pooled is None:
                raise DiffmemError("this transformer (SD3) needs pooled embeddings; pass pooled=")
            out = denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond, pooled_projections=pooled)
            return first_half(out.sample)

        return transformer
    if _is_pixart(pipe):

        def pixart(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
            # zero tokens are padding: masked out, so they get no gradient and stay zero under Adam
            out = denoiser(x, encoder_hidden_states=cond, encoder_attention_mask=attention_mask_of(cond),
                           timestep=t.expand(x.shape[0]) if t.dim() == 0 else t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None})
            return first_half(out.sample)

        return pixart
    name = type(denoiser).__name__
    raise DiffmemError(f"re-extraction supports UNet2DConditionModel, SD3Transformer2DModel and "
                       f"PixArtTransformer2DModel denoisers, not {name}")


@torch.no_grad()
def conditioning_loss(
    pipe: Any,
    reference: np.ndarray,
    embeds: torch.Tensor,
    *,
    pooled: torch.Tensor | None = None,
    num_draws: int = 64,
    seed: int = 1234,
    batch: int = 16,
) -> torch.Tensor:
    """The training loss of one conditioning toward an image, on a fixed set of noises and timesteps.

    With the same ``seed`` two conditionings are compared on identical draws, so the paired difference of their
    losses measures the change without the noise of fresh draws.

    Args:
        pipe: The pipeline (as left by the caller).
        reference: uint8 ``[H, W, 3]`` training image.
        embeds: Conditioning ``[1, L, D]``.
        pooled: Pooled embedding ``[1, D']`` when the pipeline uses one.
        num_draws: Noise/timestep draws.
        seed: Seed of the draws.
        batch: Draws per forward pass.

    Returns:
        fp32 ``[num_draws]`` per-draw MSE on the CPU.
    """
    denoiser = get_denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    if embeds.ndim == 2:
        embeds = embeds[None]
    if pooled is not None and pooled.ndim == 1:
        pooled = pooled[None]
    predict = denoiser_call(pipe, *reference.shape[:2])
    objective = DiffusionObjective(pipe)
    x0 = encode_reference(pipe, reference).to(device)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num_draws, batch):
        n = min(batch, num_draws - start)
        noisy, t, target = objective.draw(x0, n, generator)
        c = embeds.to(device, dtype).expand(n, -1, -1)
        p = None if pooled is None else pooled.to(device, dtype).expand(n, -1)
        pred = predict(noisy.to(dtype), t, c, p).float()
        out.append((pred - target).pow(2).flatten(1).mean(1).cpu())
    return torch.cat(out)
