"""``diffmem mitigate``: the product command, and the per-edit table that the demo and the report share.

:func:`run_mitigate` loads a model and its manifest, runs :func:`diffmem.mitigation.mitigate` on the ``locate``
and ``nonmem`` rows only, then (and only then) evaluates the result on the ``heldout`` rows: replication with the
prompt, replication under the re-extraction attack (held-out seeds and an optimisation seed that mitigation never
used), the control rate on non-memorized training images, and the drift of non-memorized prompts. It exports the
edited pipeline to ``OUT/pruned/``, saves the edit, and writes ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.config import SamplerConfig
from diffmem.data import ManifestEntry, load_reference, read_manifest
from diffmem.edits import Edit, apply_edit, check_output_dir, export_edited
from diffmem.errors import ConfigError
from diffmem.evaluation import EvalConfig, EvalResult, evaluate
from diffmem.files import replace_dir
from diffmem.mitigation import MitigateConfig, mitigate
from diffmem.pipelines import load_pipeline
from diffmem.reextraction import ReextractConfig, ReextractItem, reextract
from diffmem.sampling import image_size
from diffmem.score import get_scorer

logger = logging.getLogger(__name__)

__all__ = ["MitigateRun", "run_mitigate", "edit_row", "OUTPUT_MARK"]

OUTPUT_MARK = "report.json"  # a folder holding it is an earlier diffmem run output that may be replaced


@dataclass
class MitigateRun:
    """Settings of ``diffmem mitigate`` (see the CLI help)."""

    model: str
    prompts: str
    out: str
    method: str = "wanda"
    ratio: float | None = None
    robust: str = "none"
    target: float = 0.05
    max_rounds: int = 3
    scorer: str = "ssim"
    scorer_weights: str | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    allow_outside: bool = False
    opt_steps: int = 50
    eval_seeds: int = 4
    seed: int = 0
    sampler: dict[str, Any] | None = None  # SamplerConfig fields the user gave; the rest: the model's defaults


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def edit_row(pipe: Any, name: str, edit: Edit | None, entries: list[ManifestEntry], scorer: Any, call: dict,
             *, eval_seeds: int, attack: ReextractConfig, seconds: float, controls: int | None = None,
             baseline: EvalResult | None = None, progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """One row of the main table, and the attack's summary (with its rate-vs-steps curve).

    The row holds held-out replication with the prompt and under attack, the control rate, drift, size, the time
    it took to find the edit (``seconds``, given by the caller) and the time of this measurement. The
    attack runs on the held-out memorized rows and, as the false-positive control, on the ``nonmem`` rows (their
    training images; ``controls`` of them, evenly spread, when given), with the same budget. ``baseline`` is the
    unedited evaluation of the ``nonmem`` rows with the same settings; it is computed when not given (pass it when
    measuring several edits).
    """
    heldout = [e for e in entries if e.split == "heldout" and e.reference is not None]
    nonmem = [e for e in entries if e.split == "nonmem"]
    ecfg = EvalConfig(num_seeds=eval_seeds, seed=0, call_kwargs=call)
    candidates = [e for e in nonmem if e.reference is not None]
    step = max(1, len(candidates) // controls) if controls else 1
    attacked_controls = candidates[::step][:controls]  # spread over the rows, not the first few
    t0 = time.time()
    if baseline is not None and [r["prompt"] for r in baseline.rows] != [e.prompt for e in nonmem]:
        raise ValueError("baseline must be the unedited evaluation of the nonmem rows, in order")
    base = baseline if baseline is not None or not nonmem else evaluate(pipe, nonmem, ecfg, scorer, progress=False)
    with apply_edit(pipe, edit), torch.no_grad():
        held = evaluate(pipe, heldout, ecfg, scorer, progress=progress, desc=f"{name}: held-out")
        drift = evaluate(pipe, nonmem, ecfg, scorer, baseline=base, progress=False) if base is not None else None
    size = image_size(pipe, call.get("height"), call.get("width"))
    items = [ReextractItem(e.prompt, load_reference(e.reference, size, row=e), "memorized") for e in heldout]
    items += [ReextractItem(e.prompt, load_reference(e.reference, size, row=e), "control") for e in attacked_controls]
    with apply_edit(pipe, edit):
        att = reextract(pipe, items, attack, scorer, progress=progress)
    summary = att.summary()
    row = {
        "name": name,
        "heldout_replication_prompt": _mean([r["replication_rate"] for r in held.rows if "replication_rate" in r]),
        "heldout_replication_attack": summary["memorization_rate"],
        "control_rate": summary["control_rate"],
        "parameters_changed": 0 if edit is None else edit.num_params_changed(),
        "fraction_changed": 0.0 if edit is None else edit.fraction_changed(),
        "wall_time_s": round(seconds, 1),
        "measure_time_s": round(time.time() - t0, 1),
    }
    if drift is not None:
        row["drift_similarity"] = _mean([r["drift_similarity"] for r in drift.rows])
        row["seed_similarity_before"] = _mean([r["seed_similarity_before"] for r in drift.rows])
        row["drift_within_spread"] = _mean([float(r["drift_within_seed_spread"]) for r in drift.rows])
    logger.info("%s: held-out replication %s with the prompt, %s under attack, control %s", name,
                row["heldout_replication_prompt"], row["heldout_replication_attack"], row["control_rate"])
    return row, summary


def final_attack_config(opt_steps: int, call: dict, seed: int, num_seeds: int = 4) -> ReextractConfig:
    """The evaluation attack: held-out seeds and an optimisation seed that mitigation never used."""
    return ReextractConfig(opt_steps=opt_steps, checkpoints=tuple(c for c in (0, 10, 25, 50) if c <= opt_steps),
                           num_seeds=num_seeds, sample_seed=20_000 + seed, seed=seed + 1, call_kwargs=call)


def run_mitigate(run: MitigateRun, progress: bool = True) -> dict[str, Any]:
    """Run ``diffmem mitigate`` and write its outputs; returns the report (with ``headline_text``)."""
    from diffmem.workflows.report import write_report

    t0 = time.time()
    out = Path(run.out)
    _check_run_output(out, run.overwrite, run.model)
    entries = read_manifest(run.prompts, allow_outside=run.allow_outside)
    for e in entries:  # the attack needs every training image of the rows it uses: fail before the slow work
        if e.split in ("locate", "nonmem") and e.reference is None:
            raise ConfigError(f"{e.row}: row {e.prompt!r} has no reference image; mitigation attacks it")
    SamplerConfig.resolve(run.model, **(run.sampler or {}))  # checks the sampler settings before the model loads
    scorer = (get_scorer(run.scorer, weights=run.scorer_weights, allow_pickle=run.allow_pickle) if run.scorer_weights
              else get_scorer(run.scorer))
    pipe = load_pipeline(run.model, allow_pickle=run.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig.resolve(pipe, **(run.sampler or {}))
    call, own_scheduler = sampler.call_kwargs(pipe), sampler.apply_scheduler(pipe)
    mcfg = MitigateConfig(method=run.method, ratio=run.ratio, robust=run.robust, target=run.target,
                          max_rounds=run.max_rounds, seed=run.seed,
                          attack=ReextractConfig(opt_steps=run.opt_steps, checkpoints=(), num_seeds=2,
                                                 seed=run.seed, sample_seed=10_000 + run.seed))
    visible = [e for e in entries if e.split in ("locate", "nonmem")]  # held-out rows stay unseen
    result = mitigate(pipe, visible, mcfg, scorer, call_kwargs=call, progress=progress)
    mitigation_s = time.time() - t0
    heldout = [e for e in entries if e.split == "heldout" and e.reference is not None]
    unmeasured = sum(1 for e in entries if e.split == "heldout" and e.reference is None)
    if unmeasured:
        logger.warning("%d held-out rows have no reference image: they are not measured", unmeasured)
    row = None
    if heldout:
        row, attack_summary = edit_row(pipe, f"{run.method} ({run.robust})", result.edit, entries, scorer, call,
                                       eval_seeds=run.eval_seeds, seconds=mitigation_s, progress=progress,
                                       attack=final_attack_config(run.opt_steps, call, run.seed))

    report = {
        "title": "diffmem mitigate", "model": run.model, "sampler": sampler.to_dict(), "scorer": scorer.describe(),
        "settings": {**asdict(run), "mitigation": mcfg.to_dict()}, "mitigation": result.summary(),
        "edits": [row] if row else [], "total_seconds": round(time.time() - t0, 1),
    }
    if row:
        report["reextract"] = {row["name"]: attack_summary}
    report["headline_text"] = _headline(report, out)

    def fill(folder: Path) -> None:
        result.edit.save(folder / "edit")
        export_edited(pipe, result.edit, folder / "pruned", source=run.model, edit_path=folder / "edit",
                      settings={"mitigation": mcfg.to_dict(), "sampler": call})
        write_report(report, folder)

    pipe.scheduler = own_scheduler  # the export keeps the model's scheduler
    replace_dir(out, fill)
    return report


def _check_run_output(out: Path, overwrite: bool, source: str) -> None:
    """An output folder may be replaced only when it is an earlier diffmem run output; never the input model."""
    check_output_dir(out, overwrite, source, marks=(OUTPUT_MARK,))


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _headline(report: dict, out: Path) -> str:
    lines = [f"diffmem mitigate on {report['model']} (scorer {report['scorer']['name']})"]
    m = report["mitigation"]
    lines.append(f"  edit: {m['kind']}, strength {m['strength']}, {m['parameters_changed']} weights changed")
    for r in report["edits"]:
        lines.append(f"  held-out replication: {_fmt(r['heldout_replication_prompt'])} with the prompt, "
                     f"{_fmt(r['heldout_replication_attack'])} under the re-extraction attack "
                     f"(control {_fmt(r['control_rate'])})")
        if r.get("drift_within_spread") is not None:
            lines.append(f"  non-memorized drift within seed spread for {_fmt(r['drift_within_spread'])} of prompts")
    lines.append(f"outputs: {out / 'pruned'}, {out / 'report.html'}")
    return "\n".join(lines)
