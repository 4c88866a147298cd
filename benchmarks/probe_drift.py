"""Probe: how many seeds does the per-prompt drift test need before it says something about the edit?

An ordinary prompt's drift is *within the seed spread* when its images after the edit resemble its images before,
at the same seeds, at least as much as two seeds of the unedited model resemble each other. With 2 seeds the
seed-to-seed side is one pair of images, so the test is noisy prompt by prompt. From a saved edit this probe
generates every ``nonmem`` prompt at ``--eval-seeds`` seeds before and after the edit, at the model's sampler, and
gives the share within the spread measured on all of them and on the first two seeds of the same images, on all
rows and on the odd rows (the half a ``--repair`` never fits on).

    python benchmarks/probe_drift.py --model tiny-pixart-memorizer --edit RUN/tiny-pixart-memorizer/edit.safetensors \
        --eval-seeds 6 --label default

Result line::

    probe model=<m> <label>: within_<n>_seeds=<share> within_2_seeds=<share> within_<n>_seeds_odd_rows=<share>
        within_2_seeds_odd_rows=<share> drift_similarity=<mean> seed_similarity=<mean>
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from _probe import open_model, print_stage, probe_parser, save_result

logger = logging.getLogger("probe_drift")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = probe_parser(__doc__)
    p.add_argument("--label", default="edit", help="the edit's name in the result line and the JSON key")
    p.set_defaults(eval_seeds=6)
    args = p.parse_args(argv)
    if args.eval_seeds < 3:
        p.error(f"--eval-seeds {args.eval_seeds}: the probe compares against the first two seeds, give at least 3")
    return args


def within_spread(after: Any, before: Any, scorer: Any, seeds: int) -> list[bool]:
    """Per prompt, on its first ``seeds`` seeds: mean similarity of each image after the edit to the image before at
    the same seed, at least the mean similarity between two different seeds before."""
    import numpy as np

    out = []
    for a, b in zip(after.images, before.images):
        a, b = list(a[:seeds]), list(b[:seeds])
        drift = float(np.diag(scorer.similarity(a, b).float().numpy()).mean())
        pair = scorer.similarity(b, b).float().numpy()
        spread = float(pair[~np.eye(seeds, dtype=bool)].mean())
        out.append(drift >= spread)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from diffmem.edits import apply_edit, load_edit
    from diffmem.evaluation import EvalConfig, evaluate
    from diffmem.score import get_scorer

    _, pipe, sampler, entries = open_model(args)
    ordinary = [e for e in entries if e.split == "nonmem"]
    scorer = get_scorer("ssim")
    ecfg = EvalConfig(num_seeds=args.eval_seeds, seed=0, sampler=sampler)
    with torch.no_grad():
        before = evaluate(pipe, ordinary, ecfg, scorer, progress=False)
        with apply_edit(pipe, load_edit(args.edit)):
            after = evaluate(pipe, ordinary, ecfg, scorer, baseline=before, progress=False)
    n = args.eval_seeds
    full, two = within_spread(after, before, scorer, n), within_spread(after, before, scorer, 2)
    result: dict[str, Any] = {
        f"within_{n}_seeds": float(np.mean(full)), "within_2_seeds": float(np.mean(two)),
        f"within_{n}_seeds_odd_rows": float(np.mean(full[1::2])), "within_2_seeds_odd_rows": float(np.mean(two[1::2])),
        "drift_similarity": float(np.mean([r["drift_similarity"] for r in after.rows])),
        "seed_similarity": float(np.mean([r["seed_similarity_before"] for r in after.rows])),
    }
    print_stage(args.model, args.label, result)
    result["rows"] = [{"prompt": r["prompt"], "drift_similarity": r["drift_similarity"],
                       "seed_similarity": r["seed_similarity_before"], f"within_{n}_seeds": ok, "within_2_seeds": ok2}
                      for r, ok, ok2 in zip(after.rows, full, two)]
    save_result(args.out, f"{args.model}/{args.label}", args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
