"""Mitigation that survives re-extraction: locate an edit, tune its strength, and harden it against the attack.

:func:`mitigate` uses only the ``locate`` rows (memorized prompts with their training images) and the ``nonmem``
rows (ordinary prompts) of a manifest; ``heldout`` rows are never read, so a final evaluation on them is honest.

1. Record FFN statistics of the ``locate`` prompts and of base prompts; locate an edit (``wanda``, ``neuron`` or
   ``directions``).
2. ``ratio=None`` (auto): try strengths in ascending order and keep the smallest whose ``locate`` replication is at
   most ``target`` while the non-memorized drift stays within the seed-to-seed spread.
3. ``robust="prune"`` (diffmem's robust mitigation): attack the ``locate`` rows on the edited model by optimising
   their conditioning (:func:`~diffmem.reextraction.reextract`), record the FFN statistics under the adversarial
   conditionings, locate again and merge the new mask into the edit; repeat until the attack's rate is at most
   ``target`` or ``max_rounds`` is reached.
4. ``robust="finetune"`` (Finding DoRI's adversarial fine-tuning, the published anchor): fine-tune the denoiser
   with the ordinary denoising loss on non-memorized data plus a loss that maps the adversarial conditionings to
   the edited model's own prediction for the original prompt; the result is a :class:`~diffmem.edits.WeightDelta`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import LocateConfig, RecordConfig
from .crossfit import SAMPLER_NAMES, make_folds, measure_rows, sampler_variants, summarise_rows
from .data import ManifestEntry, load_reference
from .edits import DirectionBasis, Edit, Mask, WeightDelta, apply_edit, chance_iou, mask_iou
from .errors import ConfigError, DiffmemError
from .evaluation import EvalConfig, EvalResult, evaluate
from .recording import record
from .localization import list_locators, locate
from .objective import DiffusionObjective, denoiser_call, encode_conditioning, encode_reference
from .reextraction import ReextractConfig, ReextractItem, reextract
from .sampling import image_size
from .targets import get_denoiser

logger = logging.getLogger(__name__)

__all__ = [
    "MitigateConfig",
    "MitigationResult",
    "mitigate",
    "finetune_against",
    "locality_evidence",
    "DEFAULT_RATIOS",
    "DEFAULT_RANKS",
]

DEFAULT_RATIOS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_RANKS = (1, 2, 4, 8, 16)
ROBUST = ("none", "prune", "finetune")


@dataclass
class MitigateConfig:
    """Settings of :func:`mitigate`.

    Args:
        method: Locate method: ``wanda``, ``neuron`` or ``directions``.
        ratio: Edit strength (the ratio; for ``directions`` the rank); ``None`` chooses it (``--ratio auto``).
        strengths: Strengths tried by the automatic choice, ascending.
        target: Largest acceptable ``locate`` replication (and, with ``robust``, attack rate).
        robust: ``none``, ``prune`` or ``finetune``.
        max_rounds: Rounds of the robust step.
        record_steps: Leading sampler steps recorded and used to locate (tau).
        sweep_seeds: Seeds per prompt when choosing the strength.
        attack: Settings of the re-extraction attack run during mitigation (``init="prompt"``).
        robust_score: How a robust pruning round locates again: ``"saliency"`` (default) scores every denoiser
            weight by how much zeroing it raises the training loss toward the memorized images under the adversarial
            conditionings, minus ``robust_lambda`` times how much it changes the loss of the ``nonmem`` rows;
            ``"activations"`` records FFN statistics under the adversarial conditionings and reruns ``method``.
        robust_fraction: Share of the denoiser's weights a saliency round may add.
        robust_aggregate: How a saliency round combines the images: ``"sum"`` adds their scores; ``"shared"``
            normalises each (image, conditioning) term's scores and keeps only weights whose score is positive for
            at least ``robust_share`` of the terms (weights many memorized images share, the seed paper's
            subspace, located under attack).
        robust_share: Fraction of terms that must agree with ``robust_aggregate="shared"``.
        attack_inits: Starts of the robust loop's attack (``prompt``, ``random``): conditionings from every start
            enter the saliency round.
        robust_samplers: Sampler settings (names of :data:`diffmem.crossfit.SAMPLER_NAMES`) the robust loop's
            attack is sampled at; a round stops only when the rate is at most ``target`` at all of them.
        folds: Cross-fitting folds over the ``locate`` rows (0 turns it off): the strength is chosen on
            out-of-fold replication, and the whole fit is repeated leaving each fold out, to estimate the rates on
            memorized images that were not given.
        estimate_seeds: Generations per row and setting when measuring a left-out fold.
        robust_lambda: Weight of the non-memorized loss change in the saliency score.
        finetune_steps: Optimiser steps per robust fine-tuning round.
        finetune_lr: Learning rate of the fine-tuning.
        finetune_batch: Noise draws per fine-tuning step and loss term.
        seed: First seed.
    """

    method: str = "wanda"
    ratio: float | None = None
    strengths: tuple[float, ...] = DEFAULT_RATIOS
    target: float = 0.05
    robust: str = "none"
    max_rounds: int = 3
    robust_score: str = "saliency"
    robust_fraction: float = 0.001
    robust_aggregate: str = "sum"
    robust_share: float = 0.5
    attack_inits: tuple[str, ...] = ("prompt", "random")
    robust_samplers: tuple[str, ...] = ("model", "diffusers-default")
    folds: int = 3
    estimate_seeds: int = 2
    robust_lambda: float = 5.0
    record_steps: int = 10
    sweep_seeds: int = 2
    attack: ReextractConfig = field(default_factory=lambda: ReextractConfig(checkpoints=(), num_seeds=2))
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    finetune_batch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in list_locators():
            raise ConfigError(f"method={self.method!r} is invalid: choose one of {', '.join(list_locators())}")
        if self.robust not in ROBUST:
            raise ConfigError(f"robust={self.robust!r} is invalid: choose one of {', '.join(ROBUST)}")
        if self.robust == "prune" and self.method == "directions":
            raise ConfigError("robust='prune' merges masks: use method wanda or neuron")
        if self.robust_score not in ("saliency", "activations"):
            raise ConfigError(f"robust_score={self.robust_score!r} is invalid: choose saliency or activations")
        if self.robust_aggregate not in ("sum", "shared"):
            raise ConfigError(f"robust_aggregate={self.robust_aggregate!r} is invalid: choose sum or shared")
        if not 0 < self.robust_share <= 1:
            raise ConfigError(f"robust_share={self.robust_share!r} is invalid: must be in (0, 1]")
        if not self.attack_inits or any(i not in ("prompt", "random") for i in self.attack_inits):
            raise ConfigError(f"attack_inits={self.attack_inits!r} is invalid: give prompt and/or random")
        if not self.robust_samplers or any(n not in SAMPLER_NAMES for n in self.robust_samplers):
            raise ConfigError(f"robust_samplers={self.robust_samplers!r} is invalid: give names from "
                              f"{', '.join(SAMPLER_NAMES)}")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"folds={self.folds!r} is invalid: 0 (off) or >= 2")
        if self.estimate_seeds < 1:
            raise ConfigError(f"estimate_seeds={self.estimate_seeds!r} is invalid: must be >= 1")
        if not 0 < self.robust_fraction <= 0.1:
            raise ConfigError(f"robust_fraction={self.robust_fraction!r} is invalid: must be in (0, 0.1]")
        if self.robust_lambda < 0:
            raise ConfigError(f"robust_lambda={self.robust_lambda!r} is invalid: must be >= 0")
        if self.ratio is not None and not (0 < self.ratio <= 1 or (self.method == "directions" and self.ratio >= 1)):
            raise ConfigError(f"ratio={self.ratio!r} is invalid: must be in (0, 1] (a rank >= 1 for directions)")
        if not self.strengths or list(self.strengths) != sorted(self.strengths):
            raise ConfigError(f"strengths={self.strengths!r} is invalid: give ascending values")
        if not 0 <= self.target <= 1:
            raise ConfigError(f"target={self.target!r} is invalid: must be in [0, 1]")
        for name in ("max_rounds", "record_steps", "sweep_seeds", "finetune_steps", "finetune_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if not self.finetune_lr > 0:
            raise ConfigError(f"finetune_lr={self.finetune_lr!r} is invalid: must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attack"] = self.attack.to_dict()
        d["strengths"] = list(self.strengths)
        d["attack_inits"] = list(self.attack_inits)
        d["robust_samplers"] = list(self.robust_samplers)
        return d


@dataclass
class MitigationResult:
    """What :func:`mitigate` found: the edit, how its strength was chosen and what each robust round did.

    ``plain_edit`` is the located edit before any robust round; ``first_adversarial`` the conditionings the first
    robust round's attack found against it (``[P, L, D]``, one per ``locate`` row), or ``None``.
    """

    edit: Edit
    strength: float
    sweep: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    locality: dict[str, Any]
    timings_s: dict[str, float]
    plain_edit: Edit | None = None
    first_adversarial: torch.Tensor | None = None
    estimate: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "kind": self.edit.kind,
            "strength": self.strength,
            "parameters_changed": self.edit.num_params_changed(),
            "fraction_changed": self.edit.fraction_changed(),
            "sweep": self.sweep,
            "rounds": self.rounds,
            "locality": self.locality,
            "timings_s": self.timings_s,
        }


def _split(entries: list[ManifestEntry], name: str) -> list[ManifestEntry]:
    return [e for e in entries if e.split == name]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _locate_config(method: str, strength: float, record_steps: int) -> LocateConfig:
    if method == "directions":
        return LocateConfig(method="directions", rank=int(strength), record_steps=record_steps)
    return LocateConfig(method=method, ratio=float(strength), record_steps=record_steps)


def _items(pipe: Any, entries: list[ManifestEntry], kind: str, size: tuple[int, int]) -> list[ReextractItem]:
    out = []
    for e in entries:
        if e.reference is None:
            raise DiffmemError(f"manifest row {e.prompt!r} has no reference image; the attack needs the training image")
        out.append(ReextractItem(e.prompt, load_reference(e.reference, size, row=e), kind))
    return out


def _score_strength(pipe: Any, edit: Edit, locate_rows: list[ManifestEntry], nonmem: list[ManifestEntry],
                    nonmem_before: EvalResult | None, ecfg: EvalConfig, scorer: Any) -> dict[str, Any]:
    with apply_edit(pipe, edit), torch.no_grad():
        loc = evaluate(pipe, locate_rows, ecfg, scorer, progress=False, desc="sweep")
        row: dict[str, Any] = {
            "parameters_changed": edit.num_params_changed(),
            "fraction": edit.fraction_changed(),
            "locate_replication": _mean([r["replication_rate"] for r in loc.rows if "replication_rate" in r]),
        }
        if nonmem_before is not None and loc.images is not None and nonmem_before.images is not None:
            row["memorized_becomes"] = _becomes(loc.images, nonmem_before.images)
        if nonmem_before is not None:
            after = evaluate(pipe, nonmem, ecfg, scorer, baseline=nonmem_before, progress=False, desc="sweep drift")
            row["drift_similarity"] = _mean([r["drift_similarity"] for r in after.rows])
            row["seed_similarity_before"] = _mean([r["seed_similarity_before"] for r in after.rows])
            row["drift_within_spread"] = _mean([float(r["drift_within_seed_spread"]) for r in after.rows])
    return row


def _becomes(memorized: np.ndarray, ordinary: np.ndarray) -> dict[str, Any] | None:
    """What the memorized prompts render under the edit: KID to the unedited model's ordinary generations (and the
    KID between two halves of those, as the yardstick); ``None`` when no feature extractor is available."""
    from .quality import memorized_becomes

    try:
        res = memorized_becomes(list(memorized.reshape(-1, *memorized.shape[-3:])),
                                list(ordinary.reshape(-1, *ordinary.shape[-3:])), subsets=50)
    except (DiffmemError, ImportError, OSError) as err:  # optional: a missing extractor must not stop mitigation
        logger.info("memorized-prompt quality not measured: %s", str(err).splitlines()[0])
        return None
    return {k: res.get(k) for k in ("kid_name", "kid_mean", "kid_std", "baseline_kid_mean", "baseline_kid_std")}


def _plausible(row: dict[str, Any], unedited_kid: float | None) -> bool:
    """The memorized prompts render no further from ordinary generations (KID) than the memorized images themselves
    did before the edit, up to the KID estimate's own noise (two standard deviations over its subsets): they became
    something image-like, not e.g. dark noise (true when not measured).

    A strict ``kid <= unedited_kid`` would judge noise: where the memorized images resemble ordinary ones (the
    overlap member) the unedited KID is near zero and any edit's estimate scatters around it."""
    becomes = row.get("memorized_becomes") or {}
    kid = becomes.get("kid_mean")
    if kid is None or unedited_kid is None:
        return True
    return kid <= unedited_kid + 2.0 * float(becomes.get("kid_std") or 0.0)


def _acceptable(row: dict[str, Any], target: float, unedited_kid: float | None = None) -> bool:
    rep = _judged(row)
    spread = row.get("drift_within_spread")
    return (rep is not None and rep <= target and (spread is None or spread >= 0.5)
            and _plausible(row, unedited_kid))


def mitigate(
    pipe: Any,
    entries: list[ManifestEntry],
    config: MitigateConfig,
    scorer: Any,
    *,
    base_prompts: list[str] | None = None,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> MitigationResult:
    """Locate an edit on the ``locate`` rows, choose its strength, and (optionally) harden it against re-extraction.

    Args:
        pipe: The pipeline to mitigate (left unchanged: every edit is applied reversibly).
        entries: Manifest entries; only ``locate`` and ``nonmem`` rows are used (``heldout`` rows are never read).
        config: Mitigation settings.
        scorer: Similarity scorer for replication (and its threshold).
        base_prompts: Base prompts recorded against the memorized ones (default: the empty prompt and the
            ``nonmem`` prompts).
        call_kwargs: Sampler settings (``num_inference_steps``, ``guidance_scale``, ``guidance_rescale``, size).
        progress: Show progress bars.

    Returns:
        The :class:`MitigationResult`.
    """
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 2)

    call = dict(call_kwargs or {})
    locate_rows, nonmem = _split(entries, "locate"), _split(entries, "nonmem")
    if not locate_rows:
        raise DiffmemError("the manifest has no 'locate' rows: mitigation needs memorized prompts to locate on")
    base = base_prompts if base_prompts is not None else [""] + [e.prompt for e in nonmem]
    rcfg = RecordConfig(
        num_inference_steps=int(call.get("num_inference_steps", 50)), record_steps=config.record_steps,
        guidance_scale=float(call.get("guidance_scale", 7.5)), height=call.get("height"), width=call.get("width"),
        seed=config.seed, batch_size=16, signatures=config.method == "directions",
    )
    extra = {"guidance_rescale": call["guidance_rescale"]} if call.get("guidance_rescale") else None
    folds = make_folds(locate_rows, config.folds, config.seed) if 2 <= config.folds <= len(locate_rows) else []
    if config.folds and not folds:
        logger.warning("%d locate rows are too few for %d folds: no out-of-fold estimate", len(locate_rows),
                       config.folds)
    # statistics per fold, so that every "all folds but one" fit reuses them
    parts = folds or [list(range(len(locate_rows)))]
    stats_parts = [record(pipe, [locate_rows[i].prompt for i in f], rcfg, progress=progress, pipe_kwargs=extra)
                   for f in parts]
    stats_mem = _merged(stats_parts)
    stats_base = record(pipe, base, rcfg, progress=progress, pipe_kwargs=extra)
    lap("record")

    # strength: given, or the smallest acceptable one; with folds, judged on the rows each edit was not fitted on
    ecfg = EvalConfig(num_seeds=config.sweep_seeds, seed=config.seed + 1000, call_kwargs=call)
    strengths = [config.ratio] if config.ratio is not None else list(config.strengths)
    nonmem_before = evaluate(pipe, nonmem, ecfg, scorer, progress=False) if nonmem else None
    unedited_kid = None
    if nonmem_before is not None and nonmem_before.images is not None:
        with torch.no_grad():
            mem_before = evaluate(pipe, locate_rows, ecfg, scorer, progress=False)
        unedited = _becomes(mem_before.images, nonmem_before.images) if mem_before.images is not None else None
        unedited_kid = (unedited or {}).get("kid_mean")
    sweep: list[dict[str, Any]] = []
    chosen: tuple[float, Edit] | None = None
    best = (True, float("inf"))
    for strength in tqdm(strengths, desc="strength", disable=not progress or len(strengths) == 1):
        lcfg = _locate_config(config.method, strength, config.record_steps)
        edit = locate(pipe, stats_mem, stats_base, lcfg)
        row = {"strength": strength, **_score_strength(pipe, edit, locate_rows, nonmem, nonmem_before, ecfg, scorer)}
        if folds and len(strengths) > 1:
            row["out_of_fold_replication"] = _out_of_fold_replication(pipe, locate_rows, folds, stats_parts,
                                                                      stats_base, lcfg, ecfg, scorer)
        sweep.append(row)
        logger.info("strength %g: %d weights changed, locate replication %s (out of fold %s), drift within spread %s",
                    strength, row["parameters_changed"], row["locate_replication"],
                    row.get("out_of_fold_replication"), row.get("drift_within_spread"))
        row["plausible"] = _plausible(row, unedited_kid)
        if _acceptable(row, config.target, unedited_kid):
            chosen = (strength, edit)
            break
        rep = _judged(row)
        # no strength is acceptable: prefer plausible renderings of the memorized prompts, then lower replication
        key = (not row["plausible"], rep if rep is not None else float("inf"))
        if chosen is None or key < best:
            chosen, best = (strength, edit), key
    strength, edit = chosen  # type: ignore[misc]
    plain = edit
    lap("strength")

    rounds: list[dict[str, Any]] = []
    first_adversarial: torch.Tensor | None = None
    if config.robust != "none":
        edit, rounds, first_adversarial = _harden(pipe, edit, locate_rows, nonmem, base, rcfg, extra, strength,
                                                  config, call, scorer, progress)
        lap("robust")
    estimate: dict[str, Any] = {"folds": [[locate_rows[i].prompt for i in f] for f in folds],
                                "memorized_kid_unedited": unedited_kid}
    if folds:
        estimate["out_of_fold"] = _cross_fit(pipe, locate_rows, nonmem, folds, stats_parts, stats_base, base, rcfg,
                                             extra, strength, config, call, scorer, progress)
        lap("estimate")
    given = measure_rows(pipe, edit, locate_rows, scorer, sampler_variants(call, pipe=pipe), attack=None,
                         num_seeds=config.estimate_seeds, seed=40_000 + config.seed, progress=False)
    estimate["in_sample"] = summarise_rows(given)
    if rounds:
        estimate["in_sample"]["attack"] = rounds[-1].get("attack_rate_by_sampler")
    estimate["in_sample"]["note"] = "measured on the rows the edit was fitted on"
    edit.meta = {**edit.meta, "mitigation": config.to_dict(), "strength": strength}
    return MitigationResult(edit=edit, strength=strength, sweep=sweep, rounds=rounds, locality={},
                            timings_s=timings, plain_edit=plain, first_adversarial=first_adversarial,
                            estimate=estimate)


def _merged(parts: list[Any]) -> Any:
    """The union of several :class:`~diffmem.stats.ActivationStats` (the inputs are left unchanged)."""
    out = copy.deepcopy(parts[0])
    for other in parts[1:]:
        out.merge_(other)
    return out


def _judged(row: dict[str, Any]) -> float | None:
    """The replication a strength is judged by: out of fold when measured, else on the locate rows."""
    return row.get("out_of_fold_replication", row["locate_replication"])


def _out_of_fold_replication(pipe: Any, rows: list[ManifestEntry], folds: list[list[int]], stats_parts: list[Any],
                             stats_base: Any, lcfg: LocateConfig, ecfg: EvalConfig, scorer: Any) -> float | None:
    """Replication of each fold's rows under the edit located on the other folds, averaged over all rows."""
    rates: list[float] = []
    for k, fold in enumerate(folds):
        others = _merged([p for j, p in enumerate(stats_parts) if j != k])
        edit = locate(pipe, others, stats_base, lcfg)
        with apply_edit(pipe, edit), torch.no_grad():
            res = evaluate(pipe, [rows[i] for i in fold], ecfg, scorer, progress=False)
        rates += [r["replication_rate"] for r in res.rows if "replication_rate" in r]
    return _mean(rates)


def _harden(pipe: Any, edit: Edit, rows: list[ManifestEntry], nonmem: list[ManifestEntry], base: list[str],
            rcfg: RecordConfig, extra: dict | None, strength: float, config: MitigateConfig, call: dict[str, Any],
            scorer: Any, progress: bool) -> tuple[Edit, list[dict[str, Any]], torch.Tensor | None]:
    """The robust rounds: attack ``rows`` from every start, locate again (or fine-tune), until the attack fails.

    Returns:
        The hardened edit, one record per round, and the first round's adversarial conditionings (prompt start).
    """
    items = _items(pipe, rows, "memorized", image_size(pipe, call.get("height"), call.get("width")))
    samplers = sampler_variants(call, tuple(config.robust_samplers), pipe)
    rounds: list[dict[str, Any]] = []
    first_adversarial: torch.Tensor | None = None
    for k in range(config.max_rounds + 1):
        rates, embeds = _attack_all(pipe, edit, items, config, samplers, scorer, k, progress)
        worst = max(rates.values())
        info: dict[str, Any] = {"round": k, "attack_rate_before_round": worst, "attack_rate_by_sampler": rates,
                                "parameters_changed": edit.num_params_changed()}
        rounds.append(info)
        logger.info("robust round %d: attack rate on the given rows %s", k,
                    ", ".join(f"{n} {r:.3f}" for n, r in rates.items()))
        if worst <= config.target or k == config.max_rounds:
            break
        if first_adversarial is None:
            first_adversarial = embeds[: len(items)]  # the prompt start's conditionings on the plain edit
        memorized = rows * (embeds.shape[0] // len(rows))
        if config.robust == "prune" and config.robust_score == "saliency":
            edit = _saliency_round(pipe, edit, memorized, embeds, nonmem, config, call)
        elif config.robust == "prune":
            edit = _prune_round(pipe, edit, embeds, base, rcfg, extra, strength, config, progress)
        else:
            edit = finetune_against(pipe, edit, memorized, embeds, nonmem, config, call, progress=progress)
        info["parameters_changed_after"] = edit.num_params_changed()
    return edit, rounds, first_adversarial


def _attack_all(pipe: Any, edit: Edit, items: list[ReextractItem], config: MitigateConfig,
                samplers: dict[str, dict[str, Any]], scorer: Any, round_index: int,
                progress: bool) -> tuple[dict[str, float], torch.Tensor]:
    """Attack every item from every start; the rate (any start succeeding) at each sampler, and the conditionings."""
    from .sampling import generate_images

    names = list(samplers)
    worst: dict[str, np.ndarray] = {}
    found = []
    threshold = float(scorer.threshold if config.attack.threshold is None else config.attack.threshold)
    for j, init in enumerate(config.attack_inits):
        acfg = replace(config.attack, init=init, seed=config.attack.seed + 1000 * round_index + 100 * j,
                       call_kwargs={**samplers[names[0]], **config.attack.call_kwargs})
        with apply_edit(pipe, edit):
            att = reextract(pipe, items, acfg, scorer, progress=progress)
            embeds = torch.cat([att.adversarial_embeds[i] for i in sorted(att.adversarial_embeds)])
            succ = {names[0]: np.array([r["success"] for r in att.rows], dtype=bool)}
            for name in names[1:]:
                with torch.no_grad():
                    gens = generate_images(pipe, prompt_embeds=embeds, num_seeds=acfg.num_seeds,
                                           seed=acfg.sample_seed, progress=False, **samplers[name])
                sims = [scorer.similarity(list(g), [it.reference]).float().numpy()[:, 0] for g, it in zip(gens, items)]
                succ[name] = np.array(sims) >= threshold
        for name, s in succ.items():
            worst[name] = s if name not in worst else worst[name] | s
        found.append(embeds)
    return {n: float(w.mean()) for n, w in worst.items()}, torch.cat(found)


def _cross_fit(pipe: Any, rows: list[ManifestEntry], nonmem: list[ManifestEntry], folds: list[list[int]],
               stats_parts: list[Any], stats_base: Any, base: list[str], rcfg: RecordConfig, extra: dict | None,
               strength: float, config: MitigateConfig, call: dict[str, Any], scorer: Any,
               progress: bool) -> dict[str, Any]:
    """Fit the edit on all folds but one (at the chosen strength, with the same robust rounds), measure the one left
    out with the prompt and under attack, at every reported sampler; rates over all rows and their spread."""
    samplers = sampler_variants(call, pipe=pipe)
    measured: list[dict[str, Any]] = [{} for _ in rows]
    for k, fold in enumerate(tqdm(folds, desc="cross-fit", disable=not progress)):
        train = [rows[i] for j, f in enumerate(folds) if j != k for i in f]
        others = _merged([p for j, p in enumerate(stats_parts) if j != k])
        edit = locate(pipe, others, stats_base, _locate_config(config.method, strength, config.record_steps))
        if config.robust != "none":
            edit, _, _ = _harden(pipe, edit, train, nonmem, base, rcfg, extra, strength, config, call, scorer,
                                 progress=False)
        attack = replace(config.attack, checkpoints=(), seed=config.attack.seed + 7, sample_seed=30_000 + config.seed)
        out = measure_rows(pipe, edit, [rows[i] for i in fold], scorer, samplers,
                           attack=attack if config.robust != "none" else None, inits=tuple(config.attack_inits),
                           attack_samplers=tuple(config.robust_samplers), num_seeds=config.estimate_seeds,
                           seed=40_000 + config.seed, progress=False)
        for i, o in zip(fold, out):
            measured[i] = o
        logger.info("cross-fit fold %d/%d: %s", k + 1, len(folds), summarise_rows(out)["prompt"])
    summary = summarise_rows(measured, folds)
    summary["note"] = ("each fold's rows measured under an edit fitted without them (same strength and robust "
                       "rounds); expected on memorized images not given")
    return summary


def _prune_round(pipe: Any, edit: Edit, embeds: torch.Tensor, base: list[str], rcfg: RecordConfig,
                 extra: dict | None, strength: float, config: MitigateConfig, progress: bool) -> Edit:
    """Record under the adversarial conditionings on the edited model, locate again, merge the new mask."""
    with apply_edit(pipe, edit):
        stats_adv = record(pipe, None, rcfg, prompt_embeds=embeds, progress=progress, pipe_kwargs=extra)
        stats_base = record(pipe, base, rcfg, progress=progress, pipe_kwargs=extra)
        new = locate(pipe, stats_adv, stats_base, _locate_config(config.method, strength, config.record_steps))
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


def _saliency_round(pipe: Any, edit: Edit, memorized: list[ManifestEntry], adversarial: torch.Tensor,
                    nonmem: list[ManifestEntry], config: MitigateConfig, call: dict[str, Any]) -> Mask:
    """Zero the weights that carry the memorized images under the attacker's conditionings, and little else.

    With the edit applied, the first-order change of the training loss when a weight ``w`` is zeroed is
    ``-w * dL/dw``. A weight scores ``-w * dL_mem/dw - lambda * |w * dL_non/dw|``: ``L_mem`` is the loss toward the
    memorized training images under their adversarial conditionings, ``L_non`` the loss of the ``nonmem`` rows
    under their own prompts. The top ``robust_fraction`` of all denoiser weights (with a positive score, not yet
    masked) join the mask.
    """
    if not isinstance(edit, Mask):
        raise DiffmemError("robust pruning merges masks: the edit must be a mask")
    if not nonmem or any(e.reference is None for e in nonmem):
        raise DiffmemError("robust pruning needs 'nonmem' rows with reference images (what must be kept)")
    denoiser = get_denoiser(pipe)
    params = {n[: -len(".weight")]: p for n, p in denoiser.named_parameters() if n.endswith(".weight") and p.dim() >= 2}
    size = image_size(pipe, call.get("height"), call.get("width"))
    device = denoiser.device
    with edit.apply(pipe), torch.enable_grad():
        with torch.no_grad():
            x_mem = torch.cat([encode_reference(pipe, load_reference(e.reference, size, row=e)) for e in memorized])
            x_non = torch.cat([encode_reference(pipe, load_reference(e.reference, size, row=e)) for e in nonmem])
            c_non = encode_conditioning(pipe, [e.prompt for e in nonmem])[0]
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
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, int(config.robust_fraction * flat.numel()))
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


def _training_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "epsilon":
        return noise
    raise DiffmemError(f"fine-tuning supports epsilon and v-prediction schedulers, not {kind!r}")


def finetune_against(
    pipe: Any,
    edit: Edit,
    memorized: list[ManifestEntry],
    adversarial: torch.Tensor,
    nonmem: list[ManifestEntry],
    config: MitigateConfig,
    call: dict[str, Any],
    *,
    progress: bool = True,
) -> WeightDelta:
    """Finding DoRI's adversarial fine-tuning on top of ``edit``; returns the combined change as a weight delta.

    Loss = denoising loss on the ``nonmem`` rows (their prompts and training images) + the mean squared distance
    between the fine-tuned prediction under each adversarial conditioning and the edited (frozen) model's
    prediction under the original prompt at the same noisy latent and timestep.
    """
    from diffusers import DDPMScheduler

    if not nonmem or any(e.reference is None for e in nonmem):
        raise DiffmemError("robust fine-tuning needs 'nonmem' rows with reference images (the utility data)")
    denoiser = get_denoiser(pipe)
    device = denoiser.device
    size = image_size(pipe, call.get("height"), call.get("width"))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    originals = {n: p.detach().clone() for n, p in denoiser.named_parameters()}

    with torch.no_grad():
        x_utility = torch.cat([encode_reference(pipe, load_reference(e.reference, size, row=e)) for e in nonmem])
        c_utility = encode_conditioning(pipe, [e.prompt for e in nonmem])[0].to(device)
        c_original = encode_conditioning(pipe, [e.prompt for e in memorized])[0].to(device)
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
            ia = torch.randint(0, len(memorized), (b,), generator=g)
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
        with torch.no_grad():
            for n, p in denoiser.named_parameters():
                p.requires_grad_(False)
                p.copy_(originals[n])
        denoiser.eval()
    logger.info("adversarial fine-tuning: %d weights changed (on top of a %s)", delta.num_params_changed(), edit.kind)
    return delta


def locality_evidence(
    pipe: Any,
    rows: list[ManifestEntry],
    base_prompts: list[str],
    attack: ReextractConfig,
    scorer: Any,
    *,
    ratio: float,
    record_steps: int = 10,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Is memorization local? Triggers found from two random starts for the same images, and their masks.

    Finding DoRI questions the seed paper's claim that memorization sits in a few shared weights: if triggers for
    one image lie far apart and their masks differ, the memory is reachable through many paths. This measures:

    * the RMS distance between the two triggers of each image, against the RMS distance between the natural
      prompts' embeddings of different rows;
    * the IoU of the masks located from the two sets of triggers, against chance and against the mask located from
      the natural prompts.

    Returns:
        A JSON-ready dictionary of those numbers (and whether each trigger replicates).
    """
    call = dict(call_kwargs or {})
    items = _items(pipe, rows, "memorized", image_size(pipe, call.get("height"), call.get("width")))
    triggers, rates = [], []
    for k in range(2):
        cfg = replace(attack, init="random", seed=attack.seed + 101 + k, call_kwargs={**call, **attack.call_kwargs})
        res = reextract(pipe, items, cfg, scorer, progress=progress)
        triggers.append(torch.cat([res.adversarial_embeds[i] for i in sorted(res.adversarial_embeds)]))
        rates.append(res.summary()["memorization_rate"])
    natural = encode_conditioning(pipe, [e.prompt for e in rows])[0]

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean().sqrt())

    trigger_dist = [rms(triggers[0][i], triggers[1][i]) for i in range(len(rows))]
    natural_dist = [rms(natural[i], natural[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    rcfg = RecordConfig(num_inference_steps=int(call.get("num_inference_steps", 50)), record_steps=record_steps,
                        guidance_scale=float(call.get("guidance_scale", 7.5)), height=call.get("height"),
                        width=call.get("width"), batch_size=16)
    extra = {"guidance_rescale": call["guidance_rescale"]} if call.get("guidance_rescale") else None
    lcfg = LocateConfig(ratio=ratio, record_steps=record_steps)
    base = record(pipe, base_prompts, rcfg, progress=False, pipe_kwargs=extra)
    masks = [locate(pipe, record(pipe, None, rcfg, prompt_embeds=t, progress=False, pipe_kwargs=extra), base, lcfg)
             for t in triggers]
    prompt_mask = locate(pipe, record(pipe, [e.prompt for e in rows], rcfg, progress=False, pipe_kwargs=extra),
                         base, lcfg)
    return {
        "rows": len(rows),
        "trigger_replication_rate": rates,
        "trigger_distance_rms": _mean(trigger_dist),
        "natural_prompt_distance_rms": _mean(natural_dist),
        "trigger_mask_iou": mask_iou(masks[0], masks[1])["overall"],
        "trigger_mask_iou_chance": chance_iou(masks[0], masks[1]),
        "trigger_vs_prompt_mask_iou": [mask_iou(m, prompt_mask)["overall"] for m in masks],
    }
