"""Probe: after a robust prune, does a short distillation toward the unedited model on ordinary rows bring the
ordinary prompts back within the seed-to-seed spread, without bringing the deleted images back?

Starts from a saved edit (e.g. a ``bench_mitigate.py --work`` folder's ``edit.safetensors``), splits the ``nonmem``
rows in two (even rows: the repair's data; odd rows: never seen by the repair), runs
:func:`diffmem.mitigation.repair.repair_edit` on the first half, and measures, before and after: the drift of each
half (the share of ordinary prompts whose image at a seed moves less than a change of seed moves it), replication of
the ``heldout`` and ``locate`` rows with the prompt at the model's sampler and at diffusers' defaults, the held-out
memorized prompts' KID to the unedited model's ordinary generations, and with ``--attack`` the re-extraction attack
on the held-out rows from the prompt and from a random start (a seed counts when either replicates).

    python benchmarks/probe_repair.py --model tiny-sd-photos --edit /tmp/run/tiny-sd-photos/edit.safetensors \
        --steps 200 --attack

Result line::

    probe model=<m> <stage>: heldout_prompt_model=<rate> heldout_prompt_default=<rate> locate_prompt=<rate>
        kid_heldout=<x1e3> drift_fit=<share> drift_unseen=<share> [heldout_attack=<rate>]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from _probe import heldout_attack_rate, open_model, print_stage, probe_parser, save_result

logger = logging.getLogger("probe_repair")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = probe_parser(__doc__)
    p.add_argument("--steps", type=int, action="append", help="repair steps (default 200); repeat for several")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scope", choices=("edited", "all"), default="edited")
    p.add_argument("--hold", type=float, default=None,
                   help="hold the locate rows at the edited model's predictions with this weight (default: off)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from diffmem.crossfit import measure_rows, sampler_variants, summarise_rows
    from diffmem.edits import apply_edit, load_edit
    from diffmem.evaluation import EvalConfig, evaluate
    from diffmem.mitigation.repair import repair_edit
    from diffmem.mitigation.rows import load_rows
    from diffmem.quality import memorized_becomes
    from diffmem.sampling import image_size
    from diffmem.score import get_scorer

    _, pipe, sampler, entries = open_model(args)
    rows = {s: [e for e in entries if e.split == s] for s in ("locate", "heldout", "nonmem")}
    fit, unseen = rows["nonmem"][0::2], rows["nonmem"][1::2]
    scorer = get_scorer("ssim")
    ecfg = EvalConfig(num_seeds=args.eval_seeds, seed=0, sampler=sampler)
    before = {name: evaluate(pipe, part, ecfg, scorer, progress=False) for name, part in (("fit", fit),
                                                                                           ("unseen", unseen))}
    ordinary_images = np.concatenate([b.images.reshape(-1, *b.images.shape[-3:]) for b in before.values()])
    samplers = sampler_variants(sampler, ("model", "diffusers-default"), pipe=pipe)
    edit = load_edit(args.edit)
    size = image_size(pipe, sampler.height, sampler.width)
    fit_rows = load_rows(fit, size)
    held = load_rows(rows["locate"], size) if args.hold is not None else None

    def measure(stage: str, current: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        held = summarise_rows(measure_rows(pipe, current, rows["heldout"], scorer, samplers, attack=None,
                                           num_seeds=args.eval_seeds))
        out["heldout_prompt_model"] = held["prompt"]["model"]
        out["heldout_prompt_default"] = held["prompt"]["diffusers-default"]
        with apply_edit(pipe, current), torch.no_grad():
            res = evaluate(pipe, rows["locate"], ecfg, scorer, progress=False)
            out["locate_prompt"] = float(np.mean([r["replication_rate"] for r in res.rows]))
            res = evaluate(pipe, rows["heldout"], ecfg, scorer, progress=False)
            kid = memorized_becomes(list(res.images.reshape(-1, *res.images.shape[-3:])), list(ordinary_images),
                                    subsets=50)
            out["kid_heldout"], out["kid_heldout_std"] = kid["kid_mean"], kid["kid_std"]
            for name, part in (("fit", fit), ("unseen", unseen)):
                drift = evaluate(pipe, part, ecfg, scorer, baseline=before[name], progress=False)
                out[f"drift_{name}"] = float(np.mean([float(r["drift_within_seed_spread"]) for r in drift.rows]))
                out[f"drift_similarity_{name}"] = float(np.mean([r["drift_similarity"] for r in drift.rows]))
        if args.attack:
            out["heldout_attack"] = heldout_attack_rate(pipe, current, rows["heldout"], scorer, sampler,
                                                        args.eval_seeds)
        print_stage(args.model, stage, out)
        return out

    result: dict[str, Any] = {"start": {"weights_changed": edit.num_params_changed(), **measure("start", edit)},
                              "seed_similarity": {name: float(np.mean([r["diversity_similarity"] for r in b.rows]))
                                                  for name, b in before.items()}}
    for steps in args.steps or [200]:
        t0 = time.time()
        repaired = repair_edit(pipe, edit, fit_rows, steps=steps, lr=args.lr, scope=args.scope, progress=False,
                               deleted=held, deleted_weight=args.hold if args.hold is not None else 1.0)
        seconds = round(time.time() - t0, 1)
        key = f"steps={steps}" + (f",hold={args.hold:g}" if args.hold is not None else "")
        result[key] = {"weights_changed": repaired.num_params_changed(), "repair_seconds": seconds,
                       "loss": [repaired.meta["loss_first"], repaired.meta["loss_last"]], **measure(key, repaired)}
    save_result(args.out, f"{args.model}/{args.scope}" + (f"/hold={args.hold:g}" if args.hold is not None else ""),
                args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
