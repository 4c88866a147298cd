"""``diffmem mitigate``: the product command, and the per-edit table that the demo and the report share.

:func:`run_mitigate` loads a model and its manifest, runs :func:`diffmem.mitigation.mitigate` on the ``locate``
and ``nonmem`` rows only, then (and only then) evaluates the result on the ``heldout`` rows: replication with the
prompt, replication under the re-extraction attack (held-out seeds and an optimisation seed that mitigation never
used), the control rate on non-memorized training images, and the drift of non-memorized prompts. For the report it
then generates the given memorized prompts before and after the edit and under the attack, and the ordinary prompts
before and after (:func:`report_images`), and measures quality on those images (:func:`quality_block`). It exports
the edited pipeline to ``OUT/pruned/``, saves the edit, and writes ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.config import SamplerConfig, require
from diffmem.crossfit import measure_rows, sampler_variants, summarise_rows
from diffmem.data import ManifestEntry, load_reference, read_manifest
from diffmem.edits import Edit, apply_edit, check_output_dir, export_edited
from diffmem.errors import ConfigError
from diffmem.evaluation import EvalConfig, EvalResult, evaluate
from diffmem.files import replace_dir
from diffmem.mitigation import MitigateConfig, mitigate
from diffmem.pipelines import load_pipeline
from diffmem.quality import get_feature_extractor, image_features, memorized_becomes, quality_report
from diffmem.reextraction import ReextractConfig, ReextractItem, reextract
from diffmem.score import ScorerUnavailableError, get_scorer
from diffmem.workflows.report.rows import EditRow
from diffmem.workflows.run import RunConfig

logger = logging.getLogger(__name__)

__all__ = ["MitigateRunConfig", "MitigateRun", "run_mitigate", "edit_row", "report_images", "region_cells",
           "quality_block", "OUTPUT_MARK"]

OUTPUT_MARK = "report.json"  # a folder holding it is an earlier diffmem run output that may be replaced


@dataclass(kw_only=True)
class MitigateRunConfig(RunConfig):
    """Settings of ``diffmem mitigate`` (and those of :class:`~diffmem.workflows.run.RunConfig`).

    Args:
        prompts: Manifest with ``locate``, ``heldout`` and ``nonmem`` rows (and ``never_seen`` controls).
        method, ratio, robust, target, max_rounds, min_rounds, folds, robust_aggregate, robust_fraction,
            robust_gate, redirect, margin_steps: The
            :class:`MitigateConfig` settings of the same names.
        repair: ``MitigateConfig.repair_steps`` (0: off).
        scorer_weights: SSCD weights file.
        overwrite: Replace an earlier diffmem output at ``out``.
        eval_num_seeds: Seeds per held-out prompt in the measurement.
        seed: First seed.
        region: ``"bright-ending"``: the report also measures and shows each generation's memorized region.
    """

    prompts: str
    method: str = "wanda"
    ratio: float | None = None
    robust: str = "none"
    target: float = 0.05
    max_rounds: int = 3
    min_rounds: int = 1
    folds: int = 3
    robust_aggregate: str = "shared"
    robust_fraction: float = 0.002
    robust_gate: bool = False
    redirect: float | None = None
    repair: int = 0
    margin_steps: int = 1
    scorer_weights: str | None = None
    overwrite: bool = False
    eval_num_seeds: int = 4
    seed: int = 0
    region: str = "full"

    def check(self) -> None:
        super().check()
        require(self.eval_num_seeds >= 1, "eval_num_seeds", self.eval_num_seeds, "must be >= 1")
        require(self.repair >= 0, "repair", self.repair, "must be >= 0 (0: off)")
        require(0 < self.robust_fraction <= 0.1, "robust_fraction", self.robust_fraction, "must be in (0, 0.1]")
        EvalConfig(region=self.region)  # checks the value


MitigateRun = MitigateRunConfig  # the name before every workflow's settings were a ...Config


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _spread(rows: list[ManifestEntry], count: int | None) -> list[ManifestEntry]:
    """``count`` rows evenly spread over ``rows`` (all of them without a count)."""
    step = max(1, len(rows) // count) if count else 1
    return rows[::step][:count]


def edit_row(pipe: Any, name: str, edit: Edit | None, entries: list[ManifestEntry], scorer: Any,
             sampler: SamplerConfig, *, num_seeds: int, attack: ReextractConfig, seconds: float,
             controls: int | None = 8, attack_rows: int | None = None,
             baseline: EvalResult | None = None, progress: bool = True,
             inits: tuple[str, ...] = ("prompt", "random"),
             attack_samplers: tuple[str, ...] = ("model", "diffusers-default"),
             unseen: list[str] | None = None) -> tuple[EditRow, dict[str, Any]]:
    """One row of the main table, and the attack's summary (with its rate-vs-steps curve).

    Held-out memorized rows are measured with the prompt at every sampler of
    :data:`~diffmem.crossfit.SAMPLER_NAMES` and under the re-extraction attack from every start in ``inits``
    (a seed counts as replicated when any start replicates it), sampled at ``attack_samplers``. The same attack,
    with the same budget, runs on two controls at the model's sampler: ``nonmem`` rows (training images seen once)
    and ``never_seen`` rows (images like the memorized ones that are in no training set). The figure that counts
    is the held-out rate's advantage over the never-seen rate. ``controls`` caps each control set and
    ``attack_rows`` the held-out rows attacked (rows spread evenly; the prompt rates use every held-out row). The
    row also holds drift, size, the time to find the edit (``seconds``) and the time of this
    measurement. ``baseline`` is the unedited evaluation of the ``nonmem`` rows with the same settings; it is
    computed when not given (pass it when measuring several edits). ``unseen``: the ``nonmem`` prompts that the
    edit's fit did not train on (a repair's), whose drift is also reported on its own (``*_unseen``).
    """
    heldout = [e for e in entries if e.split == "heldout" and e.reference is not None]
    nonmem = [e for e in entries if e.split == "nonmem"]
    once_seen = _spread([e for e in nonmem if e.reference is not None], controls)
    never_seen = _spread([e for e in entries if e.split == "never_seen" and e.reference is not None], controls)
    ecfg = EvalConfig(num_seeds=num_seeds, seed=0, sampler=sampler)
    samplers = sampler_variants(sampler, pipe=pipe)
    t0 = time.time()
    if baseline is not None and [r["prompt"] for r in baseline.rows] != [e.prompt for e in nonmem]:
        raise ValueError("baseline must be the unedited evaluation of the nonmem rows, in order")
    base = baseline if baseline is not None or not nonmem else evaluate(pipe, nonmem, ecfg, scorer, progress=False)
    drift = None  # the unedited model does not drift from itself (same seeds, same images): nothing to measure
    if base is not None and edit is not None:
        with apply_edit(pipe, edit), torch.no_grad():
            drift = evaluate(pipe, nonmem, ecfg, scorer, baseline=base, progress=False)
    summaries: dict[str, Any] = {}
    attacked = _spread(heldout, attack_rows)
    if len(attacked) == len(heldout):
        held = summarise_rows(measure_rows(pipe, edit, heldout, scorer, samplers, attack=attack, inits=inits,
                                           attack_samplers=attack_samplers, num_seeds=num_seeds, seed=0,
                                           progress=progress, summaries=summaries))
    else:  # the prompt on every held-out row, the attack on a spread of them
        held = summarise_rows(measure_rows(pipe, edit, heldout, scorer, samplers, attack=None, num_seeds=num_seeds,
                                           seed=0))
        part = summarise_rows(measure_rows(pipe, edit, attacked, scorer, samplers, attack=attack, inits=inits,
                                           attack_samplers=attack_samplers, num_seeds=num_seeds, seed=0,
                                           progress=progress, summaries=summaries, prompt=False))
        held["attack"], held["attack_by_init"] = part["attack"], part["attack_by_init"]
    plain = replace(attack, checkpoints=())
    own = {"model": samplers["model"]}
    once = summarise_rows(measure_rows(pipe, edit, once_seen, scorer, own, attack=plain, inits=inits,
                                       num_seeds=num_seeds, seed=0, progress=False))
    never = summarise_rows(measure_rows(pipe, edit, never_seen, scorer, own, attack=plain, inits=inits,
                                        num_seeds=num_seeds, seed=0, progress=False))
    held_attack = held["attack"].get("model")
    never_rate = never["attack"].get("model")
    row: EditRow = {
        "name": name,
        "heldout_replication_prompt": held["prompt"].get("model"),
        "heldout_replication_attack": held_attack,
        "heldout_prompt_by_sampler": held["prompt"],
        "heldout_attack_by_sampler": held["attack"],
        "heldout_attack_by_start": held["attack_by_init"],
        "heldout_rows_attacked": len(attacked),
        "control_rate": once["attack"].get("model"),
        "never_seen_rate": never_rate,
        "attack_advantage": (None if held_attack is None or never_rate is None else held_attack - never_rate),
        "parameters_changed": 0 if edit is None else edit.num_params_changed(),
        "fraction_changed": 0.0 if edit is None else edit.fraction_changed(),
        "wall_time_s": round(seconds, 1),
        "measure_time_s": round(time.time() - t0, 1),
    }
    if drift is not None:
        row["drift_similarity"] = _mean([r["drift_similarity"] for r in drift.rows])
        row["seed_similarity_before"] = _mean([r["seed_similarity_before"] for r in drift.rows])
        row["drift_within_spread"] = _mean([float(r["drift_within_seed_spread"]) for r in drift.rows])
        if unseen is not None:
            wanted = set(unseen)
            kept = [r for r in drift.rows if r["prompt"] in wanted]
            row["drift_similarity_unseen"] = _mean([r["drift_similarity"] for r in kept])
            row["drift_within_spread_unseen"] = _mean([float(r["drift_within_seed_spread"]) for r in kept])
            row["drift_unseen_rows"] = len(kept)
    logger.info("%s: held-out replication %s with the prompt, %s under attack; controls: once-seen %s, never-seen %s",
                name, row["heldout_replication_prompt"], row["heldout_replication_attack"], row["control_rate"],
                row["never_seen_rate"])
    summary = dict(summaries.get(inits[0], {}))
    summary["memorization_rate"] = held_attack
    summary["control_rate"] = row["control_rate"]
    summary["never_seen_rate"] = never_rate
    return row, summary


def final_attack_config(opt_steps: int, sampler: SamplerConfig, seed: int, num_seeds: int = 4,
                        checkpoints: tuple[int, ...] = (0, 10, 25, 50)) -> ReextractConfig:
    """The evaluation attack: held-out seeds and an optimisation seed that mitigation never used; the rate is
    sampled at each of ``checkpoints`` (optimiser steps, up to ``opt_steps``) for the rate-vs-steps curve."""
    return ReextractConfig(opt_steps=opt_steps, checkpoints=tuple(c for c in checkpoints if c <= opt_steps),
                           num_seeds=num_seeds, sample_seed=20_000 + seed, seed=seed + 1, sampler=sampler)


def run_mitigate(run: MitigateRunConfig, progress: bool = True) -> dict[str, Any]:
    """Run ``diffmem mitigate`` and write its outputs; returns the report (with ``headline_text``)."""
    from diffmem.workflows.report import write_report

    t0 = time.time()
    out = Path(run.out)
    _check_run_output(out, run.overwrite, run.model)
    entries = read_manifest(run.prompts, allow_outside=run.allow_outside)
    for e in entries:  # the attack needs every training image of the rows it uses: fail before the slow work
        if e.split in ("locate", "nonmem") and e.reference is None:
            raise ConfigError(f"{e.row}: row {e.prompt!r} has no reference image; mitigation attacks it")
    run.resolve_sampler(run.model)  # checks the sampler settings before the model loads
    scorer = (get_scorer(run.scorer, weights=run.scorer_weights, allow_pickle=run.allow_pickle) if run.scorer_weights
              else get_scorer(run.scorer))
    pipe = load_pipeline(run.model, allow_pickle=run.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    sampler = run.resolve_sampler(pipe)
    own_scheduler = sampler.apply_scheduler(pipe)
    load_s = time.time() - t0
    mcfg = MitigateConfig(method=run.method, ratio=run.ratio, robust=run.robust, target=run.target,
                          max_rounds=run.max_rounds, min_rounds=min(run.min_rounds, run.max_rounds), seed=run.seed,
                          folds=run.folds,
                          robust_aggregate=run.robust_aggregate, robust_fraction=run.robust_fraction,
                          robust_gate=run.robust_gate, redirect=run.redirect, margin_steps=run.margin_steps,
                          repair_steps=run.repair,
                          sampler=sampler,
                          attack=ReextractConfig(opt_steps=run.opt_steps, checkpoints=(), num_seeds=2,
                                                 seed=run.seed, sample_seed=10_000 + run.seed))
    visible = [e for e in entries if e.split in ("locate", "nonmem")]  # held-out rows stay unseen
    result = mitigate(pipe, visible, mcfg, scorer, progress=progress)
    mitigation_s = time.time() - t0
    heldout = [e for e in entries if e.split == "heldout" and e.reference is not None]
    unmeasured = sum(1 for e in entries if e.split == "heldout" and e.reference is None)
    if unmeasured:
        logger.warning("%d held-out rows have no reference image: they are not measured", unmeasured)
    row = None
    t_phase = time.time()
    if heldout:
        row, attack_summary = edit_row(pipe, f"{run.method} ({run.robust})", result.edit, entries, scorer, sampler,
                                       num_seeds=run.eval_num_seeds, seconds=mitigation_s, progress=progress,
                                       attack=final_attack_config(run.opt_steps, sampler, run.seed),
                                       unseen=(result.estimate.get("repair") or {}).get("unseen"))
    timings = {"load": round(load_s, 1), **result.timings_s}
    if heldout:
        timings["heldout"] = _lap("held-out measurement", t_phase)
    t_phase = time.time()
    gallery, shown = report_images(pipe, result.edit, entries, scorer, sampler, opt_steps=run.opt_steps,
                                   seed=run.seed, progress=progress, region=run.region)
    timings["images"] = _lap("report images", t_phase)
    t_phase = time.time()
    quality = quality_block(shown)
    timings["quality"] = _lap("quality metrics", t_phase)

    report = {
        "title": "diffmem mitigate", "model": run.model,
        "sampler": {**sampler.to_dict(), "scheduler_in_use": type(pipe.scheduler).__name__},
        "scorer": scorer.describe(), "given": _given(entries),
        "settings": {**run.to_dict(), "mitigation": mcfg.to_dict()},
        "mitigation": result.summary(), "edits": [row] if row else [], "quality": quality,
        "report_images": shown["summary"], "timings_s": timings, "total_seconds": round(time.time() - t0, 1),
    }
    if row:
        report["reextract"] = {row["name"]: attack_summary}
    report["headline_text"] = _headline(report, out)

    def fill(folder: Path) -> None:
        result.edit.save(folder / "edit")
        export_edited(pipe, result.edit, folder / "pruned", source=run.model, edit_path=folder / "edit",
                      settings={"mitigation": mcfg.to_dict(), "sampler": sampler.call_kwargs(pipe)},
                      results=_card_rows(report))
        write_report(report, folder, gallery=gallery)

    pipe.scheduler = own_scheduler  # the export keeps the model's scheduler
    replace_dir(out, fill)
    return report


def _lap(name: str, since: float) -> float:
    seconds = round(time.time() - since, 1)
    logger.info("%s: %.1f s", name, seconds)
    return seconds


def _given(entries: list[ManifestEntry]) -> dict[str, int]:
    """Rows of the manifest by split; ``locate``, ``nonmem`` and ``heldout`` always (zero when absent). Held-out rows
    without a training image cannot be measured and are counted apart (``heldout_without_reference``)."""
    counts = {"locate": 0, "nonmem": 0, "heldout": 0}
    for e in entries:
        split = "heldout_without_reference" if e.split == "heldout" and e.reference is None else e.split
        counts[split] = counts.get(split, 0) + 1
    return counts


def report_images(pipe: Any, edit: Edit, entries: list[ManifestEntry], scorer: Any, sampler: SamplerConfig, *,
                  opt_steps: int,
                  seed: int, rows: int = 8, attacked: int = 4, num_seeds: int = 2, progress: bool = False,
                  region: str = "full") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Images for the report: the given memorized prompts before and after the edit and under the attack, and the
    ordinary prompts before and after with their drift, all at the model's sampler settings.

    Args:
        pipe: The pipeline (unchanged on return).
        edit: The final edit.
        entries: Manifest rows; the first ``rows`` ``locate`` and ``nonmem`` rows are shown.
        scorer: Similarity scorer (replication and drift).
        sampler: The model's sampler settings.
        opt_steps: Adam steps of the attack, run under the edit on the first ``attacked`` locate rows.
        seed: The run's seed (the attack uses ``seed + 3`` and sampling seeds from ``50_000 + seed``).
        rows: Rows shown per split.
        attacked: Locate rows attacked.
        num_seeds: Generations per prompt.
        progress: Show the attack's progress bars.
        region: ``"bright-ending"``: each memorized generation, before and after, is followed by its Bright Ending
            mask painted over it (:func:`region_cells`), and the summary adds the replication on that region
            (``EvalConfig(region=...)``); ``"full"``: the whole image only.

    Returns:
        The gallery (see :func:`diffmem.workflows.report.render_html`) and the images kept for the quality metrics:
        ``{"nonmem_prompts", "nonmem_before", "nonmem_after", "locate_before", "locate_after", "summary"}`` (uint8
        ``[N, H, W, 3]``
        arrays; ``summary`` holds the JSON-ready counts and mean drift).
    """
    locate_rows = [e for e in entries if e.split == "locate" and e.reference is not None][:rows]
    nonmem = [e for e in entries if e.split == "nonmem"][:rows]
    shown = locate_rows + nonmem
    empty = np.zeros((0, 1, 1, 3), np.uint8)
    kept: dict[str, Any] = {"nonmem_prompts": [], "nonmem_before": empty, "nonmem_after": empty,
                            "locate_before": empty, "locate_after": empty, "summary": {"num_seeds": num_seeds}}
    if not shown:
        return [], kept
    ecfg = EvalConfig(num_seeds=num_seeds, seed=seed, sampler=sampler, region=region)
    with torch.no_grad():
        before = evaluate(pipe, shown, ecfg, scorer, progress=False, desc="report images")
        with apply_edit(pipe, edit):
            after = evaluate(pipe, shown, ecfg, scorer, baseline=before, progress=False, desc="report images")
    h, w = before.images.shape[2:4]
    refs = [load_reference(e.reference, (h, w), row=e) if e.reference is not None else None for e in shown]
    attack = ReextractConfig(opt_steps=opt_steps, checkpoints=(), num_seeds=num_seeds, seed=seed + 3,
                             sample_seed=50_000 + seed, sampler=sampler)
    targets = locate_rows[:attacked]
    recovered = None
    if targets:
        items = [ReextractItem(e.prompt, refs[i], "memorized") for i, e in enumerate(targets)]
        with apply_edit(pipe, edit):
            recovered = reextract(pipe, items, attack, scorer, progress=progress, keep_images=True)
    threshold = float(scorer.threshold)

    def scored(label: str, images: np.ndarray, ref: np.ndarray | None) -> list[dict[str, Any]]:
        sims = (scorer.similarity(list(images), [ref]).float().numpy()[:, 0].tolist() if ref is not None
                else [None] * len(images))
        return [{"label": f"{label}, seed {j}", "image": img, "score": s,
                 "replicated": None if s is None else bool(s >= threshold)}
                for j, (img, s) in enumerate(zip(images, sims))]

    memorized = []
    for i, e in enumerate(locate_rows):
        cells = [{"label": "training image", "image": refs[i]}]
        for label, res in (("before", before), ("after", after)):
            cells += scored(label, res.images[i], refs[i])
            if res.masks is not None:
                cells += region_cells(label, res.images[i], res.masks[i], refs[i], ecfg)
        if recovered is not None and i < len(targets):
            r = recovered.rows[i]
            cells += [{"label": f"under attack, seed {j}", "image": img, "score": float(s), "replicated": bool(ok)}
                      for j, (img, s, ok) in enumerate(zip(recovered.images[i][-1], r["similarity"], r["success"]))]
        memorized.append({"prompt": e.prompt, "split": e.split, "duplicates": e.duplicates, "cells": cells})
    ordinary = []
    drift_rows = after.rows[len(locate_rows):]
    for k, e in enumerate(nonmem):
        i = len(locate_rows) + k
        drift = scorer.paired_similarity(list(after.images[i]), list(before.images[i])).float().numpy().tolist()
        cells = [{"label": f"before, seed {j}", "image": img} for j, img in enumerate(before.images[i])]
        cells += [{"label": f"after, seed {j}", "image": img, "detail": f"drift similarity {d:.3f}"}
                  for j, (img, d) in enumerate(zip(after.images[i], drift))]
        r = drift_rows[k]
        verdict = "within the seed spread" if r["drift_within_seed_spread"] else "beyond the seed spread"
        ordinary.append({"prompt": e.prompt, "split": e.split, "cells": cells,
                         "note": f"seed-to-seed similarity before {r['seed_similarity_before']:.3f}: the change is "
                                 f"{verdict}"})
    gallery = []
    if memorized:
        attack_text = (f" Under attack: for the first {len(targets)}, what the re-extraction attack recovers under the "
                       f"edit after {opt_steps} optimisation steps on the conditioning.") if targets else ""
        if before.masks is not None:
            attack_text += (" After each set of seeds, the same generations with their memorized region in red: the "
                            "Bright Ending mask (the patches that attend most to the prompt's end token at the last "
                            "step), with its share of the image and the similarity to the training image on it.")
        gallery.append({"title": "Memorized prompts given: before, after and under attack",
                        "caption": f"The training image, then {num_seeds} seeds of the unedited model and the same "
                                   "seeds after the edit." + attack_text, "rows": memorized})
    if ordinary:
        gallery.append({"title": "Ordinary prompts: before and after",
                        "caption": f"{num_seeds} seeds of the unedited model, then the same seeds after the edit. "
                                   "Under each edited image: its similarity to the unedited image at the same seed "
                                   "(1 means unchanged). A change is within the seed spread when that similarity is at "
                                   "least the similarity between two seeds of the unedited model.", "rows": ordinary})
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    n_loc = len(locate_rows)
    kept.update(nonmem_prompts=[e.prompt for e in nonmem for _ in range(num_seeds)],
                nonmem_before=flat(before.images[n_loc:]), nonmem_after=flat(after.images[n_loc:]),
                locate_before=flat(before.images[:n_loc]), locate_after=flat(after.images[:n_loc]))
    summary = kept["summary"]
    summary.update(locate_rows=n_loc, attacked_rows=len(targets), nonmem_rows=len(nonmem))
    if drift_rows:
        summary["nonmem_drift_similarity"] = float(np.mean([r["drift_similarity"] for r in drift_rows]))
        summary["nonmem_drift_within_spread"] = float(np.mean([r["drift_within_seed_spread"] for r in drift_rows]))
    if locate_rows:
        summary["locate_replication_before"] = float(np.mean([r["replication_rate"] for r in before.rows[:n_loc]]))
        summary["locate_replication_after"] = float(np.mean([r["replication_rate"] for r in after.rows[:n_loc]]))
        if before.masks is not None:
            summary["region"] = region
            for name, res in (("before", before), ("after", after)):
                summary[f"locate_region_replication_{name}"] = float(np.mean(
                    [r["region_replication_rate"] for r in res.rows[:n_loc]]))
                summary[f"locate_mask_fraction_{name}"] = float(np.mean([r["mask_fraction"] for r in res.rows[:n_loc]]))
    if recovered is not None:
        summary["attack_replication"] = recovered.summary()["memorization_rate"]
    return gallery, kept


def region_cells(label: str, images: np.ndarray, masks: np.ndarray, reference: np.ndarray | None,
                 config: EvalConfig) -> list[dict[str, Any]]:
    """Gallery cells of generations with their memorized region (Bright Ending mask) painted over them in red.

    Args:
        label: What the generations are (``"before"``, ``"after"``, ...).
        images: ``uint8 [S, H, W, 3]`` generations of one prompt.
        masks: ``bool [S, H, W]``, each generation's own mask.
        reference: The training image, or ``None``.
        config: The evaluation settings (``region_metric``, ``region_threshold``).

    Returns:
        One cell per generation: the overlay, its mask's share of the image and, with a reference, the masked
        similarity and whether it counts as a regional copy.
    """
    from diffmem.detectors import mask_overlay
    from diffmem.detectors.region import is_regional_copy, region_similarities

    sims = (region_similarities(list(images), reference, list(masks), config.region_metric) if reference is not None
            else [None] * len(images))
    cells = []
    for j, (img, mask, sim) in enumerate(zip(images, masks, sims)):
        detail = f"covers {100 * float(mask.mean()):.0f}% of the image"
        cell: dict[str, Any] = {"label": f"{label}, seed {j}: memorized region", "image": mask_overlay(img, mask)}
        if sim is not None:
            detail += f", {config.region_metric.upper()} on it {sim:.3f}"
            cell["replicated"] = bool(is_regional_copy(np.array([sim]), config.region_threshold,
                                                       config.region_metric)[0])
        cells.append({**cell, "detail": detail})
    return cells


def quality_block(shown: dict[str, Any]) -> dict[str, Any]:
    """Quality after the edit on the report's images (see :func:`report_images`), on SSCD features.

    ``ordinary``: :func:`diffmem.quality.quality_report` of the ordinary prompts after the edit against before;
    ``memorized``: :func:`diffmem.quality.memorized_becomes` of the given memorized prompts after the edit against
    the unedited model's ordinary images; with the same prompts' images before the edit (``locate_before``), also
    ``memorized_before`` (those images against the same ordinary images: the like-for-like yardstick, same prompts,
    seeds and ordinary set) and ``memorized_vs_edited`` (after the edit, against the edited model's own ordinary
    images: whether they render like what the edited model draws for ordinary prompts). Without SSCD weights, or with
    too few images, a one-line ``note`` instead.
    """
    before, after, mem = shown["nonmem_before"], shown["nonmem_after"], shown["locate_after"]
    mem_before = shown.get("locate_before")
    if len(before) < 2:
        return {"note": "quality not measured: it needs at least one ordinary (nonmem) prompt"}
    try:
        extractor = get_feature_extractor("sscd")
    except ScorerUnavailableError as err:
        return {"note": f"quality not measured: no SSCD weights ({err.reason})"}
    out: dict[str, Any] = {}
    try:
        out["ordinary"] = quality_report(before, after, shown["nonmem_prompts"], extractor=extractor)
        if len(mem) >= 2:  # features once per image set: each enters up to three comparisons
            f_before, f_after = image_features(list(before), extractor), image_features(list(after), extractor)
            f_mem = image_features(list(mem), extractor)
            out["memorized"] = memorized_becomes(f_mem, f_before)
            out["memorized_vs_edited"] = memorized_becomes(f_mem, f_after)
            if mem_before is not None and len(mem_before) == len(mem):
                out["memorized_before"] = memorized_becomes(image_features(list(mem_before), extractor), f_before)
    except ValueError as err:
        out["note"] = f"quality not measured: {err}"
    return out


def _card_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The measured figures for the exported model card: in-sample, out-of-fold estimate, held-out (when given)."""
    est = report["mitigation"].get("estimate") or {}
    rows = []
    given = est.get("in_sample")
    if given:
        rows.append({"rows": f"memorized prompts given ({given.get('rows')})", "fitted on them": "yes",
                     "replication with the prompt": given["prompt"].get("model"),
                     "replication under attack": (given.get("attack") or {}).get("model")})
    oof = est.get("out_of_fold")
    if oof:
        rows.append({"rows": f"expected on memorized images not given ({len(est['folds'])}-fold cross-fit)",
                     "fitted on them": "no", "replication with the prompt": oof["prompt"].get("model"),
                     "replication under attack": oof["attack"].get("model")})
    for r in report["edits"]:
        rows.append({"rows": "held-out memorized prompts", "fitted on them": "no",
                     "replication with the prompt": r["heldout_replication_prompt"],
                     "replication under attack": r["heldout_replication_attack"]})
    for r in report["edits"]:  # what the edit does to ordinary prompts: drift against the seed-to-seed spread
        if r.get("drift_within_spread") is not None:
            rows.append({"rows": "ordinary prompts given (nonmem)", "fitted on them": "kept by the fit",
                         "ordinary prompts within the seed spread": r["drift_within_spread"]})
        if r.get("drift_within_spread_unseen") is not None:
            rows.append({"rows": f"ordinary prompts the repair did not see ({r.get('drift_unseen_rows')})",
                         "fitted on them": "no", "ordinary prompts within the seed spread":
                         r["drift_within_spread_unseen"]})
    return rows


def _check_run_output(out: Path, overwrite: bool, source: str) -> None:
    """An output folder may be replaced only when it is an earlier diffmem run output; never the input model."""
    check_output_dir(out, overwrite, source, marks=(OUTPUT_MARK,))


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _headline(report: dict, out: Path) -> str:
    lines = [f"diffmem mitigate on {report['model']} (scorer {report['scorer']['name']})"]
    m = report["mitigation"]
    lines.append(f"  edit: {m['kind']}, strength {m['strength']}, {m['parameters_changed']} weights changed")
    est = m.get("estimate") or {}
    given = est.get("in_sample") or {}
    if given:
        lines.append(f"  on the {given.get('rows')} memorized prompts given: replication "
                     f"{_fmt(given['prompt'].get('model'))}"
                     f" with the prompt, {_fmt((given.get('attack') or {}).get('model'))} under attack (in-sample)")
    oof = est.get("out_of_fold")
    if oof:
        spread = oof.get("spread", {})
        lines.append(f"  expected on memorized images not given ({len(est['folds'])}-fold cross-fit): "
                     f"{_fmt(oof['prompt'].get('model'))} ± {_fmt(spread.get('prompt', {}).get('model'))} with the "
                     f"prompt, {_fmt(oof['attack'].get('model'))} ± {_fmt(spread.get('attack', {}).get('model'))} "
                     f"under attack")
    for r in report["edits"]:
        lines.append(f"  held-out replication: {_fmt(r['heldout_replication_prompt'])} with the prompt, "
                     f"{_fmt(r['heldout_replication_attack'])} under the re-extraction attack "
                     f"(controls: once-seen {_fmt(r['control_rate'])}, never-seen {_fmt(r.get('never_seen_rate'))})")
        if r.get("drift_within_spread") is not None:
            lines.append(f"  non-memorized drift within seed spread for {_fmt(r['drift_within_spread'])} of prompts")
        if r.get("drift_within_spread_unseen") is not None:
            lines.append(f"  of the {r['drift_unseen_rows']} non-memorized prompts the repair did not fit on: "
                         f"{_fmt(r['drift_within_spread_unseen'])} within seed spread")
    lines.append(f"outputs: {out / 'pruned'}, {out / 'report.html'}")
    return "\n".join(lines)
