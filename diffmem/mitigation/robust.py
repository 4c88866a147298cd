"""The robust rounds: attack the given rows from every start, then zero what carries them (or fine-tune), until
the attack fails at every sampler."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..config import RecordConfig, SamplerConfig
from ..crossfit import any_start, attack_from_starts, sampler_variants
from ..edits import Edit, Mask, apply_edit, mask_iou
from ..errors import DiffmemError
from ..localization import locate
from ..objective import DiffusionObjective, denoiser_call, encode_conditioning
from ..recording import record
from ..sampling import image_size
from ..targets import get_denoiser
from .config import MitigateConfig
from .finetune import finetune_against
from .rows import Rows
from .strength import QualityGate, locate_config

logger = logging.getLogger(__name__)

__all__ = ["harden"]


def harden(pipe: Any, edit: Edit, rows: Rows, nonmem: Rows | None, base: list[str], rcfg: RecordConfig,
           strength: float, config: MitigateConfig, scorer: Any, progress: bool,
           gate: QualityGate | None = None) -> tuple[Edit, list[dict[str, Any]], torch.Tensor | None]:
    """The robust rounds: attack ``rows`` from every start, locate again (or fine-tune), until the attack fails.

    With ``gate`` (and ``config.robust_gate``), every round's edit is checked against the strength sweep's quality
    vetoes: the memorized prompts still render plausibly (KID to ordinary generations) and the ordinary prompts'
    drift stays within the seed spread. A saliency round that breaks them is shrunk (its addition halved, up to
    ``config.robust_shrinks`` times); when every size breaks them the smallest is kept, since dropping the round
    would leave memorized images extractable (on the DiT member, dropping it left 0.21 of the held-out images
    re-extractable while the out-of-fold estimate said 0.00).

    Args:
        rows: The memorized rows, loaded (their references are the attack's targets).
        nonmem: The ordinary rows, loaded (what a saliency round or the fine-tuning must keep); ``None`` only with
            ``robust_score="activations"``.
        gate: The quality vetoes of the same ``locate`` rows as ``rows`` (:class:`~.strength.QualityGate`).

    Returns:
        The hardened edit, one record per round, and the first round's adversarial conditionings (prompt start).
    """
    items = rows.items("memorized")
    samplers = sampler_variants(config.sampler, tuple(config.robust_samplers), pipe)
    rounds: list[dict[str, Any]] = []
    first_adversarial: torch.Tensor | None = None
    gate = gate if config.robust_gate else None
    quality = gate.measure(pipe, edit) if gate is not None else None
    for k in range(config.max_rounds + 1):
        rates, embeds = _attack_all(pipe, edit, items, config, samplers, scorer, k, progress)
        worst = max(rates.values())
        info: dict[str, Any] = {"round": k, "attack_rate_before_round": worst, "attack_rate_by_sampler": rates,
                                "parameters_changed": edit.num_params_changed()}
        rounds.append(info)
        logger.info("robust round %d: attack rate on the given rows %s", k,
                    ", ".join(f"{n} {r:.3f}" for n, r in rates.items()))
        if (worst <= config.target and k >= config.min_rounds) or k == config.max_rounds:
            break
        if first_adversarial is None:
            first_adversarial = embeds[: len(items)]  # the prompt start's conditionings on the plain edit
        times = embeds.shape[0] // len(rows)
        if config.robust == "prune" and config.robust_score == "saliency":
            scores = _saliency_scores(pipe, edit, rows, times, embeds, nonmem, config)
            sizes = config.robust_shrinks + 1 if gate is not None else 1
            fractions = [config.robust_fraction / 2**j for j in range(sizes)]
            candidates: Iterable[tuple[float | None, Edit]] = ((f, _grow(edit, scores, f)) for f in fractions)
        elif config.robust == "prune":
            candidates = [(None, _prune_round(pipe, edit, embeds, base, rcfg, strength, config, progress))]
        else:
            memorized = rows.subset(list(range(len(rows))) * times)
            candidates = [(None, finetune_against(pipe, edit, memorized, embeds, nonmem, config, progress=progress))]
        accepted = row = None
        for fraction, candidate in candidates:
            if fraction is not None:
                info["fraction_added"] = fraction
            accepted = candidate
            if gate is None:
                break
            row = gate.measure(pipe, candidate)
            info["quality"] = _quality_summary(row)
            if gate.holds(row, quality):
                info["gate"] = "passed"
                break
            logger.info("robust round %d: the edit%s breaks the quality vetoes (memorized prompts' KID %s, drift "
                        "within spread %s)", k, f" adding {fraction:g} of the weights" if fraction else "",
                        info["quality"].get("memorized_kid"), info["quality"].get("drift_within_spread"))
        else:
            if gate is not None:
                info["gate"] = "kept the smallest: broke the vetoes at every size"
                logger.warning("robust round %d breaks the quality vetoes at every size tried: the smallest is kept "
                               "(deleting the memorized images comes first)", k)
        assert accepted is not None
        edit = accepted
        if row is not None:
            quality = row
        info["parameters_changed_after"] = edit.num_params_changed()
    return edit, rounds, first_adversarial


def _quality_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The gate's figures of one candidate, for the round's record."""
    becomes = row.get("memorized_becomes") or {}
    return {"memorized_kid": becomes.get("kid_mean"), "memorized_kid_std": becomes.get("kid_std"),
            "drift_within_spread": row.get("drift_within_spread"), "drift_similarity": row.get("drift_similarity"),
            "locate_replication": row.get("locate_replication"), "plausible": row.get("plausible"),
            "passes": row.get("passes")}


def _attack_all(pipe: Any, edit: Edit, items: list, config: MitigateConfig, samplers: dict[str, SamplerConfig],
                scorer: Any, round_index: int, progress: bool) -> tuple[dict[str, float], torch.Tensor]:
    """Attack every item from every start; the rate (any start succeeding) at each sampler, and the conditionings."""
    first = next(iter(samplers.values()))
    configs = {init: replace(config.attack, init=init, seed=config.attack.seed + 1000 * round_index + 100 * j,
                             sampler=first)
               for j, init in enumerate(config.attack_inits)}
    success, found = attack_from_starts(pipe, edit, items, configs, samplers, scorer, progress=progress)
    rates = {n: float(np.mean(s)) for n, s in any_start(success).items()}
    return rates, torch.cat([found[init] for init in configs])


def _prune_round(pipe: Any, edit: Edit, embeds: torch.Tensor, base: list[str], rcfg: RecordConfig,
                 strength: float, config: MitigateConfig, progress: bool) -> Edit:
    """Record under the adversarial conditionings on the edited model, locate again, merge the new mask."""
    with apply_edit(pipe, edit):
        stats_adv = record(pipe, None, rcfg, prompt_embeds=embeds, progress=progress)
        stats_base = record(pipe, base, rcfg, progress=progress)
        new = locate(pipe, stats_adv, stats_base, locate_config(config.method, strength, config.record_steps))
    assert isinstance(edit, Mask) and isinstance(new, Mask)
    merged = edit.union(new)
    logger.info("robust prune: %d new weights (IoU with the edit %.3f)", merged.num_masked() - edit.num_masked(),
                mask_iou(edit, new)["overall"])
    return merged


def _loss_gradients(pipe: Any, x0: torch.Tensor, cond: torch.Tensor, params: dict[str, torch.Tensor],
                    draws: int, seed: int,
                    each: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
    """Gradient of the summed per-image training loss toward ``x0`` under ``cond`` for each parameter.

    With ``each``, every image's own gradients are also passed to it (before they are summed).
    """
    objective = DiffusionObjective(pipe)
    predict = denoiser_call(pipe, *image_size(pipe))
    dtype = get_denoiser(pipe).dtype
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for i in range(x0.shape[0]):
            noisy, t, target = objective.draw(x0[i : i + 1], draws, generator)
            pred = predict(noisy.to(dtype), t, cond[i : i + 1].to(dtype).expand(draws, -1, -1), None)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            own = {n: g.float() for n, g in zip(params, torch.autograd.grad(loss, list(params.values())))}
            for n, g in own.items():
                grads[n] += g
            if each is not None:
                each(own)
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return grads


def _saliency_scores(pipe: Any, edit: Edit, rows: Rows, times: int, adversarial: torch.Tensor,
                     nonmem: Rows | None, config: MitigateConfig) -> dict[str, torch.Tensor]:
    """Score every denoiser weight by how much zeroing it removes the memorized images under the attacker's
    conditionings, and little else (weights already masked score ``-inf``).

    With the edit applied, the first-order change of the training loss when a weight ``w`` is zeroed is
    ``-w * dL/dw``. A weight scores ``-w * dL_mem/dw - lambda * |w * dL_non/dw|``: ``L_mem`` is the loss toward the
    memorized training images under their adversarial conditionings, ``L_non`` the loss of the ``nonmem`` rows
    under their own prompts. ``adversarial`` holds ``times`` conditionings per row (one per attack start, in order).
    """
    if not isinstance(edit, Mask):
        raise DiffmemError("robust pruning merges masks: the edit must be a mask")
    if not nonmem:
        raise DiffmemError("robust pruning needs 'nonmem' rows with reference images (what must be kept)")
    denoiser = get_denoiser(pipe)
    params = {n[: -len(".weight")]: p for n, p in denoiser.named_parameters() if n.endswith(".weight") and p.dim() >= 2}
    device = denoiser.device
    with edit.apply(pipe), torch.enable_grad():
        with torch.no_grad():
            x_mem = rows.latents(pipe).repeat(times, 1, 1, 1)
            x_non = nonmem.latents(pipe)
            c_non = encode_conditioning(pipe, nonmem.prompts)[0]
        weights = {n: p.detach().float() for n, p in params.items()}
        shared = _SharedSaliency(weights) if config.robust_aggregate == "shared" else None
        g_mem = _loss_gradients(pipe, x_mem.to(device), adversarial.to(device), params, 16, config.seed + 11,
                                each=shared)
        g_non = _loss_gradients(pipe, x_non.to(device), c_non.to(device), params, 16, config.seed + 13)
        scores = {}
        for n, w in weights.items():
            if shared is not None:
                score = shared.score(n, config.robust_share) - config.robust_lambda * (w * g_non[n]).abs() / shared.scale
            else:
                score = -(w * g_mem[n]) - config.robust_lambda * (w * g_non[n]).abs()
            if n in edit.layers:
                score[edit.layers[n].to(score.device)] = float("-inf")
            scores[n] = score.cpu()
    return scores


def _grow(edit: Edit, scores: dict[str, torch.Tensor], fraction: float) -> Mask:
    """The edit with the top ``fraction`` of all scored weights (those with a positive score) masked too."""
    if not isinstance(edit, Mask):
        raise DiffmemError("robust pruning merges masks: the edit must be a mask")
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, int(fraction * flat.numel()))
    threshold = torch.topk(flat, k).values.min()
    new = Mask({n: (s >= threshold) & (s > 0) for n, s in scores.items()}, meta={"method": "saliency"})
    new = Mask({n: m for n, m in new.layers.items() if bool(m.any())}, meta=new.meta)
    merged = edit.union(new)
    merged.meta = {**edit.meta, "robust_rounds": int(edit.meta.get("robust_rounds", 0)) + 1}
    logger.info("robust prune (saliency): %d weights added in %d tensors", new.num_masked(), len(new.layers))
    return merged


class _SharedSaliency:
    """Per-term saliency ``-w * dL_i/dw``, each term normalised by its own spread, summed, with a count of the terms
    for which zeroing the weight raises the loss: weights that many (image, conditioning) terms share."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.total = {n: torch.zeros_like(w) for n, w in weights.items()}
        self.positive = {n: torch.zeros_like(w) for n, w in weights.items()}
        self.scales: list[float] = []

    def __call__(self, grads: dict[str, torch.Tensor]) -> None:
        scores = {n: -(self.weights[n] * g) for n, g in grads.items()}
        scale = float(torch.cat([s.flatten() for s in scores.values()]).std().clamp_min(1e-20))
        self.scales.append(scale)
        for n, s in scores.items():
            self.total[n] += s / scale
            self.positive[n] += (s > 0).float()

    @property
    def scale(self) -> float:
        """The mean spread of a term: converts unnormalised saliency into the summed units."""
        return float(np.mean(self.scales)) if self.scales else 1.0

    def score(self, name: str, share: float) -> torch.Tensor:
        """Summed normalised saliency, ``-inf`` where fewer than ``share`` of the terms agree."""
        need = share * max(len(self.scales), 1)
        out = self.total[name].clone()
        out[self.positive[name] < need] = float("-inf")
        return out
