"""``diffmem demo`` and ``diffmem audit``: the whole locate-and-delete pipeline with evidence.

The demo runs on a checkpoint with a ground-truth manifest (by default the embedded tiny memorizer):

1. detection without training data (Wen et al.) over every manifest prompt;
2. recording of the memorized ``locate`` split (in two disjoint halves) and of a base set (the empty prompt and
   generic prompts that are *not* in the evaluation);
3. locating a mask, with the ratio chosen by a sweep on the ``locate`` split only;
4. the IoU of the masks located from the two halves (the shared-subspace evidence);
5. before/after evaluation on every split, with the mask applied reversibly;
6. the extraction attack before and after;
7. export of the pruned pipeline;
8. ``report.json`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "run_demo", "AuditConfig", "run_audit", "DEFAULT_SWEEP"]

DEFAULT_SWEEP = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


@dataclass
class DemoConfig:
    """Settings of ``diffmem demo``.

    Args:
        model: Checkpoint folder with ``memorization.jsonl`` (default: the embedded tiny memorizer).
        out: Output folder (report, pruned export, extraction images).
        ratio: Mask ratio; ``None`` chooses it by a sweep on the ``locate`` split.
        sweep: Ratios tried by the sweep, ascending.
        target_replication: The sweep picks the smallest ratio whose ``locate`` replication is at most this.
        record_steps: Leading denoising steps recorded and used to locate (tau).
        eval_seeds: Seeds per prompt in the evaluation.
        attack_nonmem: Non-memorized prompts attacked beside the held-out memorized ones.
        calibration_prompts: Base prompts that calibrate the attack's threshold.
        sweep_seeds: Seeds per prompt in the sweep.
        attack_generations: Generations per prompt in the extraction attack.
        clique_size: Clique size of the attack.
        false_flag_rate: Target false-flag rate of the attack's calibrated threshold.
        detect_seeds: Seeds of the detection score.
        scorer: Similarity scorer of the evaluation. The default is SSIM at the native size because the
            embedded model makes 32 px images, where SSCD does not recognise exact replications (measured mean
            cosine 0.23); on real models pass ``sscd``.
        attack_scorer: Scorer of the attack's clique search and verification.
        method: Locate method of the sparse mask (``wanda`` or ``neuron``).
        compare_directions: Also run the low-rank projection editor and report it beside the mask.
        quick: Reduced settings for CI (fewer prompts, seeds and generations).
        seed: First seed everywhere.
    """

    model: str | None = None
    out: str = "runs/demo"
    ratio: float | None = None
    sweep: tuple[float, ...] = DEFAULT_SWEEP
    target_replication: float = 0.1
    record_steps: int = 10
    eval_seeds: int = 4
    sweep_seeds: int = 2
    attack_generations: int = 8
    attack_nonmem: int = 8
    calibration_prompts: int = 16
    clique_size: int = 3
    false_flag_rate: float = 0.05
    detect_seeds: int = 4
    scorer: str = "ssim"
    attack_scorer: str = "ssim"
    method: str = "wanda"
    compare_directions: bool = True
    direction_ranks: tuple[int, ...] = (4, 16)
    quick: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio!r} is invalid: must be in (0, 1]")
        if not self.sweep or any(not 0 < r <= 1 for r in self.sweep):
            raise ValueError(f"sweep={self.sweep!r} is invalid: ratios must be in (0, 1]")
        if self.quick:
            self.eval_seeds = min(self.eval_seeds, 2)
            self.sweep_seeds = min(self.sweep_seeds, 2)
            self.attack_generations = min(self.attack_generations, 4)
            self.clique_size = min(self.clique_size, 2)
            self.detect_seeds = min(self.detect_seeds, 1)
            self.sweep = (self.sweep[0], self.sweep[-1]) if len(self.sweep) > 1 else self.sweep
            self.direction_ranks = (self.direction_ranks[0],)
            self.attack_nonmem = min(self.attack_nonmem, 2)
            self.calibration_prompts = min(self.calibration_prompts, 4)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sweep"] = list(self.sweep)
        d["direction_ranks"] = list(self.direction_ranks)
        return d


def _stratified_halves(entries) -> tuple[list, list]:
    """Two disjoint halves with (nearly) the same mix of duplication counts: sort by count, then alternate."""
    ordered = sorted(entries, key=lambda e: e.duplicates)
    if len(ordered) < 2:
        raise ValueError("the locate split needs at least 2 prompts to compare masks from disjoint halves")
    return ordered[0::2], ordered[1::2]


def _quick_subset(entries, per_split: int):
    out, seen = [], {}
    for e in entries:
        key = (e.split, e.duplicates)
        if seen.get(key, 0) < per_split:
            out.append(e)
            seen[key] = seen.get(key, 0) + 1
    return out


def _replication(result, split: str) -> float | None:
    rows = [r for r in result.rows if r["split"] == split and "replication_rate" in r]
    return float(np.mean([r["replication_rate"] for r in rows])) if rows else None


def _drift_block(after) -> dict:
    rows = [r for r in after.rows if r["split"] == "nonmem" and "drift_similarity" in r]
    if not rows:
        return {}
    return {
        "drift_similarity": float(np.mean([r["drift_similarity"] for r in rows])),
        "seed_similarity_before": float(np.mean([r["seed_similarity_before"] for r in rows])),
        "within_spread_fraction": float(np.mean([r["drift_within_seed_spread"] for r in rows])),
        "pixel_drift": float(np.mean([r["pixel_drift"] for r in rows])),
    }


def run_demo(config: DemoConfig | None = None, progress: bool = True) -> dict:
    """Run the demo and write ``report.json``, ``report.html`` and the pruned export under ``config.out``.

    Returns:
        The report dictionary (also holding ``headline_text``).
    """
    from diffmem.config import LocateConfig, RecordConfig
    from diffmem.data import read_manifest, read_prompts
    from diffmem.detect import DetectConfig, detect
    from diffmem.evaluate import EvalConfig, evaluate, evaluate_edit
    from diffmem.hooks import record
    from diffmem.locate import locate, mask_iou
    from diffmem.metrics import roc_curve
    from diffmem.pipelines import load_pipeline
    from diffmem.prune import apply_mask, export_pruned
    from diffmem.score import get_scorer
    from diffmem.zoo import default_model_path, sampling_defaults

    config = config or DemoConfig()
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 2)

    model = Path(config.model) if config.model else default_model_path()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = model / "memorization.jsonl"
    if not manifest.is_file():
        from diffmem.errors import PromptFileError

        raise PromptFileError(f"{manifest}: the demo needs a ground-truth manifest next to the model")
    entries = read_manifest(manifest)
    base_file = model / "base_prompts.txt"
    base_prompts = [""] + (read_prompts(base_file) if base_file.is_file() else [])
    if config.quick:
        entries = _quick_subset(entries, 1)
        base_prompts = base_prompts[:7]
    eval_prompts = {e.prompt for e in entries}
    overlap = eval_prompts & set(base_prompts)
    if overlap:
        raise ValueError(f"base prompts overlap the evaluation prompts (e.g. {sorted(overlap)[0]!r})")

    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    defaults = sampling_defaults(model)
    steps = int(defaults.get("num_inference_steps", 50))
    call = {k: v for k, v in defaults.items() if v is not None}
    locate_entries = [e for e in entries if e.split == "locate"]
    logger.info("model %s: %d prompts (%d locate), %d base prompts", model, len(entries), len(locate_entries),
                len(base_prompts))

    # 1. detection ------------------------------------------------------------------------------------------
    dcfg = DetectConfig(steps=1, num_seeds=config.detect_seeds, seed=config.seed, num_inference_steps=steps,
                        guidance_scale=defaults.get("guidance_scale", 7.5),
                        guidance_rescale=defaults.get("guidance_rescale", 0.0), height=defaults.get("height"),
                        width=defaults.get("width"))
    det = detect(pipe, [e.prompt for e in entries], dcfg, labels=[e.memorized for e in entries], progress=progress)
    fpr, tpr, _ = roc_curve(det.scores, det.labels)
    lap("detect")

    # 2. record ---------------------------------------------------------------------------------------------
    rcfg = RecordConfig(num_inference_steps=steps, record_steps=min(config.record_steps, steps),
                        guidance_scale=defaults.get("guidance_scale", 7.5), batch_size=16, seed=config.seed,
                        height=defaults.get("height"), width=defaults.get("width"),
                        signatures=config.compare_directions)
    extra = {"guidance_rescale": defaults["guidance_rescale"]} if defaults.get("guidance_rescale") else None
    half_a, half_b = _stratified_halves(locate_entries)
    stats_a = record(pipe, [e.prompt for e in half_a], rcfg, progress=progress, model_id=str(model), pipe_kwargs=extra)
    stats_b = record(pipe, [e.prompt for e in half_b], rcfg, progress=progress, model_id=str(model), pipe_kwargs=extra)
    stats_base = record(pipe, base_prompts, rcfg, progress=progress, model_id=str(model), pipe_kwargs=extra)
    import copy

    stats_mem = copy.deepcopy(stats_a).merge_(stats_b)
    stats_mem.save(out / "stats_memorized")
    stats_base.save(out / "stats_base")
    lap("record")

    # 3. locate (ratio sweep on the locate split only) --------------------------------------------------------
    scorer = get_scorer(config.scorer, fallback="ssim") if config.scorer == "sscd" else get_scorer(config.scorer)

    def make_cfg(ratio: float) -> LocateConfig:
        return LocateConfig(method=config.method, ratio=ratio, steps=rcfg.record_steps)

    sweep_rows = []
    sweep_cfg = EvalConfig(num_seeds=config.sweep_seeds, seed=config.seed + 1000, call_kwargs=call)
    if config.ratio is None:
        for ratio in config.sweep:
            m = locate(pipe, stats_mem, stats_base, make_cfg(ratio))
            with apply_mask(pipe, m):
                res = evaluate(pipe, locate_entries, sweep_cfg, scorer, progress=False)
            rep = _replication(res, "locate")
            sweep_rows.append({"ratio": ratio, "weights_zeroed": m.num_masked(), "fraction": m.fraction(),
                               "locate_replication": rep})
            logger.info("sweep ratio %.3f: %d weights, locate replication %.3f", ratio, m.num_masked(), rep)
            if rep is not None and rep <= config.target_replication:
                break
        ok = [r for r in sweep_rows if r["locate_replication"] is not None
              and r["locate_replication"] <= config.target_replication]
        chosen = ok[0]["ratio"] if ok else min(sweep_rows, key=lambda r: r["locate_replication"])["ratio"]
    else:
        chosen = config.ratio
    mask = locate(pipe, stats_mem, stats_base, make_cfg(chosen))
    mask_path = mask.save(out / "mask")
    lap("locate")

    # 4. shared subspace: masks from disjoint halves -------------------------------------------------------------
    mask_a = locate(pipe, stats_a, stats_base, make_cfg(chosen))
    mask_b = locate(pipe, stats_b, stats_base, make_cfg(chosen))
    iou = mask_iou(mask_a, mask_b)
    # chance level: expected IoU of two random masks of the same per-layer sizes
    chance_i = chance_u = 0.0
    for name, ma in mask_a.layers.items():
        n = ma.numel()
        ka, kb = int(ma.sum()), int(mask_b.layers[name].sum())
        inter = ka * kb / n if n else 0.0
        chance_i += inter
        chance_u += ka + kb - inter
    iou_block = {"overall": iou["overall"], "per_layer": iou["per_layer"],
                 "chance_overall": chance_i / chance_u if chance_u else 0.0,
                 "subset_sizes": [len(half_a), len(half_b)],
                 "weights": [mask_a.num_masked(), mask_b.num_masked()]}
    lap("iou")

    # 5. evaluate before / after ---------------------------------------------------------------------------------
    ecfg = EvalConfig(num_seeds=config.eval_seeds, seed=config.seed, call_kwargs=call)
    before, after = evaluate_edit(pipe, entries, ecfg, scorer, mask, progress=progress)
    lap("evaluate")

    # 6. extraction attack before / after -------------------------------------------------------------------------
    from diffmem.attack import AttackConfig, extraction_attack

    attack_scorer = get_scorer(config.attack_scorer)
    acfg = AttackConfig(num_generations=config.attack_generations, seed=config.seed + 5000,
                        clique_size=config.clique_size, false_flag_rate=config.false_flag_rate)
    attack_entries = [e for e in entries if e.split == "heldout"]
    attack_entries += [e for e in entries if e.split == "nonmem"][: config.attack_nonmem]
    size = (int(defaults["height"]), int(defaults["width"])) if defaults.get("height") else None
    from diffmem.evaluate import load_reference

    refs = [None if e.reference is None else load_reference(e.reference, size) for e in attack_entries]
    calib = [p for p in base_prompts if p][: config.calibration_prompts]
    att_before = extraction_attack(pipe, [e.prompt for e in attack_entries], acfg, attack_scorer, references=refs,
                                   calibration_prompts=calib, call_kwargs=call, out_dir=out / "attack_before",
                                   progress=progress)
    acfg_after = AttackConfig(**{**acfg.to_dict(), "threshold": att_before.threshold})
    with apply_mask(pipe, mask):
        att_after = extraction_attack(pipe, [e.prompt for e in attack_entries], acfg_after, attack_scorer,
                                      references=refs, calibration_prompts=None, call_kwargs=call,
                                      out_dir=out / "attack_after", progress=progress)
    lap("attack")

    # directions (optional) ------------------------------------------------------------------------------------
    directions_block = None
    if config.compare_directions:
        from diffmem.directions import compare_with_mask

        directions_block = compare_with_mask(
            pipe, stats_mem, stats_base, stats_a, stats_b, mask, entries, ecfg, scorer, before,
            attack=(attack_entries, acfg_after, attack_scorer, refs, None, call), out=out, progress=progress,
            target_replication=config.target_replication, ranks=config.direction_ranks, mask_after=after)
        directions_block["comparison"]["mask_verified_extractions_after"] = att_after.summary()["num_verified_prompts"]
        lap("directions")

    # 7. export ----------------------------------------------------------------------------------------------
    export_dir = export_pruned(pipe, mask, out / "pruned", overwrite=True, source=str(model), mask_path=mask_path,
                               config={"locate": make_cfg(chosen).to_dict(), "record": rcfg.to_dict(),
                                       "demo": config.to_dict()})
    lap("export")

    # 8. report ----------------------------------------------------------------------------------------------
    attack_dups = {str(e.duplicates) for e in attack_entries}
    report: dict[str, Any] = {
        "model": str(model),
        "sampler": defaults,
        "settings": config.to_dict(),
        "scorer": scorer.describe(),
        "attack_scorer": attack_scorer.describe(),
        "detection": {"auc": det.auc, "tpr_at_1pct_fpr": det.tpr_at_1fpr, "config": dcfg.to_dict(),
                      "roc": {"fpr": [float(x) for x in fpr], "tpr": [float(x) for x in tpr]},
                      "scores": [{"prompt": p, "score": float(s), "memorized": bool(lab)}
                                 for p, s, lab in zip(det.prompts, det.scores, det.labels)]},
        "mask": {"method": config.method, "ratio": chosen, "weights_zeroed": mask.num_masked(),
                 "fraction": mask.fraction(), "total_ffn_weights": mask.num_total(), "per_layer": mask.counts(),
                 "path": str(mask_path), "sweep": sweep_rows, "record_steps": rcfg.record_steps},
        "iou_subsets": iou_block,
        "before": before.summary(),
        "after": after.summary(),
        "drift": _drift_block(after),
        "attack": {"before": att_before.summary(), "after": att_after.summary(),
                   "prompts": len(attack_entries), "duplicates": sorted(attack_dups, key=int)},
        "rows": {"before": before.rows, "after": after.rows},
        "export": {"path": str(export_dir)},
        "timings_s": timings,
    }
    if directions_block is not None:
        report["directions"] = directions_block
    report["headline"] = _headline(report)
    report["headline_text"] = _headline_text(report, out)
    report["total_seconds"] = round(time.time() - t0, 1)
    from diffmem.report import write_report

    write_report(report, out, before=before, after=after, entries=entries)
    return report


def _headline(r: dict) -> dict:
    def rep(block: str, split: str):
        return (r[block].get(split) or {}).get("replication_rate")

    return {
        "heldout_replication_before": rep("before", "heldout"),
        "heldout_replication_after": rep("after", "heldout"),
        "locate_replication_before": rep("before", "locate"),
        "locate_replication_after": rep("after", "locate"),
        "nonmem_replication_before": rep("before", "nonmem"),
        "nonmem_replication_after": rep("after", "nonmem"),
        "nonmem_drift_within_spread": r["drift"].get("within_spread_fraction"),
        "verified_extractions_before": r["attack"]["before"]["num_verified_prompts"],
        "verified_extractions_after": r["attack"]["after"]["num_verified_prompts"],
        "weights_zeroed": r["mask"]["weights_zeroed"],
        "fraction_zeroed": r["mask"]["fraction"],
        "iou_subsets": r["iou_subsets"]["overall"],
        "detection_auc": r["detection"]["auc"],
    }


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _headline_text(r: dict, out: Path) -> str:
    h = r["headline"]
    lines = [
        f"diffmem demo on {r['model']} (scorer {r['scorer']['name']}, threshold {r['scorer']['threshold']})",
        f"  held-out memorized replication: {_fmt(h['heldout_replication_before'])} -> {_fmt(h['heldout_replication_after'])}",
        f"  locate-split replication:       {_fmt(h['locate_replication_before'])} -> {_fmt(h['locate_replication_after'])}",
        f"  non-memorized replication:      {_fmt(h['nonmem_replication_before'])} -> {_fmt(h['nonmem_replication_after'])}"
        f" (drift within seed spread for {_fmt(h['nonmem_drift_within_spread'])} of prompts)",
        f"  verified extractions:           {h['verified_extractions_before']} -> {h['verified_extractions_after']} prompts",
        f"  mask: {h['weights_zeroed']} weights ({100 * h['fraction_zeroed']:.3f}% of FFN output weights),"
        f" ratio {r['mask']['ratio']}; IoU of masks from disjoint halves {_fmt(h['iou_subsets'])}"
        f" (chance {_fmt(r['iou_subsets']['chance_overall'])})",
        f"  detection AUC (Wen et al., 1 step): {_fmt(h['detection_auc'])}",
    ]
    if "directions" in r and r["directions"].get("headline"):
        d = r["directions"]["headline"]
        lines.append(f"  projection editor: held-out replication {_fmt(d.get('heldout_replication_after'))},"
                     f" {d.get('parameters_changed')} parameters changed")
    lines.append(f"report: {out / 'report.html'} ({out / 'report.json'}), pruned pipeline: {out / 'pruned'}")
    return "\n".join(lines)


@dataclass
class AuditConfig:
    """Settings of ``diffmem audit`` on any checkpoint.

    Args:
        model: Pipeline folder or hub id.
        prompts: Prompt file or manifest to audit.
        references: Manifest or folder with ``references.jsonl``; without it the audit stops at detection and
            the attack.
        out: Output folder.
        calibration: Non-memorized prompts (calibrate detection flags and the attack threshold).
        allow_pickle: Accept pickled weights.
        quick: Reduced settings.
    """

    model: str
    prompts: str
    references: str | None = None
    out: str = "runs/audit"
    calibration: str | None = None
    allow_pickle: bool = False
    quick: bool = False
    seeds: int = 8
    generations: int = 16
    detect_seeds: int = 4
    scorer: str = "sscd"
    attack_scorer: str = "ssim"
    extras: dict = field(default_factory=dict)


def run_audit(config: AuditConfig, progress: bool = True) -> dict:
    """Detection, extraction attack and (with references) replication measurement of any checkpoint.

    Returns:
        The report (also written to ``<out>/report.json`` and ``report.html``).
    """
    from diffmem.attack import AttackConfig, extraction_attack
    from diffmem.cli import _entries, _references
    from diffmem.data import read_prompts
    from diffmem.detect import DetectConfig, detect
    from diffmem.evaluate import EvalConfig, evaluate, load_reference
    from diffmem.metrics import roc_curve
    from diffmem.pipelines import load_pipeline
    from diffmem.score import get_scorer
    from diffmem.zoo import sampling_defaults

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = _entries(config.prompts)
    refs = _references(config.references, entries) if config.references else [e.reference for e in entries]
    calib = read_prompts(config.calibration) if config.calibration else None
    pipe = load_pipeline(config.model, allow_pickle=config.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    defaults = sampling_defaults(config.model) if Path(config.model).is_dir() else {}
    call = {k: v for k, v in defaults.items() if v is not None}
    seeds = 2 if config.quick else config.seeds
    gens = 4 if config.quick else config.generations
    dcfg = DetectConfig(steps=1, num_seeds=1 if config.quick else config.detect_seeds,
                        num_inference_steps=int(defaults.get("num_inference_steps", 50)),
                        guidance_scale=defaults.get("guidance_scale", 7.5), height=defaults.get("height"),
                        width=defaults.get("width"))
    labels = [e.memorized for e in entries] if any(e.memorized for e in entries) else None
    det = detect(pipe, [e.prompt for e in entries], dcfg, labels=labels, calibration_prompts=calib, progress=progress)
    report: dict[str, Any] = {"model": config.model, "sampler": defaults, "settings": asdict(config),
                              "detection": {**det.summary(), "ranked": det.ranked()}}
    if det.labels is not None and det.auc is not None:
        fpr, tpr, _ = roc_curve(det.scores, det.labels)
        report["detection"]["roc"] = {"fpr": [float(x) for x in fpr], "tpr": [float(x) for x in tpr]}
    attack_scorer = get_scorer(config.attack_scorer)
    size = (int(defaults["height"]), int(defaults["width"])) if defaults.get("height") else None
    ref_imgs = [None if r is None else load_reference(r, size) for r in refs]
    acfg = AttackConfig(num_generations=gens, clique_size=2 if config.quick else 4,
                        threshold=None if calib else attack_scorer.threshold)
    att = extraction_attack(pipe, [e.prompt for e in entries], acfg, attack_scorer,
                            references=ref_imgs if any(r is not None for r in ref_imgs) else None,
                            calibration_prompts=calib, call_kwargs=call, out_dir=out / "attack", progress=progress)
    report["attack"] = att.summary()
    if not calib:
        report["attack"]["note"] = "no calibration prompts: the scorer's replication threshold was used as is"
    result = None
    if any(r is not None for r in refs):
        from dataclasses import replace

        with_refs = [replace(e, reference=r) for e, r in zip(entries, refs)]
        scorer = get_scorer(config.scorer, fallback="ssim") if config.scorer == "sscd" else get_scorer(config.scorer)
        result = evaluate(pipe, with_refs, EvalConfig(num_seeds=seeds, call_kwargs=call), scorer, progress=progress)
        report["before"] = result.summary()
        report["scorer"] = scorer.describe()
        report["rows"] = {"before": result.rows}
    lines = [f"diffmem audit of {config.model}: {len(entries)} prompts"]
    if det.auc is not None:
        lines.append(f"  detection AUC {_fmt(det.auc)}, TPR@1%FPR {_fmt(det.tpr_at_1fpr)}")
    if det.flagged is not None:
        lines.append(f"  detection flags {int(det.flagged.sum())} prompts above {det.threshold:.4g}")
    s = report["attack"]
    lines.append(f"  extraction attack: {s['num_flagged']} prompts flagged, {s['num_verified_prompts']} verified")
    if result is not None:
        rr = [r["replication_rate"] for r in result.rows if "replication_rate" in r]
        lines.append(f"  replication rate vs references: {_fmt(float(np.mean(rr)))}")
    lines.append(f"report: {out / 'report.html'}")
    report["headline_text"] = "\n".join(lines)
    from diffmem.report import write_report

    write_report(report, out, before=result, after=None, entries=entries)
    return report
