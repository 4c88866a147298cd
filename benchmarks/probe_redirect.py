"""Probe: after a robust prune, do memorized prompts render plausibly again when their cross-attention keys and
values are redirected to those of ordinary captions (a closed-form least-squares edit of ``to_k``/``to_v``)?

Starts from a saved robust edit (a mask, e.g. a ``bench_mitigate.py --work`` folder's ``edit.safetensors``), fits
the redirect on the ``locate`` rows only (each mapped, token by token, to an ordinary caption of
``base_prompts.txt``, while ``nonmem`` and base captions keep their keys and values), and measures on the
``heldout`` and ``locate`` rows: replication with the prompt, the memorized prompts' KID to the unedited model's
ordinary generations, and the ordinary prompts' drift. With ``--attack`` also the re-extraction attack on the
held-out rows (prompt start, model's sampler).

    python benchmarks/probe_redirect.py --model tiny-sd-photos --edit /tmp/run/tiny-sd-photos/edit.safetensors

Result line::

    probe model=<m> lam=<l> <stage>: kid_heldout=<x1e3> kid_locate=<x1e3> heldout_prompt=<rate>
        locate_prompt=<rate> drift_within_spread=<share> [heldout_attack=<rate>]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from _probe import heldout_attack_rate, open_model, print_stage, probe_parser, save_result

logger = logging.getLogger("probe_redirect")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = probe_parser(__doc__)
    p.add_argument("--lam", type=float, action="append", help="preserve weight(s) (default 1)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from diffmem.edits import apply_edit, load_edit
    from diffmem.mitigation.redirect import fit_redirect
    from diffmem.evaluation import EvalConfig, evaluate
    from diffmem.quality import memorized_becomes
    from diffmem.score import get_scorer

    path, pipe, sampler, entries = open_model(args)
    rows = {s: [e for e in entries if e.split == s] for s in ("locate", "heldout", "nonmem")}
    base = [ln.strip() for ln in (path / "base_prompts.txt").read_text().splitlines() if ln.strip()]
    scorer = get_scorer("ssim")
    ecfg = EvalConfig(num_seeds=args.eval_seeds, seed=0, sampler=sampler)
    ordinary = evaluate(pipe, rows["nonmem"], ecfg, scorer, progress=False)
    edit = load_edit(args.edit)

    def measure(stage: str, current: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with apply_edit(pipe, current), torch.no_grad():
            for split in ("heldout", "locate"):
                res = evaluate(pipe, rows[split], ecfg, scorer, progress=False)
                out[f"{split}_prompt"] = float(np.mean([r["replication_rate"] for r in res.rows]))
                kid = memorized_becomes(list(res.images.reshape(-1, *res.images.shape[-3:])),
                                        list(ordinary.images.reshape(-1, *ordinary.images.shape[-3:])), subsets=50)
                out[f"kid_{split}"], out[f"kid_{split}_std"] = kid["kid_mean"], kid["kid_std"]
            drift = evaluate(pipe, rows["nonmem"], ecfg, scorer, baseline=ordinary, progress=False)
            out["drift_within_spread"] = float(np.mean([float(r["drift_within_seed_spread"]) for r in drift.rows]))
        if args.attack:
            out["heldout_attack"] = heldout_attack_rate(pipe, current, rows["heldout"], scorer, sampler,
                                                        args.eval_seeds)
        print_stage(args.model, stage, out)
        return out

    result: dict[str, Any] = {"start": measure("start", edit)}
    for lam in args.lam or [1.0]:
        redirected = fit_redirect(pipe, edit, [e.prompt for e in rows["locate"]], base,
                                  keep=[e.prompt for e in rows["nonmem"]] + base, preserve=lam)
        result[f"lam={lam:g}"] = {"weights_changed": redirected.num_params_changed(),
                                  **measure(f"lam={lam:g}", redirected)}
    save_result(args.out, args.model, args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
