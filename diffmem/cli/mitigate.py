"""``mitigate``: locate, tune and (with ``--robust``) harden an edit, then export the clean model."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _common as common

__all__ = ["cmd_mitigate", "add_mitigate"]


def cmd_mitigate(args: argparse.Namespace) -> None:
    from diffmem.workflows.mitigate import MitigateRunConfig, run_mitigate

    common.need_model(args)
    common.need_file(args.prompts, "prompt file")
    common.need_repo_id(args.push_to_hub)
    run = MitigateRunConfig(model=args.model, prompts=args.prompts, out=args.out, method=args.method,
                            ratio=None if args.ratio == "auto" else float(args.ratio), robust=args.robust,
                            target=args.target, max_rounds=args.max_rounds, scorer=args.scorer,
                            scorer_weights=args.scorer_weights, overwrite=args.overwrite,
                            allow_pickle=args.allow_pickle, allow_outside=args.allow_outside_references,
                            opt_steps=args.opt_steps, seed=args.seed, sampler=common.sampler_flags(args),
                            folds=args.folds, robust_aggregate=args.robust_aggregate, region=args.region,
                            margin_steps=args.margin_steps, min_rounds=args.min_rounds,
                            robust_fraction=args.robust_fraction, robust_gate=args.robust_gate,
                            redirect=args.redirect, repair=args.repair, eval_num_seeds=args.eval_seeds)
    report = run_mitigate(run)
    print(report["headline_text"])  # noqa: T201 - the command's output
    if args.push_to_hub:
        common.push(Path(args.out) / "pruned", args.push_to_hub)


def add_mitigate(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "mitigate", cmd_mitigate,
                           "locate, tune and (with --robust) harden an edit; export the clean model", model=True)
    p.add_argument("--prompts", required=True, help="manifest with locate / heldout / nonmem rows")
    p.add_argument("--out", required=True, help="output folder (pruned/, edit, report.json, report.html)")
    p.add_argument("--method", choices=common.LOCATORS, default="wanda")
    p.add_argument("--ratio", default="auto", help="auto (the smallest that meets --target) or a number")
    p.add_argument("--robust", choices=["none", "prune", "finetune"], default="none")
    p.add_argument("--target", type=common.rate, default=0.05)
    p.add_argument("--max-rounds", type=common.positive_int, default=3)
    p.add_argument("--min-rounds", type=common.nonneg_int, default=1,
                   help="robust rounds run even when the attack already fails on the given rows")
    p.add_argument("--opt-steps", type=common.positive_int, default=50, help="attack steps during mitigation")
    p.add_argument("--folds", type=common.folds, default=3,
                   help="cross-fitting folds over the locate rows for the out-of-fold estimate (0: off)")
    p.add_argument("--robust-aggregate", choices=["shared", "sum"], default="shared",
                   help="robust prune keeps weights that many images share (shared) or the summed saliency (sum)")
    p.add_argument("--robust-fraction", type=float, default=0.002,
                   help="share of the denoiser's weights one robust pruning round may add, in (0, 0.1]")
    p.add_argument("--robust-gate", action="store_true",
                   help="halve a robust round (up to twice) that makes the memorized prompts implausible or moves "
                        "ordinary ones beyond the seed spread (off by default: it trades deletion for plausibility)")
    p.add_argument("--redirect", type=common.positive_float, default=None, metavar="LAMBDA",
                   help="after the deletion, send the given memorized prompts to ordinary captions (a closed-form "
                        "edit of the cross-attention keys and values; LAMBDA weighs keeping the ordinary prompts, "
                        "e.g. 1): they render as plausible images instead of noise, at a drift cost")
    p.add_argument("--repair", type=common.nonneg_int, default=0, metavar="STEPS",
                   help="last (after the deletion and any redirect), distil the edited model toward the unedited "
                        "one on half the nonmem rows for STEPS steps (e.g. 100), the given memorized rows held at "
                        "the edited model: less drift; the report gives the drift on the other half too (0: off)")
    p.add_argument("--margin-steps", type=common.nonneg_int, default=1,
                   help="strengths taken past the first that meets --target, while drift and plausibility pass")
    p.add_argument("--eval-seeds", type=common.positive_int, default=4,
                   help="seeds per prompt when measuring the held-out rows and the ordinary prompts' drift (the "
                        "per-prompt drift test compares seeds pairwise: 2 seeds give one pair, a noisy test)")
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--scorer-weights", default=None, help="SSCD weights file (.onnx, or .pt with --allow-pickle)")
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier diffmem output at --out")
    common.add_region(p)
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="then upload the exported model (OUT/pruned) to this Hub model repo")
    common.add_sampling(p, batch_size=False)
    common.add_references(p)
