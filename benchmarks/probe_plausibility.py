"""Probe: after an edit, are the memorized prompts' renderings implausible, or has the whole model moved?

The mitigation's plausibility test compares the edited model's images for memorized prompts with the *unedited*
model's ordinary images (KID on SSCD features). An edit that moves every prompt a little also moves that figure, so
this probe separates the two. From a saved edit it measures, at the model's sampler, for the memorized prompts
the edit was given (``locate``) and those it was not (``heldout``), each against the ``nonmem`` prompts:

- ``kid_<split>_before``: the unedited memorized images' KID to the unedited ordinary images (the yardstick of the
  test; its band is this plus two standard deviations);
- ``kid_<split>``: the edited memorized images' KID to the unedited ordinary images (what the report gives for
  ``locate``);
- ``kid_<split>_vs_edited``: the edited memorized images' KID to the edited model's own ordinary images;
- ``kid_ordinary_moved``: the edited ordinary images' KID to the unedited ordinary images (how far the edit moved
  ordinary prompts, as a set).

    python benchmarks/probe_plausibility.py --model tiny-pixart-memorizer \
        --edit RUN/tiny-pixart-memorizer/edit.safetensors --label redirect10-repair100

Result line::

    probe model=<m> <label>: kid_locate_before=<x1e3> kid_locate=<x1e3> kid_locate_vs_edited=<x1e3>
        kid_heldout_before=... kid_heldout=... kid_heldout_vs_edited=... kid_ordinary_moved=<x1e3>
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from _probe import open_model, print_stage, probe_parser, save_result

logger = logging.getLogger("probe_plausibility")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = probe_parser(__doc__)
    p.add_argument("--label", default="edit", help="the edit's name in the result line and the JSON key")
    p.add_argument("--subsets", type=int, default=50, help="KID subsets")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from diffmem.edits import apply_edit, load_edit
    from diffmem.evaluation import EvalConfig, evaluate
    from diffmem.quality import get_feature_extractor, image_features, kernel_inception_distance
    from diffmem.score import get_scorer

    _, pipe, sampler, entries = open_model(args)
    rows = {s: [e for e in entries if e.split == s] for s in ("locate", "heldout")}
    ordinary = [e for e in entries if e.split == "nonmem"]
    scorer = get_scorer("ssim")
    ecfg = EvalConfig(num_seeds=args.eval_seeds, seed=0, sampler=sampler)
    extractor = get_feature_extractor("sscd")

    def features(rows: list[Any]) -> Any:
        res = evaluate(pipe, rows, ecfg, scorer, progress=False)
        return image_features(list(res.images.reshape(-1, *res.images.shape[-3:])), extractor)

    def kid(a: Any, b: Any) -> tuple[float, float]:
        return kernel_inception_distance(a, b, subsets=args.subsets, seed=0)

    with torch.no_grad():
        before = {s: features(r) for s, r in rows.items()}
        ord_before = features(ordinary)
        with apply_edit(pipe, load_edit(args.edit)):
            after = {s: features(r) for s, r in rows.items()}
            ord_after = features(ordinary)
    pairs = {}
    for split in rows:
        pairs.update({f"kid_{split}_before": (before[split], ord_before), f"kid_{split}": (after[split], ord_before),
                      f"kid_{split}_vs_edited": (after[split], ord_after)})
    pairs["kid_ordinary_moved"] = (ord_after, ord_before)
    result: dict[str, Any] = {}
    for key, (a, b) in pairs.items():
        result[key], result[f"{key}_std"] = kid(a, b)
    print_stage(args.model, args.label, {k: v for k, v in result.items() if not k.endswith("_std")})
    save_result(args.out, f"{args.model}/{args.label}", args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
