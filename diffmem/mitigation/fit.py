"""The verb: :func:`mitigate` locates an edit on the given rows, chooses its strength out of fold, hardens it
against re-extraction and estimates, by cross-fitting, what it does on memorized images it was not given."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import RecordConfig
from ..crossfit import make_folds, measure_rows, sampler_variants, summarise_rows
from ..data import ManifestEntry
from ..errors import DiffmemError
from ..localization import locate
from ..recording import record
from ..sampling import image_size
from .config import MitigateConfig, MitigationResult
from .redirect import fit_redirect
from .repair import repair_edit
from .robust import harden
from .rows import Rows, load_rows
from .strength import QualityGate, choose_strength, locate_config, merged_stats

logger = logging.getLogger(__name__)

__all__ = ["mitigate"]


def _split(entries: list[ManifestEntry], name: str) -> list[ManifestEntry]:
    return [e for e in entries if e.split == name]


def mitigate(
    pipe: Any,
    entries: list[ManifestEntry],
    config: MitigateConfig,
    scorer: Any,
    *,
    base_prompts: list[str] | None = None,
    progress: bool = True,
) -> MitigationResult:
    """Locate an edit on the ``locate`` rows, choose its strength, and (optionally) harden it against re-extraction.

    Args:
        pipe: The pipeline to mitigate (left unchanged: every edit is applied reversibly).
        entries: Manifest entries; only ``locate`` and ``nonmem`` rows are used (``heldout`` rows are never read).
        config: Mitigation settings (with the model's sampler).
        scorer: Similarity scorer for replication (and its threshold).
        base_prompts: Base prompts recorded against the memorized ones (default: the empty prompt and the
            ``nonmem`` prompts).
        progress: Show progress bars.

    Returns:
        The :class:`MitigationResult`.
    """
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 2)

    locate_rows, nonmem = _split(entries, "locate"), _split(entries, "nonmem")
    if not locate_rows:
        raise DiffmemError("the manifest has no 'locate' rows: mitigation needs memorized prompts to locate on")
    base = base_prompts if base_prompts is not None else [""] + [e.prompt for e in nonmem]
    rcfg = RecordConfig(sampler=config.sampler, record_steps=config.record_steps, seed=config.seed, batch_size=16,
                        signatures=config.method == "directions")
    folds = make_folds(locate_rows, config.folds, config.seed) if 2 <= config.folds <= len(locate_rows) else []
    if config.folds and not folds:
        logger.warning("%d locate rows are too few for %d folds: no out-of-fold estimate", len(locate_rows),
                       config.folds)
    # the rows' training images, loaded once (the attack's targets; what a saliency round or fine-tuning keeps)
    rows = nonmem_rows = None
    if config.robust != "none" or folds or config.repair_steps:
        size = image_size(pipe, config.sampler.height, config.sampler.width)
        rows = load_rows(locate_rows, size)
        robust_needs = config.robust == "finetune" or (config.robust == "prune" and config.robust_score == "saliency")
        if robust_needs or config.repair_steps:
            what = ("robust fine-tuning" if config.robust == "finetune" else "robust pruning" if robust_needs
                    else "the repair")
            keep = "the utility data" if config.robust == "finetune" else "what must be kept"
            if not nonmem or any(e.reference is None for e in nonmem):
                raise DiffmemError(f"{what} needs 'nonmem' rows with reference images ({keep})")
            nonmem_rows = load_rows(nonmem, size, purpose=what)
    # statistics per fold, so that every "all folds but one" fit reuses them
    parts = folds or [list(range(len(locate_rows)))]
    stats_parts = [record(pipe, [locate_rows[i].prompt for i in f], rcfg, progress=progress) for f in parts]
    stats_mem = merged_stats(stats_parts)
    stats_base = record(pipe, base, rcfg, progress=progress)
    lap("record")

    choice = choose_strength(pipe, locate_rows, nonmem, stats_mem, stats_parts, stats_base, folds, config, scorer,
                             progress)
    strength, edit = choice.strength, choice.edit
    plain = edit
    lap("strength")

    rounds: list[dict[str, Any]] = []
    first_adversarial: torch.Tensor | None = None
    if config.robust != "none":
        edit, rounds, first_adversarial = harden(pipe, edit, rows, nonmem_rows, base, rcfg, strength, config, scorer,
                                                 progress, gate=choice.gate)
        lap("robust")
    anchors = _anchors(base, nonmem) if config.redirect is not None else None
    if anchors is not None:
        edit = fit_redirect(pipe, edit, [e.prompt for e in locate_rows], anchors, keep=anchors,
                            preserve=float(config.redirect))
        lap("redirect")
    repair_rows: list[int] = []
    if config.repair_steps:
        repair_rows = repair_split(len(nonmem), config.repair_share)
        edit = _repair(pipe, edit, nonmem_rows.subset(repair_rows), rows, config, progress)
        lap("repair")
    estimate: dict[str, Any] = {"folds": [[locate_rows[i].prompt for i in f] for f in folds],
                                "memorized_kid_unedited": choice.unedited_kid,
                                "memorized_replication_unedited": choice.unedited_replication}
    if config.repair_steps:
        estimate["repair"] = {"steps": config.repair_steps, "fitted_on": [nonmem[i].prompt for i in repair_rows],
                              "unseen": [e.prompt for i, e in enumerate(nonmem) if i not in repair_rows]}
    if folds:
        estimate["out_of_fold"] = _cross_fit(pipe, rows, nonmem_rows, folds, stats_parts, stats_base, base, rcfg,
                                             strength, config, scorer, progress, choice.gate, anchors, repair_rows)
        lap("estimate")
    given = measure_rows(pipe, edit, locate_rows, scorer, sampler_variants(config.sampler, pipe=pipe), attack=None,
                         num_seeds=config.estimate_num_seeds, seed=40_000 + config.seed, progress=False)
    estimate["in_sample"] = summarise_rows(given)
    if rounds:
        estimate["in_sample"]["attack"] = rounds[-1].get("attack_rate_by_sampler")
    estimate["in_sample"]["note"] = "measured on the rows the edit was fitted on"
    edit.meta = {**edit.meta, "mitigation": config.to_dict(), "strength": strength}
    return MitigationResult(edit=edit, strength=strength, sweep=choice.sweep, rounds=rounds, locality={},
                            timings_s=timings, plain_edit=plain, first_adversarial=first_adversarial,
                            estimate=estimate)


def repair_split(count: int, share: float) -> list[int]:
    """Indices of the ``nonmem`` rows a repair fits on: ``share`` of ``count``, evenly spread (at least one)."""
    k = min(count, max(1, round(count * share)))
    return sorted({int(i * count / k) for i in range(k)})


def _repair(pipe: Any, edit: Any, ordinary: Rows, given: Rows, config: MitigateConfig, progress: bool) -> Any:
    """The edit repaired on ``ordinary`` rows, the ``given`` memorized rows held at the edited model."""
    return repair_edit(pipe, edit, ordinary, steps=config.repair_steps, deleted=given, seed=config.seed + 11,
                       progress=progress)


def _anchors(base: list[str], nonmem: list[ManifestEntry]) -> list[str]:
    """The ordinary captions a redirect sends the memorized prompts to (and keeps in place): base and ``nonmem``."""
    anchors = list(dict.fromkeys(p for p in base + [e.prompt for e in nonmem] if p.strip()))
    if not anchors:
        raise DiffmemError("redirect needs ordinary captions: give 'nonmem' rows or base prompts")
    return anchors


def _cross_fit(pipe: Any, rows: Rows, nonmem: Rows | None, folds: list[list[int]], stats_parts: list[Any],
               stats_base: Any, base: list[str], rcfg: RecordConfig, strength: float, config: MitigateConfig,
               scorer: Any, progress: bool, gate: QualityGate | None = None,
               anchors: list[str] | None = None, repair_rows: list[int] | None = None) -> dict[str, Any]:
    """Fit the edit on all folds but one (at the chosen strength, with the same robust rounds and the quality gate of
    their rows, and the same repair holding only their rows), measure the one left out with the prompt and under
    attack, at every reported sampler; rates over all rows and their spread."""
    samplers = sampler_variants(config.sampler, pipe=pipe)
    measured: list[dict[str, Any]] = [{} for _ in range(len(rows))]
    for k, fold in enumerate(tqdm(folds, desc="cross-fit", disable=not progress)):
        kept = [i for j, f in enumerate(folds) if j != k for i in f]
        train = rows.subset(kept)
        others = merged_stats([p for j, p in enumerate(stats_parts) if j != k])
        edit = locate(pipe, others, stats_base, locate_config(config.method, strength, config.record_steps))
        if config.robust != "none":
            edit, _, _ = harden(pipe, edit, train, nonmem, base, rcfg, strength, config, scorer, progress=False,
                                gate=gate.subset(kept) if gate is not None else None)
        if anchors is not None:
            edit = fit_redirect(pipe, edit, train.prompts, anchors, keep=anchors, preserve=float(config.redirect))
        if repair_rows:
            edit = _repair(pipe, edit, nonmem.subset(repair_rows), train, config, progress=False)
        attack = replace(config.attack, checkpoints=(), seed=config.attack.seed + 7, sample_seed=30_000 + config.seed)
        left_out = rows.subset(fold)
        out = measure_rows(pipe, edit, left_out.entries, scorer, samplers,
                           attack=attack if config.robust != "none" else None, inits=tuple(config.attack_inits),
                           attack_samplers=tuple(config.robust_samplers), num_seeds=config.estimate_num_seeds,
                           seed=40_000 + config.seed, progress=False, references=left_out.pixels)
        for i, o in zip(fold, out):
            measured[i] = o
        logger.info("cross-fit fold %d/%d: %s", k + 1, len(folds), summarise_rows(out)["prompt"])
    summary = summarise_rows(measured, folds)
    summary["note"] = ("each fold's rows measured under an edit fitted without them (same strength and robust "
                       "rounds); expected on memorized images not given")
    return summary
