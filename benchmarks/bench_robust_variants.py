"""Compare variants of mitigate's robust step on one model, at one strength, on held-out memorized rows.

A quick ablation, cheaper than ``bench_mitigate.py``: no cross-fitting and no strength sweep. Every variant runs
:func:`diffmem.mitigation.mitigate` at the given ``--ratio`` with ``folds=0`` and its own :class:`MitigateConfig`
overrides, seeing only the ``locate`` and ``nonmem`` rows; then the ``heldout`` rows are measured with the prompt at
the three sampler settings of :data:`diffmem.crossfit.SAMPLER_NAMES` (and, with ``--attack``, under the
re-extraction attack from the prompt and from random at the model's sampler and diffusers' defaults), and the
``nonmem`` rows' drift (share within the seed-to-seed spread).

A variant is ``NAME:key=value,key=value`` with :class:`MitigateConfig` fields (numbers, ``true``/``false``, or
words), e.g.::

    python benchmarks/bench_robust_variants.py --model tiny-sd-memorizer --ratio 0.2 \\
        --variant shared:robust_aggregate=shared --variant sum:robust_aggregate=sum

Result lines (one per variant)::

    variant name=<name> heldout_prompt_model=<rate> heldout_prompt_default=<rate> heldout_prompt_high=<rate>
        [heldout_attack_model=<rate> heldout_attack_default=<rate>] in_sample=<rate> drift_within_spread=<share>
        weights=<n> seconds=<s>

and everything as JSON in ``--out`` (one key per model and variant; earlier keys are kept).
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

logger = logging.getLogger("bench_robust_variants")


def _value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` -> ``(NAME, {key: value})``."""
    name, _, body = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is NAME:key=value,...")
    out: dict[str, Any] = {}
    for part in filter(None, body.split(",")):
        key, eq, val = part.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{text!r}: {part!r} is not key=value")
        out[key.strip()] = _value(val.strip())
    return name, out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="zoo member name or model folder")
    p.add_argument("--ratio", type=float, required=True, help="the edit strength every variant starts from")
    p.add_argument("--variant", type=parse_variant, action="append", required=True,
                   help="NAME:key=value,... (MitigateConfig fields); repeat for several")
    p.add_argument("--robust", default="prune", choices=["prune", "finetune", "none"], help="default robust step")
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--attack", action="store_true", help="also attack the held-out rows (slower)")
    p.add_argument("--opt-steps", type=int, default=50)
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--out", default="benchmarks/results/robust_variants.json")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def run_variant(pipe: Any, entries: list, name: str, overrides: dict[str, Any], args: argparse.Namespace,
                scorer: Any, sampler: Any, baseline: Any) -> dict[str, Any]:
    """Mitigate with the variant's settings (held-out rows unseen), then measure the held-out rows and drift."""
    import numpy as np
    import torch

    from diffmem.crossfit import measure_rows, sampler_variants, summarise_rows
    from diffmem.edits import apply_edit
    from diffmem.evaluation import EvalConfig, evaluate
    from diffmem.mitigation import MitigateConfig, mitigate
    from diffmem.reextraction import ReextractConfig
    from diffmem.workflows.mitigate import final_attack_config

    t0 = time.time()
    settings = {"robust": args.robust, "max_rounds": 1, "min_rounds": 1, "robust_aggregate": "shared", **overrides}
    for key in ("attack_inits", "robust_samplers", "strengths"):
        if isinstance(settings.get(key), str):
            settings[key] = tuple(settings[key].split("+"))
    mcfg = MitigateConfig(ratio=args.ratio, folds=0, sampler=sampler,
                          attack=ReextractConfig(opt_steps=args.opt_steps, checkpoints=(), num_seeds=2, seed=0,
                                                 sample_seed=10_000), **settings)
    visible = [e for e in entries if e.split in ("locate", "nonmem")]
    result = mitigate(pipe, visible, mcfg, scorer, progress=False)
    fit_s = time.time() - t0
    heldout = [e for e in entries if e.split == "heldout" and e.reference is not None]
    attack = final_attack_config(args.opt_steps, sampler, 0, checkpoints=()) if args.attack else None
    held = summarise_rows(measure_rows(pipe, result.edit, heldout, scorer, sampler_variants(sampler, pipe=pipe),
                                       attack=attack, num_seeds=args.eval_seeds, seed=0,
                                       attack_samplers=("model", "diffusers-default")))
    nonmem = [e for e in entries if e.split == "nonmem"]
    with apply_edit(pipe, result.edit), torch.no_grad():
        drift = evaluate(pipe, nonmem, EvalConfig(num_seeds=args.eval_seeds, seed=0, sampler=sampler), scorer,
                         baseline=baseline, progress=False)
    return {
        "variant": name, "settings": settings, "ratio": args.ratio,
        "heldout_prompt_by_sampler": held["prompt"], "heldout_attack_by_sampler": held.get("attack"),
        "in_sample_prompt": result.estimate.get("in_sample", {}).get("prompt"),
        "rounds": [{k: r.get(k) for k in ("round", "attack_rate_by_sampler", "parameters_changed_after")}
                   for r in result.rounds],
        "drift_within_spread": float(np.mean([float(r["drift_within_seed_spread"]) for r in drift.rows])),
        "drift_similarity": float(np.mean([r["drift_similarity"] for r in drift.rows])),
        "weights_changed": result.edit.num_params_changed(),
        "fit_seconds": round(fit_s, 1), "seconds": round(time.time() - t0, 1),
    }


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from diffmem.evaluation import EvalConfig, evaluate
    from diffmem.parallel import choose_num_threads
    from diffmem.score import get_scorer
    from diffmem.zoo.members import load_zoo_model

    threads = args.threads or choose_num_threads()[0]
    if threads:
        torch.set_num_threads(threads)
    try:
        _, pipe, sampler, entries = load_zoo_model(args.model)
    except FileNotFoundError as e:
        raise SystemExit(f"bench_robust_variants: {e}") from None
    scorer = get_scorer(args.scorer)
    nonmem = [e for e in entries if e.split == "nonmem"]
    baseline = evaluate(pipe, nonmem, EvalConfig(num_seeds=args.eval_seeds, seed=0, sampler=sampler), scorer,
                        progress=False)
    out_path = Path(args.out)
    done: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for name, overrides in args.variant:
        logger.info("variant %s: %s", name, overrides)
        r = run_variant(pipe, entries, name, overrides, args, scorer, sampler, baseline)
        hp, ha = r["heldout_prompt_by_sampler"], r["heldout_attack_by_sampler"] or {}
        attack = (f" heldout_attack_model={_fmt(ha.get('model'))} "
                  f"heldout_attack_default={_fmt(ha.get('diffusers-default'))}" if ha else "")
        print(f"variant name={name} heldout_prompt_model={_fmt(hp.get('model'))} "  # noqa: T201
              f"heldout_prompt_default={_fmt(hp.get('diffusers-default'))} "
              f"heldout_prompt_high={_fmt(hp.get('high-guidance'))}{attack} "
              f"in_sample={_fmt((r['in_sample_prompt'] or {}).get('model'))} "
              f"drift_within_spread={_fmt(r['drift_within_spread'])} weights={r['weights_changed']} "
              f"seconds={r['seconds']}", flush=True)
        done[f"{args.model}/{name}"] = {"settings": {k: v for k, v in vars(args).items() if k != "variant"},
                                        "result": r}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(done, indent=2, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
