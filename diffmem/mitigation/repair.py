"""Repair after a deletion: a short distillation of the edited denoiser toward the unedited one on ordinary rows.

A prune that deletes memorized images also moves some ordinary prompts' images further than a change of seed
would. :func:`repair_edit` fine-tunes the weights that the edit left in place so that, on ordinary prompts (and the
empty prompt, the unconditional half of classifier-free guidance) at noisy versions of ordinary training images,
the edited denoiser predicts what the unedited one predicts:

    min  E_{row, t, noise} || f_edited(x_t, t, c_row) - f_unedited(x_t, t, c_row) ||²

The target is the unedited model's own output for ordinary captions, so no memorized image or prompt enters it;
every weight the edit zeroed stays zero (its gradient is masked and it is reset after each step). Which parameters
train is ``scope``: those the edit changed (default), or every parameter of the denoiser.

Matching the unedited model's function on ordinary rows can rebuild what the deletion removed elsewhere: the
unedited model's answers carry its memorization implicitly (measured in docs/mitigation.md). ``deleted`` rows (the
given memorized rows with their training images) add a second term that holds the repaired model, at their noisy
images under their prompts and under random conditionings, to the *edited* model's predictions:

    + w · E_{row, t, noise, c} || f_repaired(x_t, t, c) - f_edited(x_t, t, c) ||²
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..edits import Edit, WeightDelta
from ..errors import DiffmemError
from ..objective import denoiser_call, encode_conditioning, initial_conditioning
from ..reextraction import ReextractConfig
from ..targets import get_denoiser
from .finetune import restore_weights
from .rows import Rows
from .strength import _mean

logger = logging.getLogger(__name__)

__all__ = ["REPAIR_SCOPES", "repair_edit"]

REPAIR_SCOPES = ("edited", "all")


def repair_edit(
    pipe: Any,
    edit: Edit,
    ordinary: Rows,
    *,
    steps: int = 200,
    lr: float = 1e-4,
    batch: int = 8,
    uncond_share: float = 0.2,
    scope: str = "edited",
    deleted: Rows | None = None,
    deleted_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> WeightDelta:
    """``edit`` followed by a distillation toward the unedited model on ``ordinary`` rows (module docstring).

    Args:
        pipe: The pipeline, unedited (unchanged on return).
        edit: The deletion to repair (baked first; its zeros stay zero).
        ordinary: Ordinary rows with their training images (the ``nonmem`` rows): their prompts and noisy images are
            where the edited model is pulled back to the unedited one.
        steps: Optimiser steps (Adam).
        lr: Learning rate.
        batch: Rows a step.
        uncond_share: Share of each batch conditioned on the empty prompt instead of its caption.
        scope: ``"edited"``: only the parameters the edit changed train; ``"all"``: every denoiser parameter.
        deleted: Memorized rows with their training images, held at the edited model's predictions (half of their
            draws under the prompt, half under a random conditioning).
        deleted_weight: ``w``, the weight of that term.
        seed: Seed of the rows, timesteps and noise drawn.

    Returns:
        The combined change (the edit and the repair) as a :class:`~diffmem.edits.WeightDelta`.
    """
    if scope not in REPAIR_SCOPES:
        raise DiffmemError(f"repair: scope={scope!r} is invalid: choose one of {', '.join(REPAIR_SCOPES)}")
    if steps < 1 or batch < 1 or not lr > 0 or not 0 <= uncond_share <= 1:
        raise DiffmemError(f"repair: steps={steps}, batch={batch}, lr={lr}, uncond_share={uncond_share} is invalid: "
                           "steps and batch must be >= 1, lr > 0, uncond_share in [0, 1]")
    if not deleted_weight >= 0:
        raise DiffmemError(f"repair: deleted_weight={deleted_weight} is invalid: it must be >= 0")
    if not len(ordinary):
        raise DiffmemError("repair needs ordinary ('nonmem') rows with their training images")
    denoiser = get_denoiser(pipe)
    device = denoiser.device
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    height, width = ordinary.pixels[0].shape[:2]
    predict = denoiser_call(pipe, height, width)
    originals = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    with torch.no_grad():
        x0_all = ordinary.latents(pipe).to(device)
        cond, pooled = encode_conditioning(pipe, ordinary.prompts)
        empty, empty_pooled = encode_conditioning(pipe, [""])
        if deleted is not None and len(deleted):
            x0_del = deleted.latents(pipe).to(device)
            c_del, p_del = encode_conditioning(pipe, deleted.prompts)
            r_del, rp_del = initial_conditioning(pipe, deleted.prompts, ReextractConfig(init="random", seed=seed + 1))
            c_del = torch.cat([c_del, r_del]).to(device)
            p_del = None if p_del is None else torch.cat([p_del, rp_del]).to(device)
            x0_del = torch.cat([x0_del, x0_del])
    cond, empty = cond.to(device), empty.to(device)
    teacher = copy.deepcopy(denoiser).requires_grad_(False).eval()  # the unedited model
    teacher_predict = denoiser_call(teacher, height, width)
    g = torch.Generator().manual_seed(seed)
    try:
        edit.bake(pipe)
        held_predict = None
        if deleted is not None and len(deleted):  # the edited model's predictions hold the deleted rows
            held_predict = denoiser_call(copy.deepcopy(denoiser).requires_grad_(False).eval(), height, width)
        names = [n for n, p in denoiser.named_parameters()
                 if scope == "all" or not torch.equal(p.detach(), originals[n])]
        if not names:
            raise DiffmemError("repair: the edit changes no parameter of the denoiser (nothing to repair)")
        params = dict(denoiser.named_parameters())
        zeroed = {n: (params[n].detach() == 0) & (originals[n] != 0) for n in names}
        for p in denoiser.parameters():
            p.requires_grad_(False)
        train = [params[n].requires_grad_(True) for n in names]
        opt = torch.optim.Adam(train, lr=lr)
        denoiser.train()
        losses = []
        for _ in tqdm(range(steps), desc="repair", disable=not progress):
            idx = torch.randint(0, len(ordinary), (batch,), generator=g)
            noise = torch.randn((batch, *x0_all.shape[1:]), generator=g).to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g).to(device)
            blank = (torch.rand(batch, generator=g) < uncond_share).to(device)
            c = torch.where(blank[:, None, None], empty.expand(batch, -1, -1), cond[idx.to(device)])
            pool = None
            if pooled is not None:
                pool = torch.where(blank[:, None], empty_pooled.to(device).expand(batch, -1), pooled.to(device)[idx])
            noisy = sched.add_noise(x0_all[idx.to(device)], noise, t)
            with torch.no_grad():
                target = teacher_predict(noisy, t, c, pool)
            loss = torch.nn.functional.mse_loss(predict(noisy, t, c, pool).float(), target.float())
            if held_predict is not None:
                jd = torch.randint(0, len(x0_del), (batch,), generator=g).to(device)
                noise_d = torch.randn((batch, *x0_del.shape[1:]), generator=g).to(device)
                t_d = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g).to(device)
                noisy_d = sched.add_noise(x0_del[jd], noise_d, t_d)
                pool_d = None if p_del is None else p_del[jd]
                with torch.no_grad():
                    target_d = held_predict(noisy_d, t_d, c_del[jd], pool_d)
                loss = loss + deleted_weight * torch.nn.functional.mse_loss(
                    predict(noisy_d, t_d, c_del[jd], pool_d).float(), target_d.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for n in names:
                if params[n].grad is not None:
                    params[n].grad.masked_fill_(zeroed[n], 0)
            opt.step()
            with torch.no_grad():
                for n in names:
                    params[n].masked_fill_(zeroed[n], 0)
            losses.append(float(loss.detach()))
        denoiser.eval()
        meta = {"method": "repair", "base_edit": edit.kind, "steps": steps, "lr": lr, "batch": batch, "scope": scope,
                "uncond_share": uncond_share, "rows": len(ordinary),
                "deleted_rows": len(deleted) if deleted is not None else 0, "deleted_weight": deleted_weight,
                "loss_first": _mean(losses[: max(1, steps // 10)]), "loss_last": _mean(losses[-max(1, steps // 10):])}
        delta = WeightDelta.between(originals, pipe, meta=meta)
    finally:
        restore_weights(denoiser, originals)
    logger.info("repair: %d steps on %d ordinary rows (%d deleted rows held), loss %.4g -> %.4g, %d weights "
                "changed", steps, len(ordinary), meta["deleted_rows"], meta["loss_first"], meta["loss_last"],
                delta.num_params_changed())
    return delta

