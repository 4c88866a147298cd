"""Finding DoRI's adversarial fine-tuning, on top of an edit: the published anchor of robust mitigation."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..data import ManifestEntry
from ..edits import Edit, WeightDelta
from ..errors import DiffmemError
from ..objective import encode_conditioning
from ..sampling import image_size
from ..targets import get_denoiser
from .config import MitigateConfig
from .rows import Rows, as_rows

logger = logging.getLogger(__name__)

__all__ = ["finetune_against"]


def _training_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "epsilon":
        return noise
    raise DiffmemError(f"fine-tuning supports epsilon and v-prediction schedulers, not {kind!r}")


@torch.no_grad()
def restore_weights(denoiser: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put every parameter back to its saved value, frozen, and the denoiser in eval mode (after a fine-tune)."""
    for n, p in denoiser.named_parameters():
        p.requires_grad_(False)
        p.copy_(originals[n])
    denoiser.eval()


def finetune_against(
    pipe: Any,
    edit: Edit,
    memorized: Rows | Sequence[ManifestEntry],
    adversarial: torch.Tensor,
    nonmem: Rows | Sequence[ManifestEntry] | None,
    config: MitigateConfig,
    *,
    progress: bool = True,
) -> WeightDelta:
    """Finding DoRI's adversarial fine-tuning on top of ``edit``; returns the combined change as a weight delta.

    Loss = denoising loss on the ``nonmem`` rows (their prompts and training images) + the mean squared distance
    between the fine-tuned prediction under each adversarial conditioning and the edited (frozen) model's
    prediction under the original prompt at the same noisy latent and timestep.

    Args:
        memorized: The memorized rows, one per adversarial conditioning (only their prompts are read).
        adversarial: The attacker's conditionings ``[N, L, D]``.
        nonmem: The ordinary rows with their training images (loaded :class:`Rows`, or manifest rows).
        config: The fine-tuning settings; the size of its sampler decides the reference size.
    """
    if not nonmem or any(e.reference is None for e in (nonmem.entries if isinstance(nonmem, Rows) else nonmem)):
        raise DiffmemError("robust fine-tuning needs 'nonmem' rows with reference images (the utility data)")
    size = image_size(pipe, config.sampler.height, config.sampler.width)
    nonmem = as_rows(nonmem, size, "robust fine-tuning")
    prompts = memorized.prompts if isinstance(memorized, Rows) else [e.prompt for e in memorized]
    denoiser = get_denoiser(pipe)
    device = denoiser.device
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    originals = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    with torch.no_grad():
        x_utility = nonmem.latents(pipe)
        c_utility = encode_conditioning(pipe, nonmem.prompts)[0].to(device)
        c_original = encode_conditioning(pipe, prompts)[0].to(device)
    adversarial = adversarial.to(device)
    g = torch.Generator().manual_seed(config.seed + 77)
    lat_shape = x_utility.shape[1:]
    try:
        edit.bake(pipe)  # fine-tune on top of the edit; the delta below is measured from the original weights
        frozen = copy.deepcopy(denoiser).requires_grad_(False).eval()  # the edited model: the surrogate target
        params = [p for p in denoiser.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=config.finetune_lr, weight_decay=0.0)
        denoiser.train()
        for _ in tqdm(range(config.finetune_steps), desc="finetune", disable=not progress):
            b = config.finetune_batch
            iu = torch.randint(0, len(nonmem), (b,), generator=g)
            noise = torch.randn((b, *lat_shape), generator=g).to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g).to(device)
            x0 = x_utility[iu].to(device)
            noisy = sched.add_noise(x0, noise, t)
            pred = denoiser(noisy, t, encoder_hidden_states=c_utility[iu]).sample
            loss_utility = torch.nn.functional.mse_loss(pred.float(), _training_target(sched, x0, noise, t).float())
            ia = torch.randint(0, len(prompts), (b,), generator=g)
            noise_a = torch.randn((b, *lat_shape), generator=g).to(device)
            ta = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g).to(device)
            noisy_a = sched.add_noise(x_utility[iu].to(device), noise_a, ta)  # any latent: the map must hold anywhere
            with torch.no_grad():
                surrogate = frozen(noisy_a, ta, encoder_hidden_states=c_original[ia]).sample
            pred_a = denoiser(noisy_a, ta, encoder_hidden_states=adversarial[ia]).sample
            loss_adv = torch.nn.functional.mse_loss(pred_a.float(), surrogate.float())
            opt.zero_grad()
            (loss_utility + loss_adv).backward()
            opt.step()
        denoiser.eval()
        delta = WeightDelta.between(originals, pipe, meta={"method": "adversarial-finetune", "base_edit": edit.kind})
    finally:
        restore_weights(denoiser, originals)
    logger.info("adversarial fine-tuning: %d weights changed (on top of a %s)", delta.num_params_changed(), edit.kind)
    return delta
