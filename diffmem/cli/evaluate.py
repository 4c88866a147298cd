"""``attack``, ``evaluate`` and ``reextract``: measure replication with and without an edit, and attack it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError

from . import _common as common
from ._common import logger

__all__ = ["cmd_attack", "cmd_evaluate", "cmd_reextract", "add_attack", "add_evaluate", "add_reextract"]


def cmd_attack(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from diffmem.data import load_reference, read_prompts, resolve_references
    from diffmem.edits import apply_edit, load_edit
    from diffmem.extraction import ExtractionConfig, extraction_attack

    common.need_model(args)
    common.need_edit(args.edit)
    entries = common.entries(args)
    refs = resolve_references(args.references, entries, allow_outside=args.allow_outside_references)
    calib = read_prompts(args.calibration) if args.calibration else None
    edit = load_edit(args.edit) if args.edit else None
    sampler = common.sampler(args)
    size = (sampler.height, sampler.width) if sampler.height else None
    cfg = ExtractionConfig(num_generations=args.generations, seed=args.seed, clique_size=args.clique,
                           threshold=args.threshold, false_flag_rate=args.false_flag_rate,
                           batch_size=args.batch_size or 64, sampler=sampler)
    pipe = common.load(args)
    cfg = replace(cfg, sampler=common.sample_with(args, pipe))
    scorer = common.scorer(args.scorer, args)
    ref_imgs = [None if r is None else load_reference(r, size, row=e) for r, e in zip(refs, entries)]
    with apply_edit(pipe, edit):
        res = extraction_attack(pipe, [e.prompt for e in entries], cfg, scorer, references=ref_imgs,
                                calibration_prompts=calib, out_dir=Path(args.out))
    logger.info("attack: %s", json.dumps(res.summary(), sort_keys=True))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from diffmem.data import read_manifest
    from diffmem.edits import load_edit
    from diffmem.evaluation import EvalConfig, evaluate_edit
    from diffmem.parallel import is_main_process
    from diffmem.score import get_scorer

    common.need_model(args)
    edit_path = args.edit or args.mask or args.directions
    common.need_edit(edit_path)
    entries, failures = common.fetch(args, read_manifest(args.prompts, allow_outside=args.allow_outside_references))
    missing = [e for e in entries if e.reference is None]
    if len(missing) == len(entries):
        raise ConfigError(f"{args.prompts}: no row has a reference image, so replication cannot be measured")
    if missing:
        logger.warning("%d rows have no reference image: their replication is not measured", len(missing))
    edit = load_edit(edit_path) if edit_path else None
    common.sampler(args)  # checks the flags before the model loads
    pipe = common.load(args)
    sampler = common.sample_with(args, pipe)
    cfg = EvalConfig(num_seeds=args.seeds, seed=args.seed, batch_size=args.batch_size or 64, sampler=sampler,
                     region=args.region)
    scorer = common.scorer(args.scorer, args)
    clip = get_scorer("clip", model_name=args.clip_model, pretrained=args.clip_pretrained) if args.clip_pretrained else None
    before, after = evaluate_edit(pipe, entries, cfg, scorer, edit, clip_scorer=clip)
    report: dict[str, Any] = {"model": str(args.model), "edit": edit_path, "sampler": sampler.to_dict(),
                              "scorer": scorer.describe(),
                              "config": cfg.to_dict(), "before": before.summary(), "rows_before": before.rows,
                              "skipped_rows": failures}
    if after is not None:
        report.update(after=after.summary(), rows_after=after.rows)
    if is_main_process():
        common.write_json(args.out, report)
        logger.info("wrote %s", args.out)


def cmd_reextract(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from diffmem.edits import apply_edit, load_edit
    from diffmem.files import write_json
    from diffmem.parallel import is_main_process
    from diffmem.reextraction import ReextractConfig, ReextractItem, reextract
    from diffmem.sampling import image_size

    common.need_model(args)
    common.need_edit(args.edit)
    entries = common.entries(args)
    rows = [e for e in entries if e.split == args.split or (args.control and e.split == "nonmem")]
    if not any(e.split == args.split for e in rows):
        raise ConfigError(f"{args.prompts}: no row of split {args.split!r}")
    for e in rows:  # the attack needs every training image: check them all before the model loads
        if e.reference is None:
            raise ConfigError(f"{e.row}: row {e.prompt!r} has no reference image; the attack needs the training image")
    rows, failures = common.fetch(args, rows)
    edit = load_edit(args.edit) if args.edit else None
    sampler = common.sampler(args)
    batch_size = {"sample_batch_size": args.batch_size} if args.batch_size else {}
    cfg = ReextractConfig(opt_steps=args.opt_steps, lr=args.lr, batch=args.batch, init=args.init,
                          num_seeds=args.seeds, sampler=sampler, seed=args.seed,
                          checkpoints=tuple(c for c in (0, 10, 25, 50) if c <= args.opt_steps), **batch_size)
    from diffmem.data import load_reference

    size = (sampler.height, sampler.width) if sampler.height else None
    refs = [load_reference(e, size, row=e) for e in rows] if size else None
    pipe = common.load(args)
    sampler = common.sample_with(args, pipe)
    cfg = replace(cfg, sampler=sampler)
    if refs is None:
        refs = [load_reference(e, image_size(pipe), row=e) for e in rows]
    items = [ReextractItem(e.prompt, r, "memorized" if e.split == args.split else "control", i)
             for i, (e, r) in enumerate(zip(rows, refs))]
    with apply_edit(pipe, edit):
        res = reextract(pipe, items, cfg, common.scorer(args.scorer, args))
    if is_main_process():
        if failures:
            write_json(Path(args.out) / "skipped_rows.json", failures)
        path = write_json(Path(args.out) / "reextract.json",
                          {"summary": res.summary(), "rows": res.rows, "sampler": sampler.to_dict()})
        logger.info("wrote %s: %s", path, json.dumps({k: v for k, v in res.summary().items()
                                                      if k in ("memorization_rate", "control_rate")}))


def add_attack(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "attack", cmd_attack, "Carlini et al.'s generate-and-filter extraction attack",
                           model=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True, help="output folder (attack.json, extractions/)")
    p.add_argument("--references", default=None, help="manifest or folder with references.jsonl")
    p.add_argument("--calibration", default=None, help="non-memorized prompts that calibrate the threshold")
    common.add_sampling(p)
    p.add_argument("--generations", type=common.positive_int, default=16)
    p.add_argument("--clique", type=common.positive_int, default=4, help="clique size m")
    p.add_argument("--threshold", type=float, default=None, help="fixed similarity threshold (skips calibration)")
    p.add_argument("--false-flag-rate", type=common.rate, default=0.05)
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--scorer-weights", default=None, help="SSCD weights file (.onnx, or .pt with --allow-pickle)")
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    p.add_argument("--edit", default=None, help="apply a saved edit reversibly first")
    common.add_references(p)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "evaluate", cmd_evaluate, "replication, diversity and drift with and without an edit",
                           model=True)
    p.add_argument("--prompts", required=True, help="manifest (jsonl with prompt/split/reference)")
    p.add_argument("--out", default="evaluation.json")
    p.add_argument("--edit", default=None, help="a saved edit (mask, directions or weight delta)")
    p.add_argument("--mask", default=None, help=argparse.SUPPRESS)
    p.add_argument("--directions", default=None, help=argparse.SUPPRESS)
    common.add_sampling(p)
    p.add_argument("--seeds", type=common.positive_int, default=8)
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    p.add_argument("--scorer", default="sscd", help="sscd (falls back to ssim when unavailable), clip, ssim, ...")
    p.add_argument("--scorer-weights", default=None,
                   help="the scorer's weights file (e.g. the official SSCD .pt/.onnx)")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--clip-pretrained", default=None, help="CLIP weights tag or file for the CLIP score")
    common.add_region(p)
    common.add_references(p)


def add_reextract(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "reextract", cmd_reextract,
                           "re-extraction attack: optimise the conditioning toward training images", model=True)
    p.add_argument("--prompts", required=True, help="manifest with reference images")
    p.add_argument("--out", required=True, help="output folder (reextract.json)")
    p.add_argument("--edit", default=None, help="attack the model with this saved edit applied")
    p.add_argument("--split", default="heldout", help="memorized rows to attack (default heldout)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the false-positive control on the nonmem rows")
    p.add_argument("--opt-steps", type=common.positive_int, default=50)
    p.add_argument("--lr", type=common.positive_float, default=0.1)
    p.add_argument("--batch", type=common.positive_int, default=8)
    p.add_argument("--init", default="prompt", help="prompt, random or prompt-of:OTHER TEXT")
    p.add_argument("--seeds", type=common.positive_int, default=4)
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--scorer-weights", default=None, help="SSCD weights file (.onnx, or .pt with --allow-pickle)")
    common.add_sampling(p)
    common.add_references(p)
