"""Benchmark ``diffmem mitigate`` over the zoo: does the edit hold on memorized images it was never given?

For every zoo model present on disk (``diffmem.zoo.members.zoo_models``; or ``--models``), the product command
runs as a user would: :func:`diffmem.workflows.mitigate.run_mitigate` sees only the ``locate`` rows (memorized
prompts with their training images) and the ``nonmem`` rows; then, and only then, the ``heldout`` memorized rows
are measured:

* with the prompt at three sampler settings (the model's own, diffusers' defaults, twice the guidance);
* under the re-extraction attack (50 Adam steps on the conditioning, lr 0.1, batch 8) from the prompt's
  conditioning and from a random one, a seed counting as replicated when either start replicates it, sampled at
  the model's sampler and at diffusers' defaults;
* the same attack on ``never_seen`` images (like the memorized ones, in no training set) and on once-seen
  training images (``nonmem``): the figure that counts is the held-out rate's advantage over the never-seen rate.

Beside them: the in-sample rates (on the ``locate`` rows the edit was fitted on) and the out-of-fold estimate that
mitigate reports about itself ("expected on memorized images not given"), with its spread over folds, and whether
that estimate falls within ``--tolerance`` (0.15) of the measured held-out rate. ``--baseline`` adds the unedited
model's held-out rates.

Result lines (one per model)::

    mitigate model=<name> heldout_prompt=<rate> heldout_attack=<rate> estimate_prompt=<rate> estimate_attack=<rate>
        never_seen=<rate> advantage=<rate> drift_within_spread=<share> weights=<n> seconds=<s>

then a markdown table, and everything as JSON in ``--out`` (default ``benchmarks/results/mitigate.json``).

Run ``python benchmarks/bench_mitigate.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench_mitigate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="zoo member names or model folders (default: all present)")
    p.add_argument("--robust", default="prune", choices=["none", "prune", "finetune"])
    p.add_argument("--robust-aggregate", default="shared", choices=["shared", "sum"])
    p.add_argument("--robust-fraction", type=float, default=0.002,
                   help="share of the denoiser's weights one robust pruning round may add")
    p.add_argument("--robust-gate", action="store_true", help="robust rounds held to the quality vetoes")
    p.add_argument("--redirect", type=float, default=None, help="redirect the memorized prompts (LAMBDA)")
    p.add_argument("--repair", type=int, default=0, help="repair steps after the deletion (0: off)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--margin-steps", type=int, default=1)
    p.add_argument("--min-rounds", type=int, default=1)
    p.add_argument("--max-rounds", type=int, default=3)
    p.add_argument("--eval-seeds", type=int, default=4)
    p.add_argument("--opt-steps", type=int, default=50)
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--baseline", action="store_true", help="also measure the unedited model's held-out rates")
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed |estimate - held-out| gap")
    p.add_argument("--work", default="runs/bench-mitigate", help="where each model's mitigate output goes")
    p.add_argument("--out", default="benchmarks/results/mitigate.json")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def _models(names: Sequence[str] | None) -> dict[str, Path]:
    from diffmem.zoo.members import MEMBERS, zoo_model_path, zoo_models

    if not names:
        return zoo_models()
    out = {}
    for n in names:
        path = zoo_model_path(n) if n in MEMBERS else Path(n)
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"bench_mitigate: {n}: no model at {path}")
        out[n if n in MEMBERS else path.name] = path
    return out


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def run_model(name: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Mitigate one model as a user would, then measure its held-out rows and controls."""
    from diffmem.workflows.mitigate import MitigateRunConfig, run_mitigate

    t0 = time.time()
    run = MitigateRunConfig(model=str(path), prompts=str(path / "memorization.jsonl"), out=str(Path(args.work) / name),
                            robust=args.robust, robust_aggregate=args.robust_aggregate, folds=args.folds,
                            robust_fraction=args.robust_fraction, robust_gate=args.robust_gate, redirect=args.redirect,
                            repair=args.repair,
                            margin_steps=args.margin_steps, min_rounds=args.min_rounds,
                            max_rounds=args.max_rounds, eval_num_seeds=args.eval_seeds, opt_steps=args.opt_steps,
                            scorer=args.scorer, overwrite=True)
    report = run_mitigate(run, progress=False)
    est = report["mitigation"]["estimate"]
    row = report["edits"][0] if report["edits"] else {}
    oof = est.get("out_of_fold") or {}
    given = est.get("in_sample") or {}
    out = {
        "model": name,
        "in_sample_prompt": given.get("prompt", {}).get("model"),
        "in_sample_attack": (given.get("attack") or {}).get("model"),
        "estimate_prompt": oof.get("prompt", {}).get("model"),
        "estimate_prompt_spread": oof.get("spread", {}).get("prompt", {}).get("model"),
        "estimate_attack": oof.get("attack", {}).get("model"),
        "estimate_attack_spread": oof.get("spread", {}).get("attack", {}).get("model"),
        "estimate_by_sampler": {"prompt": oof.get("prompt"), "attack": oof.get("attack")},
        "heldout_prompt_by_sampler": row.get("heldout_prompt_by_sampler"),
        "heldout_attack_by_sampler": row.get("heldout_attack_by_sampler"),
        "heldout_attack_by_start": row.get("heldout_attack_by_start"),
        "heldout_prompt": row.get("heldout_replication_prompt"),
        "heldout_attack": row.get("heldout_replication_attack"),
        "never_seen": row.get("never_seen_rate"),
        "once_seen": row.get("control_rate"),
        "advantage": row.get("attack_advantage"),
        "drift_within_spread": row.get("drift_within_spread"),
        "drift_similarity": row.get("drift_similarity"),
        "drift_within_spread_unseen": row.get("drift_within_spread_unseen"),
        "drift_similarity_unseen": row.get("drift_similarity_unseen"),
        "seed_similarity": row.get("seed_similarity_before"),
        "memorized_becomes": _kid_summary(report.get("quality") or {}),
        "weights_changed": report["mitigation"]["parameters_changed"],
        "fraction_changed": report["mitigation"]["fraction_changed"],
        "strength": report["mitigation"]["strength"],
        "rounds": len(report["mitigation"]["rounds"]),
        "seconds": round(time.time() - t0, 1),
        "timings_s": report["mitigation"]["timings_s"],
    }
    for key in ("prompt", "attack"):
        e, h = out[f"estimate_{key}"], out[f"heldout_{key}"]
        out[f"estimate_gap_{key}"] = None if e is None or h is None else abs(e - h)
        out[f"estimate_within_tolerance_{key}"] = None if e is None or h is None else abs(e - h) <= args.tolerance
    if args.baseline:
        out["unedited"] = _unedited(path, run, args)
    return out


def _kid_summary(quality: dict[str, Any]) -> dict[str, Any] | None:
    """What the memorized prompts render as after the edit: KID to the unedited model's ordinary generations, the
    same prompts and seeds before the edit (``before_*``: the like-for-like yardstick), and KID to the edited model's
    own ordinary generations (``vs_edited_*``)."""
    mem = quality.get("memorized")
    if not isinstance(mem, dict) or "kid_mean" not in mem:
        return None
    out = {k: mem.get(k) for k in ("kid_name", "kid_mean", "kid_std", "baseline_kid_mean", "baseline_kid_std")}
    for key, prefix in (("memorized_before", "before"), ("memorized_vs_edited", "vs_edited")):
        other = quality.get(key)
        if isinstance(other, dict):
            out.update({f"{prefix}_kid_mean": other.get("kid_mean"), f"{prefix}_kid_std": other.get("kid_std")})
    return out


def _unedited(path: Path, run: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out rates of the model without any edit (same measurement as the edited row)."""
    from diffmem.config import SamplerConfig
    from diffmem.data import read_manifest
    from diffmem.pipelines import load_pipeline
    from diffmem.score import get_scorer
    from diffmem.workflows.mitigate import edit_row, final_attack_config

    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig.resolve(pipe)
    entries = read_manifest(path / "memorization.jsonl")
    row, _ = edit_row(pipe, "none", None, entries, get_scorer(args.scorer), sampler, num_seeds=args.eval_seeds,
                      attack=final_attack_config(args.opt_steps, sampler, 0), seconds=0.0, progress=False)
    return {k: row.get(k) for k in ("heldout_replication_prompt", "heldout_replication_attack",
                                    "heldout_prompt_by_sampler", "heldout_attack_by_sampler", "never_seen_rate",
                                    "control_rate", "attack_advantage")}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table: one row per model."""
    head = ("| model | in-sample, prompt / attack | estimate (out of fold), prompt / attack | held-out, prompt: "
            "model / default / 2× guidance | held-out, attack: model / default | never-seen | advantage | drift "
            "within spread | weights | time |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        hp = r.get("heldout_prompt_by_sampler") or {}
        ha = r.get("heldout_attack_by_sampler") or {}
        est = (f"{_fmt(r['estimate_prompt'])} ± {_fmt(r['estimate_prompt_spread'])} / "
               f"{_fmt(r['estimate_attack'])} ± {_fmt(r['estimate_attack_spread'])}")
        lines.append(
            f"| {r['model']} | {_fmt(r['in_sample_prompt'])} / {_fmt(r['in_sample_attack'])} | {est} | "
            f"{_fmt(hp.get('model'))} / {_fmt(hp.get('diffusers-default'))} / {_fmt(hp.get('high-guidance'))} | "
            f"{_fmt(ha.get('model'))} / {_fmt(ha.get('diffusers-default'))} | {_fmt(r['never_seen'])} | "
            f"{_fmt(r['advantage'])} | {_drift(r)} | {r['weights_changed']:,} | "
            f"{r['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def _drift(r: dict[str, Any]) -> str:
    """Drift within spread, with the share on the nonmem rows a repair did not fit on when there was a repair."""
    unseen = r.get("drift_within_spread_unseen")
    return _fmt(r["drift_within_spread"]) + ("" if unseen is None else f" (unseen {_fmt(unseen)})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from diffmem.parallel import choose_num_threads

    threads = args.threads or choose_num_threads()[0]
    if threads:
        torch.set_num_threads(threads)
    models = _models(args.models)
    if not models:
        raise SystemExit("bench_mitigate: no zoo model on disk (train one: python -m diffmem.zoo.train_memorizer)")
    out_path = Path(args.out)
    done: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    rows = []
    for name, path in models.items():
        logger.info("model %s (%s)", name, path)
        r = run_model(name, path, args)
        rows.append(r)
        print(f"mitigate model={name} heldout_prompt={_fmt(r['heldout_prompt'])} "  # noqa: T201
              f"heldout_attack={_fmt(r['heldout_attack'])} estimate_prompt={_fmt(r['estimate_prompt'])} "
              f"estimate_attack={_fmt(r['estimate_attack'])} never_seen={_fmt(r['never_seen'])} "
              f"advantage={_fmt(r['advantage'])} drift_within_spread={_fmt(r['drift_within_spread'])} "
              f"weights={r['weights_changed']} seconds={r['seconds']}", flush=True)
        done[name] = {"settings": vars(args), "result": r}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(done, indent=2, sort_keys=True, default=str) + "\n")
    print(markdown([d["result"] for d in done.values()]))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
