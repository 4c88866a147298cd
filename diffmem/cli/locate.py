"""``record``, ``locate``, ``prune`` and ``iou``: statistics, the edit located from them, its export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmem.errors import ConfigError

from . import _common as common
from ._common import logger

__all__ = ["cmd_record", "cmd_locate", "cmd_prune", "cmd_iou", "add_record", "add_locate", "add_prune", "add_iou"]


def cmd_record(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from diffmem.config import RecordConfig
    from diffmem.data import read_prompts
    from diffmem.resume import record_to_file

    common.need_model(args)
    if args.empty_prompt_only:
        prompts = [""]
    else:
        if args.prompts is None:
            raise ConfigError("give --prompts FILE (or --empty-prompt-only)")
        prompts = read_prompts(args.prompts)
        if args.add_empty_prompt:
            prompts = [""] + prompts
    args._prompts = prompts
    cfg = RecordConfig(sampler=common.sampler(args), record_steps=args.record_steps, num_seeds=args.seeds,
                       seed=args.seed, batch_size=args.batch_size or 8, target=args.target, signatures=args.signatures)
    pipe = common.load(args)
    cfg = replace(cfg, sampler=common.sample_with(args, pipe))
    stats = record_to_file(pipe, prompts, cfg, out=args.out, model_id=str(args.model),
                           checkpoint_every=args.checkpoint_every)
    logger.info("wrote %s (%d layers, %d steps, %d prompts)", args.out, len(stats.layers), stats.steps, len(prompts))


def cmd_locate(args: argparse.Namespace) -> None:
    from diffmem.config import BASE_PRESETS, LocateConfig
    from diffmem.localization import locate
    from diffmem.stats import ActivationStats, prompts_sha256

    common.need_model(args)
    given = {k: v for k, v in (("method", args.method), ("ratio", args.ratio), ("record_steps", args.record_steps),
                               ("min_step_fraction", args.min_step_fraction), ("half", args.half),
                               ("rank", args.rank), ("explained_variance", args.explained_variance))
             if v is not None}
    cfg = LocateConfig.from_preset(args.preset, **given) if args.preset else LocateConfig(**given)
    mem = ActivationStats.load(args.memorized)
    base = ActivationStats.load(args.base)
    if args.preset and BASE_PRESETS.get(args.preset) is not None:
        if base.meta.get("prompts_sha256") != prompts_sha256(BASE_PRESETS[args.preset]):
            logger.warning("preset %s uses the empty prompt alone as the base set; these base statistics hold other "
                           "prompts (record them with `diffmem record MODEL --empty-prompt-only`)", args.preset)
    pipe = common.load(args)
    edit = locate(pipe, mem, base, cfg)
    path = edit.save(args.out)
    logger.info("%s%s: %d of %d weights changed (%.4f%%) -> %s", edit.kind,
                f" (preset {args.preset}: the published procedure)" if args.preset else "",
                edit.num_params_changed(), edit.num_total(), 100 * edit.fraction_changed(), path)


def cmd_prune(args: argparse.Namespace) -> None:
    from diffmem.edits import export_edited, load_edit

    common.need_model(args)
    edit_path = args.edit or args.mask or args.directions
    if edit_path is None:
        raise ConfigError("give the edit to export with --edit FILE")
    common.need_edit(edit_path)
    common.need_repo_id(args.push_to_hub)
    edit = load_edit(edit_path)
    from diffmem.edits import check_output_dir

    check_output_dir(Path(args.out), args.overwrite, str(args.model))
    pipe = common.load(args)
    out = export_edited(pipe, edit, args.out, overwrite=args.overwrite, source=str(args.model), edit_path=edit_path)
    logger.info("exported %s", out)
    if args.push_to_hub:
        common.push(Path(out), args.push_to_hub)


def cmd_iou(args: argparse.Namespace) -> None:
    from diffmem.edits import Mask, mask_iou

    res = mask_iou(Mask.load(args.mask_a), Mask.load(args.mask_b))
    print(json.dumps(res, indent=2, sort_keys=True))  # noqa: T201 - the command's output


def add_record(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "record", cmd_record, "record FFN activation statistics over prompts", model=True)
    p.add_argument("--prompts", default=None, help="prompt file (.txt, .jsonl, .csv)")
    p.add_argument("--out", required=True, help="output statistics (.safetensors + .json)")
    common.add_sampling(p)
    p.add_argument("--record-steps", type=common.positive_int, default=10,
                   help="leading sampler steps to record (tau)")
    p.add_argument("--seeds", type=common.positive_int, default=1, help="generations per prompt")
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    p.add_argument("--target", default=None, help="regex or name suffix of the layers to record")
    p.add_argument("--signatures", action="store_true", help="also keep per-prompt mean activations")
    p.add_argument("--add-empty-prompt", action="store_true", help="also record the empty prompt (for a base set)")
    p.add_argument("--empty-prompt-only", action="store_true", help="record the empty prompt alone (chavhan2024 base)")
    p.add_argument("--checkpoint-every", type=common.nonneg_int, default=0,
                   help="checkpoint partial statistics every N prompts per process (resumable)")


def add_locate(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "locate", cmd_locate,
                           "score and select the weights (or directions) behind memorization", model=True)
    p.add_argument("--memorized", required=True, help="statistics of memorized prompts")
    p.add_argument("--base", required=True, help="statistics of base prompts")
    p.add_argument("--out", required=True, help="output edit (.safetensors + .json)")
    p.add_argument("--method", choices=common.LOCATORS, default=None,
                   help="wanda: Chavhan et al.'s weight mask (default); neuron: whole FFN neurons; directions: a "
                        "low-rank subspace")
    p.add_argument("--preset", choices=common.LOCATE_PRESETS, default=None,
                   help="reproduce the published procedure exactly")
    p.add_argument("--ratio", type=common.fraction, default=None, help="fraction per row (wanda) or per layer (neuron)")
    p.add_argument("--record-steps", type=common.positive_int, default=None,
                   help="use the first N recorded steps (tau)")
    p.add_argument("--min-step-fraction", type=common.rate, default=None)
    p.add_argument("--half", choices=common.HALVES, default=None)
    p.add_argument("--rank", type=common.positive_int, default=None, help="directions: fixed k per layer")
    p.add_argument("--explained-variance", type=common.fraction, default=None,
                   help="directions: energy share that picks k")


def add_prune(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "prune", cmd_prune, "export an edited pipeline that plain diffusers loads", model=True)
    p.add_argument("--edit", default=None, help="a mask, direction basis or weight delta saved by diffmem")
    p.add_argument("--mask", default=None, help=argparse.SUPPRESS)
    p.add_argument("--directions", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier diffmem export at --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload the export to this Hub model repo")


def add_iou(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "iou", cmd_iou, "overlap of two masks, per layer and overall")
    p.add_argument("mask_a")
    p.add_argument("mask_b")
