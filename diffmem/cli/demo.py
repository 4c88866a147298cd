"""``demo``: the full mitigate-and-attack demo on the embedded tiny memorizer."""

from __future__ import annotations

import argparse

from . import _common as common

__all__ = ["cmd_demo", "add_demo"]


def cmd_demo(args: argparse.Namespace) -> None:
    from diffmem.workflows.demo import DemoConfig, run_demo

    extra = {k: v for k, v in (("eval_num_seeds", args.eval_seeds), ("attack_generations", args.attack_generations),
                               ("scorer", args.scorer)) if v is not None}
    cfg = DemoConfig(model=args.model, out=args.out, ratio=args.ratio, quick=args.quick, seed=args.seed,
                     full=args.full, compare_directions=False if args.no_directions else None,
                     compare_finetune=False if args.no_finetune else None,
                     sampler=common.sampler_flags(args),
                     region=args.region, **extra)
    report = run_demo(cfg)
    print(report["headline_text"])  # noqa: T201 - the command's output


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "demo", cmd_demo, "the full mitigate-and-attack demo on the embedded tiny memorizer")
    p.add_argument("--model", default=None, help="default: assets/tiny-sd-memorizer")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ratio", type=common.fraction, default=None,
                   help="mask ratio (default: chosen on the locate split)")
    p.add_argument("--quick", action="store_true", help="reduced settings (CI)")
    p.add_argument("--full", action="store_true",
                   help="the complete comparison instead of the ten-minute budget: six strengths, the robust loop "
                        "attacking from two starts, every held-out row attacked, 4 seeds, larger controls, the "
                        "locality evidence, adversarial fine-tuning and the low-rank projection editor")
    p.add_argument("--no-directions", action="store_true", help="skip the low-rank projection editor (with --full)")
    p.add_argument("--no-finetune", action="store_true", help="skip adversarial fine-tuning (with --full)")
    p.add_argument("--eval-seeds", type=common.positive_int, default=None, help="seeds per prompt in the evaluation")
    p.add_argument("--attack-generations", type=common.positive_int, default=None,
                   help="generations per attacked prompt")
    p.add_argument("--scorer", default=None, help="evaluation scorer (default ssim: the embedded model is 32 px)")
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    common.add_region(p)
    common.add_sampling(p, batch_size=False)
