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
from diffmem.crossfit import measure_rows, sampler_variants, summarise_rows
from diffmem.data import ManifestEntry, read_manifest
from diffmem.edits import Edit, apply_edit, check_output_dir, export_edited
from diffmem.errors import ConfigError
from diffmem.evaluation import EvalConfig, EvalResult, evaluate
from diffmem.files import replace_dir
from diffmem.mitigation import MitigateConfig, mitigate
from diffmem.pipelines import load_pipeline
from diffmem.reextraction import ReextractConfig
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
    folds: int = 3
    robust_aggregate: str = "shared"


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _spread(rows: list[ManifestEntry], count: int | None) -> list[ManifestEntry]:
    """``count`` rows evenly spread over ``rows`` (all of them without a count)."""
    step = max(1, len(rows) // count) if count else 1
    return rows[::step][:count]


def edit_row(pipe: Any, name: str, edit: Edit | None, entries: list[ManifestEntry], scorer: Any, call: dict,
             *, eval_seeds: int, attack: ReextractConfig, seconds: float, controls: int | None = None,
             baseline: EvalResult | None = None, progress: bool = True,
             inits: tuple[str, ...] = ("prompt", "random"),
             attack_samplers: tuple[str, ...] = ("model", "diffusers-default")) -> tuple[dict[str, Any], dict[str, Any]]:
    """One row of the main table, and the attack's summary (with its rate-vs-steps curve).

    Held-out memorized rows are measured with the prompt at every sampler of
    :data:`~diffmem.crossfit.SAMPLER_NAMES` and under the re-extraction attack from every start in ``inits``
    (a seed counts as replicated when any start replicates it), sampled at ``attack_samplers``. The same attack,
    with the same budget, runs on two controls at the model's sampler: ``nonmem`` rows (training images seen once)
    and ``never_seen`` rows (images like the memorized ones that are in no training set). The figure that counts
    is the held-out rate's advantage over the never-seen rate. ``controls`` caps each control set (rows spread
    evenly). The row also holds drift, size, the time to find the edit (``seconds``) and the time of this
    measurement. ``baseline`` is the unedited evaluation of the ``nonmem`` rows with the same settings; it is
    computed when not given (pass it when measuring several edits).
    """
    heldout = [e for e in entries if e.split == "heldout" and e.reference is not None]
    nonmem = [e for e in entries if e.split == "nonmem"]
    once_seen = _spread([e for e in nonmem if e.reference is not None], controls)
    never_seen = _spread([e for e in entries if e.split == "never_seen" and e.reference is not None], controls)
    ecfg = EvalConfig(num_seeds=eval_seeds, seed=0, call_kwargs=call)
    samplers = sampler_variants(call, pipe=pipe)
    t0 = time.time()
    if baseline is not None and [r["prompt"] for r in baseline.rows] != [e.prompt for e in nonmem]:
        raise ValueError("baseline must be the unedited evaluation of the nonmem rows, in order")
    base = baseline if baseline is not None or not nonmem else evaluate(pipe, nonmem, ecfg, scorer, progress=False)
    with apply_edit(pipe, edit), torch.no_grad():
        drift = evaluate(pipe, nonmem, ecfg, scorer, baseline=base, progress=False) if base is not None else None
    summaries: dict[str, Any] = {}
    held = summarise_rows(measure_rows(pipe, edit, heldout, scorer, samplers, attack=attack, inits=inits,
                                       attack_samplers=attack_samplers, num_seeds=eval_seeds, seed=0,
                                       progress=progress, summaries=summaries))
    plain = replace(attack, checkpoints=())
    own = {"model": samplers["model"]}
    once = summarise_rows(measure_rows(pipe, edit, once_seen, scorer, own, attack=plain, inits=inits,
                                       num_seeds=eval_seeds, seed=0, progress=False))
    never = summarise_rows(measure_rows(pipe, edit, never_seen, scorer, own, attack=plain, inits=inits,
                                        num_seeds=eval_seeds, seed=0, progress=False))
    held_attack = held["attack"].get("model")
    never_rate = never["attack"].get("model")
    row = {
        "name": name,
        "heldout_replication_prompt": held["prompt"].get("model"),
        "heldout_replication_attack": held_attack,
        "heldout_prompt_by_sampler": held["prompt"],
        "heldout_attack_by_sampler": held["attack"],
        "heldout_attack_by_start": held["attack_by_init"],
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
    logger.info("%s: held-out replication %s with the prompt, %s under attack; controls: once-seen %s, never-seen %s",
                name, row["heldout_replication_prompt"], row["heldout_replication_attack"], row["control_rate"],
                row["never_seen_rate"])
    summary = dict(summaries.get(inits[0], {}))
    summary["memorization_rate"] = held_attack
    summary["control_rate"] = row["control_rate"]
    summary["never_seen_rate"] = never_rate
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
                          max_rounds=run.max_rounds, seed=run.seed, folds=run.folds,
                          robust_aggregate=run.robust_aggregate,
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
                      settings={"mitigation": mcfg.to_dict(), "sampler": call}, results=_card_rows(report))
        write_report(report, folder)

    pipe.scheduler = own_scheduler  # the export keeps the model's scheduler
    replace_dir(out, fill)
    return report


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
        lines.append(f"  on the {given.get('rows')} memorized prompts given: replication {_fmt(given['prompt'].get('model'))}"
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
    lines.append(f"outputs: {out / 'pruned'}, {out / 'report.html'}")
    return "\n".join(lines)
