"""``detect`` and ``audit``: rank prompts by a memorization detector; audit a checkpoint end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError

from . import _common as common
from ._common import logger

__all__ = ["cmd_detect", "cmd_audit", "add_detect", "add_audit"]


def _detect_config(args: argparse.Namespace, sampler: Any) -> tuple[Any, Any]:
    """The detection config of ``detect``'s flags, and the sampler settings it uses.

    With ``--preset`` the preset's sampler applies where no flag was given.
    """
    from dataclasses import replace

    from diffmem.detection import DetectConfig, detector_config

    given = {k: v for k, v in (("num_seeds", args.seeds), ("seed", args.seed), ("batch_size", args.batch_size))
             if v is not None}
    method = getattr(args, "method", None) or "wen"
    if args.preset and method != "wen":
        raise ConfigError(f"--preset {args.preset} is a preset of the wen detector, not of --method {method}")
    if method != "wen":
        cfg = detector_config(method, sampler=sampler, score_steps=args.k, **given)
    elif args.preset:
        # the preset's steps and guidance over the model's, then the flags given
        sampler = replace(DetectConfig.preset_sampler(args.preset, sampler), **common.sampler_flags(args))
        steps = {} if args.k is None else {"score_steps": args.k}
        cfg = DetectConfig.from_preset(args.preset, sampler, **given, **steps)
    else:
        cfg = DetectConfig(sampler=sampler, score_steps=args.k or min(5, sampler.num_inference_steps),
                           **{"num_seeds": 4, **given})
    return cfg, sampler


def cmd_detect(args: argparse.Namespace) -> None:
    from diffmem.data import read_prompts
    from diffmem.detection import detect
    from diffmem.files import write_table
    from diffmem.parallel import is_main_process

    common.need_model(args)
    common.need_suffix(args.out, (".jsonl", ".csv"), "--out")
    entries = common.entries(args)
    calib = read_prompts(args.calibration) if args.calibration else None
    _detect_config(args, common.sampler(args))  # checks the flags before the model loads
    pipe = common.load(args)
    cfg, sampler = _detect_config(args, common.sample_with(args, pipe))
    labels = [e.memorized for e in entries] if any(e.memorized for e in entries) else None
    res = detect(pipe, [e.prompt for e in entries], cfg, labels=labels, calibration_prompts=calib, m=args.m)
    if is_main_process():
        out = Path(args.out)
        write_table(out, res.ranked())
        common.write_json(out.with_suffix(".summary.json"), {"summary": res.summary(), "config": cfg.to_dict(),
                                                             "method": res.method, "sampler": sampler.to_dict(),
                                                             "model": str(args.model)})
        if res.masks is not None:
            import numpy as np

            np.savez_compressed(out.with_suffix(".masks.npz"), prompts=np.asarray(res.prompts), masks=res.masks,
                                maps=res.maps)
        logger.info("wrote %s; %s", out, json.dumps(res.summary(), sort_keys=True))


def cmd_audit(args: argparse.Namespace) -> None:
    from diffmem.workflows.audit import AuditConfig, run_audit

    common.need_model(args)
    common.need_edit(args.edit)
    if args.prompts is None and args.candidates is None:
        raise ConfigError("give --prompts FILE, --candidates FILE, or both")
    common.need_file(args.prompts, "prompt file")
    common.need_file(args.candidates, "candidate file")
    common.need_file(args.calibration, "calibration file")
    cfg = AuditConfig(model=args.model, prompts=args.prompts, references=args.references, out=args.out,
                      calibration=args.calibration, allow_pickle=args.allow_pickle, quick=args.quick,
                      allow_outside=args.allow_outside_references, edit=args.edit,
                      sampler=common.sampler_flags(args), candidates=args.candidates, method=args.method or "wen",
                      flag_top=args.flag_top)
    report = run_audit(cfg)
    print(report["headline_text"])  # noqa: T201 - the command's output


def add_detect(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "detect", cmd_detect,
                           "rank prompts by a memorization detector (default: Wen et al.'s noise norm)", model=True)
    p.add_argument("--prompts", required=True, help="prompt file or manifest (labels give AUC)")
    p.add_argument("--out", required=True, help="ranked table (.jsonl or .csv); bright_ending also writes .masks.npz")
    common.add_sampling(p)
    p.add_argument("--method", choices=common.DETECTORS, default=None, metavar="NAME",
                   help="registered detector: %(choices)s (default wen)")
    p.add_argument("--preset", choices=["wen2024"], default=None,
                   help="reproduce the published procedure (sampler flags given still win)")
    p.add_argument("--k", type=common.positive_int, default=None,
                   help="leading denoiser evaluations to average (default 5, chosen by measurement)")
    p.add_argument("--seeds", type=common.positive_int, default=None, help="noises per prompt (default 4)")
    p.add_argument("--seed", type=common.nonneg_int, default=None)
    p.add_argument("--calibration", default=None, help="non-memorized prompts: flag scores above mean + m*std")
    p.add_argument("--m", type=float, default=3.0)
    common.add_references(p)


def add_audit(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, "audit", cmd_audit, "detect, attack and re-extract (with references) on any checkpoint")
    p.add_argument("model")
    p.add_argument("--prompts", default=None, help="prompts (or manifest) to audit")
    p.add_argument("--candidates", default=None,
                   help="a prompt pool to screen with the detector; its top flagged prompts are attacked too")
    p.add_argument("--method", choices=common.DETECTORS, default=None, metavar="NAME",
                   help="registered detector of the detection and the screening: %(choices)s (default wen)")
    p.add_argument("--flag-top", type=common.positive_int, default=None,
                   help="pass the K highest-scoring candidates on (default 16; with --calibration: at most K above "
                        "the calibrated threshold)")
    p.add_argument("--references", default=None, help="manifest or folder with references.jsonl")
    p.add_argument("--calibration", default=None, help="non-memorized prompts (also calibrate the screening)")
    p.add_argument("--edit", default=None, help="audit the model with this saved edit applied")
    p.add_argument("--out", default="runs/audit")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--quick", action="store_true")
    common.add_sampling(p, batch_size=False)
    common.add_references(p)
