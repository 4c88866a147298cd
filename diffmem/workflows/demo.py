"""``diffmem demo``: ``mitigate --robust prune`` on the embedded tiny memorizer, against the plain mask (and, with
``full``, every other edit).

The demo runs on a checkpoint with a ground-truth manifest (by default the embedded tiny memorizer):

1. detection without training data (Wen et al.) over every manifest prompt;
2. mitigation on the ``locate`` and ``nonmem`` rows only: statistics, a sparse mask whose ratio is chosen on the
   ``locate`` split, then robust pruning rounds against the re-extraction attack (Finding DoRI);
3. the shared-subspace evidence: masks located from two disjoint halves of the ``locate`` split, their IoU against
   chance, and (``full``) how far re-extraction triggers found from different starts lie from each other;
4. one row per edit (none, sparse mask, robust prune; ``full`` adds directions and robust finetune) on the ``heldout``
   rows: replication with the prompt and under the attack, the control rate, drift and size;
5. Carlini et al.'s extraction attack before and after the robust edit;
6. the export of the robust pipeline and ``report.json`` / ``report.html``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diffmem.config import LocateConfig, RecordConfig, require
from diffmem.data import load_reference, read_manifest, read_prompts
from diffmem.detection import DetectConfig, detect
from diffmem.edits import apply_edit, chance_iou, check_output_dir, export_edited, mask_iou
from diffmem.errors import ConfigError, PromptFileError
from diffmem.evaluation import EvalConfig, evaluate, evaluate_edit
from diffmem.extraction import ExtractionConfig, extraction_attack
from diffmem.files import replace_dir
from diffmem.recording import record
from diffmem.localization import locate
from diffmem.metrics import roc_curve
from diffmem.mitigation import (DEFAULT_RATIOS, MitigateConfig, finetune_against, load_rows, locality_evidence,
                                mitigate)
from diffmem.pipelines import load_pipeline
from diffmem.reextraction import ReextractConfig, reextract
from diffmem.sampling import image_size
from diffmem.score import get_scorer
from diffmem.workflows.mitigate import OUTPUT_MARK, edit_row, final_attack_config, quality_block, region_cells
from diffmem.workflows.run import RunConfig

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "run_demo"]


@dataclass(kw_only=True)
class DemoConfig(RunConfig):
    """Settings of ``diffmem demo`` (and those of :class:`~diffmem.workflows.run.RunConfig`; SSIM is the scorer
    because the embedded model makes 32 px images, too small for SSCD).

    The default budget fits ten minutes on two CPU cores; ``full`` runs the complete comparison (about three times
    as long). A setting left ``None`` takes its value from the budget (default / full).

    Args:
        model: Checkpoint folder with ``memorization.jsonl`` (default: the embedded tiny memorizer).
        ratio: Mask ratio; ``None`` chooses it on the ``locate`` split.
        target: Target rate of the mitigation (replication on the ``locate`` split, and under the attack).
        full: The complete comparison instead of the ten-minute budget.
        eval_num_seeds: Seeds per prompt in the evaluation (2 / 4).
        attack_generations: Generations per prompt in Carlini et al.'s attack (4 / 8).
        attack_rows: Held-out memorized rows attacked per edit, spread evenly (8 / all); the prompt rates use
            every held-out row.
        attack_controls: Rows of each re-extraction control (once-seen and never-seen images) attacked per edit
            (4 / 8).
        attack_inits: Starts of the robust loop's attack (the prompt / the prompt and a random one).
        locality_rows: Memorized rows whose re-extraction triggers are compared (none / 8; 0 skips it).
        max_rounds: Robust pruning rounds at most (2 / 3).
        compare_directions: Also run the low-rank projection editor (no / yes).
        compare_finetune: Also run adversarial fine-tuning, Finding DoRI's mitigation (no / yes).
        strengths: Mask ratios the strength sweep tries (0.05, 0.2, 0.5 / mitigate's default six).
        quick: Reduced settings for CI.
        seed: First seed everywhere.
        region: ``"bright-ending"``: the evaluation grids also measure replication on each generation's memorized
            region and show its Bright Ending mask over the memorized prompts' generations; ``"full"``: the whole
            image only.
    """

    model: str | None = None
    out: str = "runs/demo"
    ratio: float | None = None
    target: float = 0.05
    full: bool = False
    eval_num_seeds: int | None = None
    attack_generations: int | None = None
    attack_rows: int | None = None
    attack_controls: int | None = None
    attack_inits: tuple[str, ...] | None = None
    locality_rows: int | None = None
    max_rounds: int | None = None
    compare_directions: bool | None = None
    compare_finetune: bool | None = None
    strengths: tuple[float, ...] | None = None
    quick: bool = False
    seed: int = 0
    region: str = "full"

    def budget(self) -> dict[str, Any]:
        """The settings left ``None``, filled from the budget (the ten-minute default, or ``full``)."""
        full = self.full
        chosen = {"eval_num_seeds": 4 if full else 2, "attack_rows": None if full else 8,
                  "attack_controls": 8 if full else 4, "attack_inits": ("prompt", "random") if full else ("prompt",),
                  "locality_rows": 8 if full else 0, "compare_directions": full, "compare_finetune": full,
                  "strengths": DEFAULT_RATIOS if full else (0.05, 0.2, 0.5),
                  "attack_generations": 8 if full else 4, "max_rounds": 3 if full else 2}
        return {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in chosen.items()}

    def check(self) -> None:
        super().check()
        for name in ("eval_num_seeds", "attack_rows", "attack_controls", "attack_generations", "max_rounds"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1")
        require(self.locality_rows is None or self.locality_rows >= 0, "locality_rows", self.locality_rows,
                "must be >= 0")
        require(self.strengths is None or (bool(self.strengths) and list(self.strengths) == sorted(self.strengths)
                                           and all(0 < r <= 1 for r in self.strengths)),
                "strengths", self.strengths, "give ascending ratios in (0, 1]")
        require(self.attack_inits is None or (bool(self.attack_inits) and set(self.attack_inits) <= {"prompt", "random"}),
                "attack_inits", self.attack_inits, "give prompt and/or random")
        EvalConfig(region=self.region)  # checks the value


def _default_model() -> Path:
    from diffmem.zoo import default_model_path

    path = default_model_path()
    if not (path / "model_index.json").is_file():
        raise PromptFileError(
            f"the embedded model is not at {path}: it ships in the source repository (assets/tiny-sd-memorizer); "
            "run `diffmem demo` from a clone, or pass --model FOLDER"
        )
    return path


def _quick_subset(entries: list, per_split: int) -> list:
    out, seen = [], {}
    for e in entries:
        key = (e.split, e.duplicates)
        if seen.get(key, 0) < per_split:
            out.append(e)
            seen[key] = seen.get(key, 0) + 1
    return out


def run_demo(config: DemoConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the demo and write its outputs under ``config.out``; returns the report (with ``headline_text``)."""
    from diffmem.workflows.report import write_report

    config = config or DemoConfig()
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)
        logger.info("demo: %s done (%.0f s elapsed)", name, time.time() - t0)

    model = Path(config.model) if config.model else _default_model()
    out = Path(config.out)
    check_output_dir(out, True, str(model), marks=(OUTPUT_MARK,))
    manifest = model / "memorization.jsonl"
    if not manifest.is_file():
        raise PromptFileError(f"{manifest}: the demo needs a ground-truth manifest next to the model")
    entries = read_manifest(manifest, allow_outside=config.allow_outside)
    base_file = model / "base_prompts.txt"
    base_prompts = [""] + (read_prompts(base_file) if base_file.is_file() else [])
    budget = config.budget()
    opt_steps, max_rounds, eval_num_seeds = config.opt_steps, budget["max_rounds"], budget["eval_num_seeds"]
    if config.quick:
        entries = _quick_subset(entries, 1)
        base_prompts, opt_steps, max_rounds, eval_num_seeds = base_prompts[:7], min(opt_steps, 10), 1, 2
    overlap = {e.prompt for e in entries} & set(base_prompts)
    if overlap:
        raise ConfigError(f"base prompts overlap the evaluation prompts (e.g. {sorted(overlap)[0]!r})")
    config.resolve_sampler(model)  # checks the settings before the model loads
    pipe = load_pipeline(str(model), allow_pickle=config.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    sampler = config.resolve_sampler(pipe)
    own_scheduler = sampler.apply_scheduler(pipe)
    scorer = get_scorer(config.scorer)
    visible = [e for e in entries if e.split in ("locate", "nonmem")]
    locate_rows = [e for e in entries if e.split == "locate"]

    # 1. detection
    dcfg = DetectConfig(sampler=sampler, score_steps=5, num_seeds=1 if config.quick else 4, seed=config.seed)
    det = detect(pipe, [e.prompt for e in entries], dcfg, labels=[e.memorized for e in entries], progress=progress)
    fpr, tpr, _ = roc_curve(det.scores, det.labels)
    lap("detect")

    # 2. mitigation (locate and nonmem rows only)
    attack_m = ReextractConfig(opt_steps=opt_steps, checkpoints=(), num_seeds=2, seed=config.seed,
                               sample_seed=10_000 + config.seed, sampler=sampler)
    # the demo measures held-out rows itself, so it skips the cross-fitted estimate; the robust loop attacks at the
    # model's sampler, from the budget's starts
    mcfg = MitigateConfig(ratio=config.ratio, robust="prune", target=config.target, max_rounds=max_rounds,
                          attack=attack_m, seed=config.seed, robust_aggregate="shared", sampler=sampler, folds=0,
                          robust_samplers=("model",),
                          attack_inits=("prompt",) if config.quick else tuple(budget["attack_inits"]),
                          strengths=(DEFAULT_RATIOS[0], DEFAULT_RATIOS[-1]) if config.quick
                          else tuple(budget["strengths"]))
    t_m = time.time()
    result = mitigate(pipe, visible, mcfg, scorer, base_prompts=base_prompts, progress=progress)
    robust_s = time.time() - t_m
    mask, robust = result.plain_edit, result.edit
    lap("mitigate")

    # 3. shared subspace: masks from disjoint halves of the locate split
    rcfg = RecordConfig(sampler=sampler, record_steps=10, batch_size=16, seed=config.seed)
    ordered = sorted(locate_rows, key=lambda e: e.duplicates)
    half_a, half_b = ordered[0::2], ordered[1::2]
    stats_base = record(pipe, base_prompts, rcfg, progress=False)
    lcfg = LocateConfig(ratio=result.strength, record_steps=10)
    mask_a = locate(pipe, record(pipe, [e.prompt for e in half_a], rcfg, progress=False), stats_base, lcfg)
    mask_b = locate(pipe, record(pipe, [e.prompt for e in half_b], rcfg, progress=False), stats_base, lcfg)
    iou = mask_iou(mask_a, mask_b)
    iou_block = {"overall": iou["overall"], "per_layer": iou["per_layer"], "chance_overall": chance_iou(mask_a, mask_b),
                 "subset_sizes": [len(half_a), len(half_b)]}
    strongest = sorted(locate_rows, key=lambda e: -e.duplicates)[: 2 if config.quick else budget["locality_rows"]]
    locality = (locality_evidence(pipe, strongest, base_prompts, attack_m, scorer, ratio=result.strength,
                                  progress=progress) if strongest else {})
    lap("subspace")

    # 4. one row per edit, on the held-out rows
    # every held-out row with the prompt at three samplers; the attack on the budget's rows and controls (in the
    # ten-minute budget a spread of them, its curve at three checkpoints)
    final_attack = final_attack_config(opt_steps, sampler, config.seed, num_seeds=2,
                                       checkpoints=(0, 10, 25, 50) if config.full else (0, 25, 50))
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}

    nonmem_rows = [e for e in entries if e.split == "nonmem"]
    unedited = evaluate(pipe, nonmem_rows, EvalConfig(num_seeds=eval_num_seeds, seed=0, sampler=sampler), scorer,
                        progress=False)

    def measure(name: str, edit: Any, seconds: float) -> None:
        row, summary = edit_row(pipe, name, edit, entries, scorer, sampler, num_seeds=eval_num_seeds,
                                attack=final_attack, seconds=seconds, controls=budget["attack_controls"],
                                attack_rows=budget["attack_rows"],
                                baseline=unedited, progress=progress, inits=("prompt",), attack_samplers=("model",))
        rows.append(row)
        curves[name] = summary

    measure("none", None, 0.0)
    measure("sparse mask", mask, result.timings_s.get("record", 0) + result.timings_s.get("strength", 0))
    if budget["compare_directions"]:
        t_d = time.time()
        dres = mitigate(pipe, visible, MitigateConfig(method="directions", target=config.target,
                        strengths=(4, 16) if not config.quick else (4,), seed=config.seed, sampler=sampler),
                        scorer, base_prompts=base_prompts, progress=False)
        measure("directions", dres.edit, time.time() - t_d)
    measure("robust prune", robust, robust_s)
    if budget["compare_finetune"]:
        t_f = time.time()
        adv = result.first_adversarial  # the attack on the plain mask, already run by the first robust round
        if adv is None:
            adv = _adversarial(pipe, mask, locate_rows, attack_m, scorer, progress)
        delta = finetune_against(pipe, mask, locate_rows, adv, [e for e in visible if e.split == "nonmem"],
                                 MitigateConfig(finetune_steps=20 if config.quick else 100, seed=config.seed,
                                                sampler=sampler), progress=progress)
        measure("robust finetune", delta, time.time() - t_f + result.timings_s.get("strength", 0))
    lap("edits")

    # 5. Carlini et al. before / after the robust edit
    attack_rows = [e for e in entries if e.split == "heldout"] + [e for e in entries if e.split == "nonmem"][:8]
    size = (sampler.height, sampler.width) if sampler.height else None
    refs = [load_reference(e.reference, size, row=e) for e in attack_rows]
    acfg = ExtractionConfig(num_generations=4 if config.quick else budget["attack_generations"],
                            seed=config.seed + 5000, clique_size=2 if config.quick else 3, sampler=sampler)
    calib = [p for p in base_prompts if p][: 4 if config.quick else 16]
    att_before = extraction_attack(pipe, [e.prompt for e in attack_rows], acfg, scorer, references=refs,
                                   calibration_prompts=calib, progress=progress)
    with apply_edit(pipe, robust):
        att_after = extraction_attack(pipe, [e.prompt for e in attack_rows],
                                      replace(acfg, threshold=att_before.threshold), scorer, references=refs,
                                      progress=progress)
    lap("carlini")

    # 6. evaluation grids, export and report
    ecfg = EvalConfig(num_seeds=min(eval_num_seeds, 2), seed=config.seed, sampler=sampler, region=config.region)
    shown = [e for e in entries if e.split == "heldout"][:6] + [e for e in entries if e.split == "nonmem"][:6]
    before, after = evaluate_edit(pipe, shown, ecfg, scorer, robust, progress=False)
    lap("images")
    quality = _quality(shown, before, after)
    lap("quality")
    report: dict[str, Any] = {
        "title": "diffmem demo", "model": str(model), "sampler": sampler.to_dict(), "settings": {**config.to_dict(), **budget},
        "scorer": scorer.describe(), "edits": rows,
        "detection": {"auc": det.auc, "tpr_at_1pct_fpr": det.tpr_at_1fpr, "roc": {"fpr": list(map(float, fpr)),
                      "tpr": list(map(float, tpr))}, "scores": [{"prompt": p, "score": float(s), "memorized": bool(m)}
                      for p, s, m in zip(det.prompts, det.scores, det.labels)]},
        "mitigation": result.summary(), "sweep": result.sweep,
        "iou_subsets": iou_block, "locality": locality,
        "reextract": curves,
        "attack": {"before": att_before.summary(), "after": att_after.summary()},
        "before": before.summary(), "after": after.summary() if after is not None else None,
        "quality": quality, "timings_s": timings,
    }
    gallery = _gallery(shown, before, after, scorer, size or image_size(pipe), ecfg)
    report["headline_text"] = _headline(report, out)
    pipe.scheduler = own_scheduler  # the export keeps the model's scheduler

    def fill(folder: Path) -> None:
        robust.save(folder / "edit")
        mask.save(folder / "mask")
        export_edited(pipe, robust, folder / "pruned", source=str(model), edit_path=folder / "edit",
                      settings={"mitigation": mcfg.to_dict(), "sampler": sampler.call_kwargs(pipe)})
        report["total_seconds"] = round(time.time() - t0, 1)
        write_report(report, folder, gallery=gallery)

    replace_dir(out, fill)
    return report


def _adversarial(pipe, edit, rows, attack, scorer, progress) -> torch.Tensor:
    """Adversarial conditionings of the locate rows against ``edit`` (the input of robust fine-tuning), sampled at
    the attack's sampler."""
    items = load_rows(rows, image_size(pipe, attack.sampler.height, attack.sampler.width)).items("memorized")
    with apply_edit(pipe, edit):
        res = reextract(pipe, items, attack, scorer, progress=progress)
    return torch.cat([res.adversarial_embeds[i] for i in sorted(res.adversarial_embeds)])


def _gallery(entries, before, after, scorer, size, config: EvalConfig) -> list[dict]:
    """Reference | generations before | after, each generation with its similarity to the reference; with the
    region option, the memorized prompts' generations are each followed by their memorized region."""
    rows = []
    for i, e in enumerate(entries):
        ref = load_reference(e.reference, size, row=e) if e.reference is not None else None
        cells = [] if ref is None else [{"label": "training image", "image": ref}]
        for label, result in (("before", before), ("robust prune", after)):
            if result is None or result.images is None:
                continue
            images = result.images[i]
            sims = scorer.similarity(images, [ref])[:, 0].tolist() if ref is not None else [None] * len(images)
            cells += [{"label": f"{label}, seed {j}", "image": img, "score": sim,
                       "replicated": None if sim is None else bool(sim >= scorer.threshold)}
                      for j, (img, sim) in enumerate(zip(images, sims))]
            if result.masks is not None and e.memorized:
                cells += region_cells(label, images, result.masks[i], ref, config)
        rows.append({"prompt": e.prompt, "split": e.split, "duplicates": e.duplicates, "cells": cells})
    caption = "The training image, then the same seeds before and after the edit."
    if before.masks is not None:
        caption += (" For memorized prompts, each set of seeds is followed by the same generations with their "
                    "memorized region in red: the Bright Ending mask (the patches that attend most to the prompt's "
                    "end token at the last step), its share of the image and the similarity to the training image on "
                    "it.")
    return [{"title": "Generations before and after the robust edit", "caption": caption, "rows": rows}]


def _quality(shown: list, before: Any, after: Any) -> dict[str, Any]:
    """Quality of the robust edit on the grid's images: ordinary prompts after against before, and what the
    held-out memorized prompts become (see :func:`diffmem.workflows.mitigate.quality_block`)."""
    if after is None or before.images is None or after.images is None:
        return {"note": "quality not measured: the evaluation kept no images (several processes)"}
    mem = [i for i, e in enumerate(shown) if e.split != "nonmem"]
    ordinary = [i for i, e in enumerate(shown) if e.split == "nonmem"]
    seeds = before.images.shape[1]
    flat = lambda a, idx: a[idx].reshape(-1, *a.shape[2:]) if idx else a[:0].reshape(0, *a.shape[2:])  # noqa: E731
    return quality_block({"nonmem_prompts": [shown[i].prompt for i in ordinary for _ in range(seeds)],
                          "nonmem_before": flat(before.images, ordinary), "nonmem_after": flat(after.images, ordinary),
                          "locate_before": flat(before.images, mem), "locate_after": flat(after.images, mem)})


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _headline(r: dict, out: Path) -> str:
    lines = [f"diffmem demo on {r['model']} (scorer {r['scorer']['name']}, threshold {r['scorer']['threshold']})",
             f"  {'edit':<16} {'prompt':>7} {'attack':>7} {'never':>7} {'advant.':>7} {'control':>8} {'drift ok':>9} "
             f"{'weights':>8}"]
    for row in r["edits"]:
        lines.append(f"  {row['name']:<16} {_fmt(row['heldout_replication_prompt']):>7} "
                     f"{_fmt(row['heldout_replication_attack']):>7} {_fmt(row.get('never_seen_rate')):>7} "
                     f"{_fmt(row.get('attack_advantage')):>7} {_fmt(row['control_rate']):>8} "
                     f"{_fmt(row.get('drift_within_spread')):>9} {row['parameters_changed']:>8}")
    lines.append("  (held-out replication with the prompt and under the re-extraction attack; never: the same attack "
                 "on images in no training set, advant.: attack minus never, the figure that counts; control: the "
                 "attack on non-memorized training images)")
    lines.append(f"  IoU of masks from disjoint halves {_fmt(r['iou_subsets']['overall'])} "
                 f"(chance {_fmt(r['iou_subsets']['chance_overall'])}); detection AUC {_fmt(r['detection']['auc'])}")
    a = r["attack"]
    lines.append(f"  Carlini verified extractions: {a['before']['num_verified_prompts']} -> "
                 f"{a['after']['num_verified_prompts']} prompts")
    if r["settings"].get("region") == "bright-ending" and r.get("after"):
        held_b, held_a = r["before"].get("heldout", {}), r["after"].get("heldout", {})
        lines.append(f"  replication on the memorized region (Bright Ending masks, grid rows): "
                     f"{_fmt(held_b.get('region_replication_rate'))} -> {_fmt(held_a.get('region_replication_rate'))}")
    lines.append(f"report: {out / 'report.html'}, robust pipeline: {out / 'pruned'}")
    return "\n".join(lines)
