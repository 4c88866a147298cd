"""``diffmem`` command line: thin subcommands, one library call each.

Every user-fixable problem (a wrong path, a malformed prompt file, a mismatched edit, an out-of-range value)
ends in one line ``diffmem: error: ...`` and exit status 2; anything else is a bug and keeps its traceback (exit
status 1). Cheap checks (files, suffixes, values) run before the model is loaded. ``--steps`` always means sampler
steps; tau (the recorded leading steps) is ``--record-steps`` everywhere.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError, DiffmemError

logger = logging.getLogger("diffmem")

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------------------------------------
# argument types and shared options


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def _folds(text: str) -> int:
    value = _nonneg_int(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 fold leaves nothing out: give 0 (off) or >= 2")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{text} must be a positive multiple of 8")
    return value


def _float_type(accept: Callable[[float], bool], bound: str) -> Callable[[str], float]:
    """An argparse type: a float for which ``accept`` holds, else the error ``<text> must be <bound>``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value

    return parse


_fraction = _float_type(lambda v: 0 < v <= 1, "in (0, 1]")
_rate = _float_type(lambda v: 0 <= v <= 1, "in [0, 1]")
_positive_float = _float_type(lambda v: v > 0, "> 0")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="diffusers pipeline folder or hub id")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin weights and torchscript (unsafe)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weight dtype")


class _DetectorNames:
    """``choices`` of ``--method``: the detector registry, read only when a value is checked or help is shown."""

    def _names(self) -> list[str]:
        from diffmem.detection import list_detectors

        return list_detectors()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _scheduler_name(text: str) -> str:
    from diffmem.config import scheduler_names

    names = scheduler_names()
    if text not in names:
        close = difflib.get_close_matches(text, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a diffusers scheduler{hint}; choose one of {', '.join(names)}")
    return text


# SamplerConfig field <- command-line destination, for every command that samples
_SAMPLER_FLAGS = (("num_inference_steps", "steps"), ("guidance_scale", "guidance"),
                  ("guidance_rescale", "guidance_rescale"), ("height", "height"), ("width", "width"),
                  ("scheduler", "scheduler"))


def _add_sampling(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    """The sampler flags shared by every command that generates images (see ``SamplerConfig``)."""
    g = p.add_argument_group("sampler", "a flag given here always wins; otherwise the model's diffmem_defaults.json, "
                                        "else the pipeline's own defaults")
    g.add_argument("--steps", type=_positive_int, default=None, help="sampler steps")
    g.add_argument("--guidance", type=_float_type(lambda v: v >= 0, ">= 0"), default=None, help="CFG scale")
    g.add_argument("--guidance-rescale", type=_rate, default=None, help="guidance rescale in [0, 1] (0: off)")
    g.add_argument("--height", type=_size, default=None, help="image height, a multiple of 8")
    g.add_argument("--width", type=_size, default=None, help="image width, a multiple of 8")
    g.add_argument("--scheduler", type=_scheduler_name, default=None, metavar="NAME",
                   help="diffusers scheduler class (e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler), built "
                        "from the model's scheduler config")
    if batch_size:
        g.add_argument("--batch-size", type=_positive_int, default=None, help="images (or prompts) per pipeline call")


def _add_references(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-references", action="store_true",
                   help="accept reference paths outside the manifest's folder")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out rows whose reference cannot be downloaded or read (each is reported), instead of "
                        "stopping at the first")


def _fetch(args: argparse.Namespace, entries: list) -> tuple[list, list[dict]]:
    """Download URL references into the cache and check local ones, before the model loads.

    Returns:
        The usable entries and, with ``--skip-missing``, one record per left-out row (else the first failure raises).
    """
    from diffmem.data import fetch_references

    ok, failures = fetch_references(entries, skip_missing=args.skip_missing,
                                    allow_outside=getattr(args, "allow_outside_references", False))
    return ok, [f.to_dict() for f in failures]


def _need_model(args: argparse.Namespace) -> None:
    from diffmem.pipelines import check_model

    check_model(args.model, allow_pickle=getattr(args, "allow_pickle", False))
    _check_device(getattr(args, "device", None))


def _need_file(path: str | None, what: str) -> None:
    from diffmem.errors import PromptFileError

    if path is not None and not Path(path).is_file():
        raise PromptFileError(f"{what} {path} does not exist")


def _need_edit(path: str | None) -> None:
    from diffmem.files import pair_paths

    if path is not None and not pair_paths(path)[0].is_file():
        raise DiffmemError(f"edit file {pair_paths(path)[0]} does not exist (--edit)")


def _need_repo_id(repo_id: str | None) -> None:
    from huggingface_hub.utils import validate_repo_id

    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except ValueError:
            raise ConfigError(f"--push-to-hub {repo_id!r}: not a Hub repo id (namespace/name)") from None


def _push(folder: Path, repo_id: str) -> None:
    """Upload a finished export; a failure names the repository and leaves the export in place."""
    from diffmem.errors import PushError
    from diffmem.modelcard import push_to_hub

    try:
        url = push_to_hub(folder, repo_id)
    except PushError as err:
        raise PushError(f"{err} (the export {folder} is complete; retry with: hf upload {repo_id} {folder})") from err
    logger.info("pushed %s to %s", folder, url)


def _need_suffix(path: str, suffixes: tuple[str, ...], flag: str) -> None:
    if Path(path).suffix not in suffixes:
        raise ConfigError(f"{flag} {path}: use a {' or '.join(suffixes)} suffix")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine")


def _load(args: argparse.Namespace) -> Any:
    import torch

    from diffmem.pipelines import load_pipeline, quiet_diffusers, warn_long_prompts

    quiet_diffusers()
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, torch_dtype=dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = getattr(args, "_prompts", None)
    if prompts:
        warn_long_prompts(pipe, prompts)
    return pipe


def _sampler_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings given on the command line (``SamplerConfig`` field names)."""
    return {field: getattr(args, dest) for field, dest in _SAMPLER_FLAGS if getattr(args, dest, None) is not None}


def _sampler(args: argparse.Namespace, model: Any = None) -> Any:
    """Sampler settings: the flags given, over the model's ``diffmem_defaults.json``, over the pipeline's defaults.

    Args:
        args: The parsed command line.
        model: The model folder, hub id or loaded pipeline (default: ``args.model``).

    Returns:
        A :class:`~diffmem.config.SamplerConfig`.
    """
    from diffmem.config import SamplerConfig

    return SamplerConfig.resolve(args.model if model is None else model, **_sampler_flags(args))


def _sample_with(args: argparse.Namespace, pipe: Any) -> Any:
    """Sampler settings on the loaded pipeline, and its scheduler swapped for the one chosen.

    The flags given win over the pipeline's folder defaults and its own (its image size and scheduler included);
    the settings found before loading (:func:`_sampler`) only checked the flags early.

    Returns:
        The :class:`~diffmem.config.SamplerConfig` used, as every output records it.
    """
    sampler = _sampler(args, pipe)
    sampler.apply_scheduler(pipe)
    return sampler


def _write_json(path: str | Path, obj: Any) -> None:
    from diffmem.files import write_json

    write_json(Path(path), obj)


def _scorer(name: str, args: argparse.Namespace) -> Any:
    from diffmem.score import get_scorer

    weights = getattr(args, "scorer_weights", None)
    if name == "sscd":
        kwargs: dict[str, Any] = {"allow_pickle": getattr(args, "allow_pickle", False)}
        if weights:
            return get_scorer(name, weights=weights, **kwargs)  # the user's file: no silent fallback
        return get_scorer(name, fallback="ssim", **kwargs)
    if weights:
        raise ConfigError(f"--scorer-weights applies to --scorer sscd, not {name!r}")
    return get_scorer(name)


def _entries(args: argparse.Namespace, split: str | None = None) -> list:
    from diffmem.data import read_entries

    entries = read_entries(args.prompts, allow_outside=getattr(args, "allow_outside_references", False))
    entries = [e for e in entries if split is None or e.split == split]
    args._prompts = [e.prompt for e in entries]  # checked against the text encoder's length once loaded
    return entries


# ---------------------------------------------------------------------------------------------------------------
# subcommands


def cmd_record(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from diffmem.config import RecordConfig
    from diffmem.data import read_prompts
    from diffmem.resume import record_to_file

    _need_model(args)
    if args.empty_prompt_only:
        prompts = [""]
    else:
        if args.prompts is None:
            raise ConfigError("give --prompts FILE (or --empty-prompt-only)")
        prompts = read_prompts(args.prompts)
        if args.add_empty_prompt:
            prompts = [""] + prompts
    args._prompts = prompts
    sampler = _sampler(args)
    cfg = RecordConfig(
        num_inference_steps=sampler.num_inference_steps, record_steps=args.record_steps,
        guidance_scale=sampler.guidance_scale, num_seeds=args.seeds, seed=args.seed,
        batch_size=args.batch_size or 8, height=sampler.height, width=sampler.width, target=args.target,
        signatures=args.signatures,
    )
    pipe = _load(args)
    sampler = _sample_with(args, pipe)
    cfg = replace(cfg, num_inference_steps=sampler.num_inference_steps, guidance_scale=sampler.guidance_scale)
    extra = {k: v for k, v in sampler.call_kwargs(pipe).items() if k not in ("num_inference_steps", "guidance_scale",
                                                                             "height", "width")} or None
    stats = record_to_file(pipe, prompts, cfg, out=args.out, model_id=str(args.model), pipe_kwargs=extra,
                           checkpoint_every=args.checkpoint_every)
    logger.info("wrote %s (%d layers, %d steps, %d prompts)", args.out, len(stats.layers), stats.steps, len(prompts))


def cmd_locate(args: argparse.Namespace) -> None:
    from diffmem.config import BASE_PRESETS, LocateConfig
    from diffmem.localization import locate
    from diffmem.stats import ActivationStats, prompts_sha256

    _need_model(args)
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
    pipe = _load(args)
    edit = locate(pipe, mem, base, cfg)
    path = edit.save(args.out)
    logger.info("%s%s: %d of %d weights changed (%.4f%%) -> %s", edit.kind,
                f" (preset {args.preset}: the published procedure)" if args.preset else "",
                edit.num_params_changed(), edit.num_total(), 100 * edit.fraction_changed(), path)


def cmd_prune(args: argparse.Namespace) -> None:
    from diffmem.edits import export_edited, load_edit

    _need_model(args)
    edit_path = args.edit or args.mask or args.directions
    if edit_path is None:
        raise ConfigError("give the edit to export with --edit FILE")
    _need_edit(edit_path)
    _need_repo_id(args.push_to_hub)
    edit = load_edit(edit_path)
    from diffmem.edits import check_output_dir

    check_output_dir(Path(args.out), args.overwrite, str(args.model))
    pipe = _load(args)
    out = export_edited(pipe, edit, args.out, overwrite=args.overwrite, source=str(args.model), edit_path=edit_path)
    logger.info("exported %s", out)
    if args.push_to_hub:
        _push(Path(out), args.push_to_hub)


def cmd_iou(args: argparse.Namespace) -> None:
    from diffmem.masks import Mask, mask_iou

    res = mask_iou(Mask.load(args.mask_a), Mask.load(args.mask_b))
    print(json.dumps(res, indent=2, sort_keys=True))  # noqa: T201 - the command's output


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
        cfg = detector_config(method, score_steps=args.k, num_inference_steps=sampler.num_inference_steps,
                              guidance_scale=sampler.guidance_scale, guidance_rescale=sampler.guidance_rescale,
                              height=sampler.height, width=sampler.width, **given)
    elif args.preset:
        explicit = {k: v for k, v in _sampler_flags(args).items() if k != "scheduler"}
        if args.k is not None:
            explicit["score_steps"] = args.k
        cfg = DetectConfig.from_preset(args.preset, **{"height": sampler.height, "width": sampler.width, **given,
                                                        **explicit})
        sampler = replace(sampler, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                          guidance_rescale=cfg.guidance_rescale)
    else:
        cfg = DetectConfig(score_steps=args.k or min(5, sampler.num_inference_steps),
                           num_inference_steps=sampler.num_inference_steps, guidance_scale=sampler.guidance_scale,
                           guidance_rescale=sampler.guidance_rescale, height=sampler.height, width=sampler.width,
                           **{"num_seeds": 4, **given})
    return cfg, sampler


def cmd_detect(args: argparse.Namespace) -> None:
    from diffmem.data import read_prompts
    from diffmem.detection import detect
    from diffmem.files import write_table
    from diffmem.parallel import is_main_process

    _need_model(args)
    _need_suffix(args.out, (".jsonl", ".csv"), "--out")
    entries = _entries(args)
    calib = read_prompts(args.calibration) if args.calibration else None
    _detect_config(args, _sampler(args))  # checks the flags before the model loads
    pipe = _load(args)
    cfg, sampler = _detect_config(args, _sample_with(args, pipe))
    labels = [e.memorized for e in entries] if any(e.memorized for e in entries) else None
    res = detect(pipe, [e.prompt for e in entries], cfg, labels=labels, calibration_prompts=calib, m=args.m)
    if is_main_process():
        out = Path(args.out)
        write_table(out, res.ranked())
        _write_json(out.with_suffix(".summary.json"), {"summary": res.summary(), "config": cfg.to_dict(),
                                                       "method": res.method, "sampler": sampler.to_dict(),
                                                       "model": str(args.model)})
        if res.masks is not None:
            import numpy as np

            np.savez_compressed(out.with_suffix(".masks.npz"), prompts=np.asarray(res.prompts), masks=res.masks,
                                maps=res.maps)
        logger.info("wrote %s; %s", out, json.dumps(res.summary(), sort_keys=True))


def cmd_attack(args: argparse.Namespace) -> None:
    from diffmem.data import load_reference, read_prompts, resolve_references
    from diffmem.edits import apply_edit, load_edit
    from diffmem.extraction import AttackConfig, extraction_attack

    _need_model(args)
    _need_edit(args.edit)
    entries = _entries(args)
    refs = resolve_references(args.references, entries, allow_outside=args.allow_outside_references)
    calib = read_prompts(args.calibration) if args.calibration else None
    edit = load_edit(args.edit) if args.edit else None
    sampler = _sampler(args)
    size = (sampler.height, sampler.width) if sampler.height else None
    cfg = AttackConfig(num_generations=args.generations, seed=args.seed, clique_size=args.clique,
                       threshold=args.threshold, false_flag_rate=args.false_flag_rate, batch_size=args.batch_size or 64)
    pipe = _load(args)
    sampler = _sample_with(args, pipe)
    scorer = _scorer(args.scorer, args)
    ref_imgs = [None if r is None else load_reference(r, size, row=e) for r, e in zip(refs, entries)]
    with apply_edit(pipe, edit):
        res = extraction_attack(pipe, [e.prompt for e in entries], cfg, scorer, references=ref_imgs,
                                calibration_prompts=calib, call_kwargs=sampler.call_kwargs(pipe),
                                out_dir=Path(args.out))
    logger.info("attack: %s", json.dumps(res.summary(), sort_keys=True))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from diffmem.data import read_manifest
    from diffmem.edits import load_edit
    from diffmem.evaluation import EvalConfig, evaluate_edit
    from diffmem.parallel import is_main_process
    from diffmem.score import get_scorer

    _need_model(args)
    edit_path = args.edit or args.mask or args.directions
    _need_edit(edit_path)
    entries, failures = _fetch(args, read_manifest(args.prompts, allow_outside=args.allow_outside_references))
    missing = [e for e in entries if e.reference is None]
    if len(missing) == len(entries):
        raise ConfigError(f"{args.prompts}: no row has a reference image, so replication cannot be measured")
    if missing:
        logger.warning("%d rows have no reference image: their replication is not measured", len(missing))
    edit = load_edit(edit_path) if edit_path else None
    _sampler(args)  # checks the flags before the model loads
    pipe = _load(args)
    sampler = _sample_with(args, pipe)
    cfg = EvalConfig(num_seeds=args.seeds, seed=args.seed, batch_size=args.batch_size or 64,
                     call_kwargs=sampler.call_kwargs(pipe))
    scorer = _scorer(args.scorer, args)
    clip = get_scorer("clip", model_name=args.clip_model, pretrained=args.clip_pretrained) if args.clip_pretrained else None
    before, after = evaluate_edit(pipe, entries, cfg, scorer, edit, clip_scorer=clip)
    report: dict[str, Any] = {"model": str(args.model), "edit": edit_path, "sampler": sampler.to_dict(),
                              "scorer": scorer.describe(),
                              "config": cfg.to_dict(), "before": before.summary(), "rows_before": before.rows,
                              "skipped_rows": failures}
    if after is not None:
        report.update(after=after.summary(), rows_after=after.rows)
    if is_main_process():
        _write_json(args.out, report)
        logger.info("wrote %s", args.out)


def cmd_reextract(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from diffmem.edits import apply_edit, load_edit
    from diffmem.files import write_json
    from diffmem.parallel import is_main_process
    from diffmem.reextraction import ReextractConfig, ReextractItem, reextract
    from diffmem.sampling import image_size

    _need_model(args)
    _need_edit(args.edit)
    entries = _entries(args)
    rows = [e for e in entries if e.split == args.split or (args.control and e.split == "nonmem")]
    if not any(e.split == args.split for e in rows):
        raise ConfigError(f"{args.prompts}: no row of split {args.split!r}")
    for e in rows:  # the attack needs every training image: check them all before the model loads
        if e.reference is None:
            raise ConfigError(f"{e.row}: row {e.prompt!r} has no reference image; the attack needs the training image")
    rows, failures = _fetch(args, rows)
    edit = load_edit(args.edit) if args.edit else None
    sampler = _sampler(args)
    batch_size = {"sample_batch_size": args.batch_size} if args.batch_size else {}
    cfg = ReextractConfig(opt_steps=args.opt_steps, lr=args.lr, batch=args.batch, init=args.init,
                          num_seeds=args.seeds, call_kwargs=sampler.call_kwargs(), seed=args.seed,
                          checkpoints=tuple(c for c in (0, 10, 25, 50) if c <= args.opt_steps), **batch_size)
    from diffmem.data import load_reference

    size = (sampler.height, sampler.width) if sampler.height else None
    refs = [load_reference(e, size, row=e) for e in rows] if size else None
    pipe = _load(args)
    sampler = _sample_with(args, pipe)
    cfg = replace(cfg, call_kwargs=sampler.call_kwargs(pipe))
    if refs is None:
        refs = [load_reference(e, image_size(pipe), row=e) for e in rows]
    items = [ReextractItem(e.prompt, r, "memorized" if e.split == args.split else "control", i)
             for i, (e, r) in enumerate(zip(rows, refs))]
    with apply_edit(pipe, edit):
        res = reextract(pipe, items, cfg, _scorer(args.scorer, args))
    if is_main_process():
        if failures:
            write_json(Path(args.out) / "skipped_rows.json", failures)
        path = write_json(Path(args.out) / "reextract.json",
                          {"summary": res.summary(), "rows": res.rows, "sampler": sampler.to_dict()})
        logger.info("wrote %s: %s", path, json.dumps({k: v for k, v in res.summary().items()
                                                      if k in ("memorization_rate", "control_rate")}))


def cmd_mitigate(args: argparse.Namespace) -> None:
    from diffmem.workflows.mitigate import MitigateRun, run_mitigate

    _need_model(args)
    _need_file(args.prompts, "prompt file")
    _need_repo_id(args.push_to_hub)
    run = MitigateRun(model=args.model, prompts=args.prompts, out=args.out, method=args.method,
                      ratio=None if args.ratio == "auto" else float(args.ratio), robust=args.robust,
                      target=args.target, max_rounds=args.max_rounds, scorer=args.scorer,
                      scorer_weights=args.scorer_weights, overwrite=args.overwrite,
                      allow_pickle=args.allow_pickle, allow_outside=args.allow_outside_references,
                      opt_steps=args.opt_steps, seed=args.seed, sampler=_sampler_flags(args), folds=args.folds,
                      robust_aggregate=args.robust_aggregate)
    report = run_mitigate(run)
    print(report["headline_text"])  # noqa: T201 - the command's output
    if args.push_to_hub:
        _push(Path(args.out) / "pruned", args.push_to_hub)


def cmd_demo(args: argparse.Namespace) -> None:
    from diffmem.workflows.demo import DemoConfig, run_demo

    extra = {k: v for k, v in (("eval_seeds", args.eval_seeds), ("attack_generations", args.attack_generations),
                               ("scorer", args.scorer)) if v is not None}
    cfg = DemoConfig(model=args.model, out=args.out, ratio=args.ratio, quick=args.quick, seed=args.seed,
                     compare_directions=not args.no_directions, sampler=_sampler_flags(args), **extra)
    report = run_demo(cfg)
    print(report["headline_text"])  # noqa: T201 - the command's output


def cmd_audit(args: argparse.Namespace) -> None:
    from diffmem.workflows.audit import AuditConfig, run_audit

    _need_model(args)
    _need_edit(args.edit)
    if args.prompts is None and args.candidates is None:
        raise ConfigError("give --prompts FILE, --candidates FILE, or both")
    _need_file(args.prompts, "prompt file")
    _need_file(args.candidates, "candidate file")
    _need_file(args.calibration, "calibration file")
    cfg = AuditConfig(model=args.model, prompts=args.prompts, references=args.references, out=args.out,
                      calibration=args.calibration, allow_pickle=args.allow_pickle, quick=args.quick,
                      allow_outside=args.allow_outside_references, edit=args.edit, sampler=_sampler_flags(args),
                      candidates=args.candidates, method=args.method or "wen", flag_top=args.flag_top)
    report = run_audit(cfg)
    print(report["headline_text"])  # noqa: T201 - the command's output


def cmd_manifest_convert(args: argparse.Namespace) -> None:
    from diffmem.data import SplitConfig, convert_manifest

    split = SplitConfig(seed=args.split_seed, locate_fraction=args.locate_fraction)
    summary = convert_manifest(args.source, args.out, memorized=args.memorized, split=split,
                               allow_outside=args.allow_outside_references)
    print(summary.text)  # noqa: T201 - the command's output


# ---------------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``diffmem: error: ...``, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("diffmem").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"diffmem: error: {where}{' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from diffmem import __version__

    parser = _Parser(prog="diffmem", description="Locate and delete memorization in diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, func: Callable[[argparse.Namespace], Any], help: str) -> argparse.ArgumentParser:
        """Add the subcommand ``name``, run by ``func(args)``, and return its parser."""
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        return p

    p = command("record", cmd_record, "record FFN activation statistics over prompts")
    _add_model(p)
    p.add_argument("--prompts", default=None, help="prompt file (.txt, .jsonl, .csv)")
    p.add_argument("--out", required=True, help="output statistics (.safetensors + .json)")
    _add_sampling(p)
    p.add_argument("--record-steps", type=_positive_int, default=10, help="leading sampler steps to record (tau)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="generations per prompt")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--target", default=None, help="regex or name suffix of the layers to record")
    p.add_argument("--signatures", action="store_true", help="also keep per-prompt mean activations")
    p.add_argument("--add-empty-prompt", action="store_true", help="also record the empty prompt (for a base set)")
    p.add_argument("--empty-prompt-only", action="store_true", help="record the empty prompt alone (chavhan2024 base)")
    p.add_argument("--checkpoint-every", type=_nonneg_int, default=0,
                   help="checkpoint partial statistics every N prompts per process (resumable)")

    p = command("locate", cmd_locate, "score and select the weights (or directions) behind memorization")
    _add_model(p)
    p.add_argument("--memorized", required=True, help="statistics of memorized prompts")
    p.add_argument("--base", required=True, help="statistics of base prompts")
    p.add_argument("--out", required=True, help="output edit (.safetensors + .json)")
    p.add_argument("--method", choices=["wanda", "neuron", "directions"], default=None,
                   help="wanda: Chavhan et al.'s weight mask (default); neuron: whole FFN neurons; directions: a "
                        "low-rank subspace")
    p.add_argument("--preset", choices=["chavhan2024"], default=None, help="reproduce the published procedure exactly")
    p.add_argument("--ratio", type=_fraction, default=None, help="fraction per row (wanda) or per layer (neuron)")
    p.add_argument("--record-steps", type=_positive_int, default=None, help="use the first N recorded steps (tau)")
    p.add_argument("--min-step-fraction", type=_rate, default=None)
    p.add_argument("--half", choices=["cond", "uncond", "both"], default=None)
    p.add_argument("--rank", type=_positive_int, default=None, help="directions: fixed k per layer")
    p.add_argument("--explained-variance", type=_fraction, default=None, help="directions: energy share that picks k")

    p = command("prune", cmd_prune, "export an edited pipeline that plain diffusers loads")
    _add_model(p)
    p.add_argument("--edit", default=None, help="a mask, direction basis or weight delta saved by diffmem")
    p.add_argument("--mask", default=None, help=argparse.SUPPRESS)
    p.add_argument("--directions", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier diffmem export at --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload the export to this Hub model repo")

    p = command("iou", cmd_iou, "overlap of two masks, per layer and overall")
    p.add_argument("mask_a")
    p.add_argument("mask_b")

    p = command("detect", cmd_detect, "rank prompts by a memorization detector (default: Wen et al.'s noise norm)")
    _add_model(p)
    p.add_argument("--prompts", required=True, help="prompt file or manifest (labels give AUC)")
    p.add_argument("--out", required=True, help="ranked table (.jsonl or .csv); bright_ending also writes .masks.npz")
    _add_sampling(p)
    p.add_argument("--method", choices=_DetectorNames(), default=None, metavar="NAME",
                   help="registered detector: %(choices)s (default wen)")
    p.add_argument("--preset", choices=["wen2024"], default=None,
                   help="reproduce the published procedure (sampler flags given still win)")
    p.add_argument("--k", type=_positive_int, default=None, help="leading denoiser evaluations to average (default 5, chosen by measurement)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="noises per prompt (default 4)")
    p.add_argument("--seed", type=_nonneg_int, default=None)
    p.add_argument("--calibration", default=None, help="non-memorized prompts: flag scores above mean + m*std")
    p.add_argument("--m", type=float, default=3.0)
    _add_references(p)

    p = command("attack", cmd_attack, "Carlini et al.'s generate-and-filter extraction attack")
    _add_model(p)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True, help="output folder (attack.json, extractions/)")
    p.add_argument("--references", default=None, help="manifest or folder with references.jsonl")
    p.add_argument("--calibration", default=None, help="non-memorized prompts that calibrate the threshold")
    _add_sampling(p)
    p.add_argument("--generations", type=_positive_int, default=16)
    p.add_argument("--clique", type=_positive_int, default=4, help="clique size m")
    p.add_argument("--threshold", type=float, default=None, help="fixed similarity threshold (skips calibration)")
    p.add_argument("--false-flag-rate", type=_rate, default=0.05)
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--scorer-weights", default=None, help="SSCD weights file (.onnx, or .pt with --allow-pickle)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--edit", default=None, help="apply a saved edit reversibly first")
    _add_references(p)

    p = command("evaluate", cmd_evaluate, "replication, diversity and drift with and without an edit")
    _add_model(p)
    p.add_argument("--prompts", required=True, help="manifest (jsonl with prompt/split/reference)")
    p.add_argument("--out", default="evaluation.json")
    p.add_argument("--edit", default=None, help="a saved edit (mask, directions or weight delta)")
    p.add_argument("--mask", default=None, help=argparse.SUPPRESS)
    p.add_argument("--directions", default=None, help=argparse.SUPPRESS)
    _add_sampling(p)
    p.add_argument("--seeds", type=_positive_int, default=8)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--scorer", default="sscd", help="sscd (falls back to ssim when unavailable), clip, ssim, ...")
    p.add_argument("--scorer-weights", default=None, help="the scorer's weights file (e.g. the official SSCD .pt/.onnx)")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--clip-pretrained", default=None, help="CLIP weights tag or file for the CLIP score")
    _add_references(p)

    p = command("reextract", cmd_reextract, "re-extraction attack: optimise the conditioning toward training images")
    _add_model(p)
    p.add_argument("--prompts", required=True, help="manifest with reference images")
    p.add_argument("--out", required=True, help="output folder (reextract.json)")
    p.add_argument("--edit", default=None, help="attack the model with this saved edit applied")
    p.add_argument("--split", default="heldout", help="memorized rows to attack (default heldout)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the false-positive control on the nonmem rows")
    p.add_argument("--opt-steps", type=_positive_int, default=50)
    p.add_argument("--lr", type=_positive_float, default=0.1)
    p.add_argument("--batch", type=_positive_int, default=8)
    p.add_argument("--init", default="prompt", help="prompt, random or prompt-of:OTHER TEXT")
    p.add_argument("--seeds", type=_positive_int, default=4)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--scorer-weights", default=None, help="SSCD weights file (.onnx, or .pt with --allow-pickle)")
    _add_sampling(p)
    _add_references(p)

    p = command("mitigate", cmd_mitigate, "locate, tune and (with --robust) harden an edit; export the clean model")
    _add_model(p)
    p.add_argument("--prompts", required=True, help="manifest with locate / heldout / nonmem rows")
    p.add_argument("--out", required=True, help="output folder (pruned/, edit, report.json, report.html)")
    p.add_argument("--method", choices=["wanda", "neuron", "directions"], default="wanda")
    p.add_argument("--ratio", default="auto", help="auto (the smallest that meets --target) or a number")
    p.add_argument("--robust", choices=["none", "prune", "finetune"], default="none")
    p.add_argument("--target", type=_rate, default=0.05)
    p.add_argument("--max-rounds", type=_positive_int, default=3)
    p.add_argument("--opt-steps", type=_positive_int, default=50, help="attack steps during mitigation")
    p.add_argument("--folds", type=_folds, default=3,
                   help="cross-fitting folds over the locate rows for the out-of-fold estimate (0: off)")
    p.add_argument("--robust-aggregate", choices=["shared", "sum"], default="shared",
                   help="robust prune keeps weights that many images share (shared) or the summed saliency (sum)")
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--scorer-weights", default=None, help="SSCD weights file (.onnx, or .pt with --allow-pickle)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier diffmem output at --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="then upload the exported model (OUT/pruned) to this Hub model repo")
    _add_sampling(p, batch_size=False)
    _add_references(p)

    p = command("demo", cmd_demo, "the full mitigate-and-attack demo on the embedded tiny memorizer")
    p.add_argument("--model", default=None, help="default: assets/tiny-sd-memorizer")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ratio", type=_fraction, default=None, help="mask ratio (default: chosen on the locate split)")
    p.add_argument("--quick", action="store_true", help="reduced settings (CI)")
    p.add_argument("--no-directions", action="store_true", help="skip the low-rank projection editor")
    p.add_argument("--eval-seeds", type=_positive_int, default=None, help="seeds per prompt in the evaluation")
    p.add_argument("--attack-generations", type=_positive_int, default=None, help="generations per attacked prompt")
    p.add_argument("--scorer", default=None, help="evaluation scorer (default ssim: the embedded model is 32 px)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    _add_sampling(p, batch_size=False)

    p = command("audit", cmd_audit, "detect, attack and re-extract (with references) on any checkpoint")
    p.add_argument("model")
    p.add_argument("--prompts", default=None, help="prompts (or manifest) to audit")
    p.add_argument("--candidates", default=None,
                   help="a prompt pool to screen with the detector; its top flagged prompts are attacked too")
    p.add_argument("--method", choices=_DetectorNames(), default=None, metavar="NAME",
                   help="registered detector of the detection and the screening: %(choices)s (default wen)")
    p.add_argument("--flag-top", type=_positive_int, default=None,
                   help="pass the K highest-scoring candidates on (default 16; with --calibration: at most K above "
                        "the calibrated threshold)")
    p.add_argument("--references", default=None, help="manifest or folder with references.jsonl")
    p.add_argument("--calibration", default=None, help="non-memorized prompts (also calibrate the screening)")
    p.add_argument("--edit", default=None, help="audit the model with this saved edit applied")
    p.add_argument("--out", default="runs/audit")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--quick", action="store_true")
    _add_sampling(p, batch_size=False)
    _add_references(p)

    p = sub.add_parser("manifest", help="manifest tools: convert published prompt sets into checked manifests")
    manifest = p.add_subparsers(dest="manifest_command", metavar="COMMAND", required=True, parser_class=_Parser)
    p = manifest.add_parser("convert", help="write a checked manifest from a published prompt set or a prompt list")
    p.set_defaults(func=cmd_manifest_convert)
    p.add_argument("source", metavar="IN",
                   help="Wen jsonl, NeMo csv, Webster parquet, MemBench csv, diffmem manifest or prompt list")
    p.add_argument("out", metavar="OUT", help="the manifest to write (.jsonl)")
    label = p.add_mutually_exclusive_group()
    label.add_argument("--memorized", action="store_const", const=True, default=None,
                       help="every row of a file without labels (prompt list, Wen jsonl, NeMo csv) is memorized")
    label.add_argument("--not-memorized", dest="memorized", action="store_const", const=False,
                       help="no row of a file without labels is memorized")
    p.add_argument("--split-seed", type=_nonneg_int, default=0, metavar="N",
                   help="seed of the hash that splits memorized rows between locate and heldout (default 0)")
    p.add_argument("--locate-fraction", type=_rate, default=0.5, metavar="F",
                   help="share of the memorized prompts that go to locate; the rest go to heldout (default 0.5)")
    p.add_argument("--allow-outside-references", action="store_true",
                   help="accept reference paths outside the input's or the output's folder")
    return parser


@functools.cache
def _cap_threads() -> None:
    """Use only the CPUs that are free: on a shared machine, idle-spinning threads can slow torch down 30-fold.

    ``OMP_NUM_THREADS`` set by the user wins; otherwise the CPUs idle over the next 0.3 s (from ``/proc/stat``, not
    the load average, which trails by a minute), at least one. Once per process; the choice is logged in one line.
    """
    from diffmem.parallel import choose_num_threads

    threads, why = choose_num_threads()
    if threads is None:
        logger.info("torch threads: as %s", why)
        return
    import torch

    threads = min(threads, torch.get_num_threads())
    torch.set_num_threads(threads)
    logger.info("torch threads: %d (%s; set OMP_NUM_THREADS to choose)", threads, why)


_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffmem`` console script.

    A user error (a :class:`~diffmem.errors.DiffmemError`, such as a ``ConfigError`` for an invalid value, or an OS
    error on a named path) ends in one line ``diffmem: error: ...`` and exit status 2; argparse rejects bad flags the
    same way. Any other exception is a bug: it propagates with its traceback (exit status 1).

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 for a user error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _cap_threads()
    for noisy in ("httpx", "urllib3", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except (DiffmemError, *_PATH_ERRORS) as err:
        if args.verbose or (isinstance(err, OSError) and err.filename is None):
            raise
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"diffmem: error: {msg}", file=sys.stderr)  # noqa: T201
        return 2
    finally:
        _shutdown_process_group()
    return 0


def _shutdown_process_group() -> None:
    """Leave the process group cleanly under ``accelerate launch`` (an abandoned gloo group can abort at exit)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
