"""``diffmem`` command line: thin subcommands, one library call each.

Every user-fixable problem (a wrong path, a malformed prompt file, a mismatched mask, an out-of-range value) ends
in one line ``diffmem: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("diffmem")

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _add_model(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help="diffusers pipeline folder or hub id")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin weights (unsafe)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weight dtype")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, else 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, else 7.5)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale (default: the model's, else 0)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)


def _load(args):
    import torch

    from diffmem.pipelines import load_pipeline

    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, torch_dtype=dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sampling(args) -> dict:
    """Sampler settings: command-line values over the model's ``diffmem_defaults.json`` over diffusers' defaults."""
    from diffmem.zoo import sampling_defaults

    d = sampling_defaults(args.model) if Path(str(args.model)).is_dir() else {}
    out = {
        "num_inference_steps": args.steps if args.steps is not None else d.get("num_inference_steps", 50),
        "guidance_scale": args.guidance if args.guidance is not None else d.get("guidance_scale", 7.5),
        "height": args.height or d.get("height"),
        "width": args.width or d.get("width"),
    }
    rescale = args.guidance_rescale if args.guidance_rescale is not None else d.get("guidance_rescale", 0.0)
    if rescale:
        out["guidance_rescale"] = rescale
    return out


def _write_json(path: str | Path, obj) -> None:
    from diffmem.utils import atomic_write_text

    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _entries(path: str):
    """A manifest (jsonl with split/memorized fields) or a plain prompt file turned into ``nonmem`` entries."""
    from diffmem.data import ManifestEntry, read_manifest, read_prompt_records

    p = Path(path)
    if p.suffix == ".jsonl":
        first = next((ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()), "") if p.is_file() else ""
        if '"split"' in first and '"memorized"' in first:
            return read_manifest(p)
    recs = read_prompt_records(p)
    return [ManifestEntry(r["prompt"], False, 0, "nonmem", None, {}) for r in recs]


# ---------------------------------------------------------------------------------------------------------------
# subcommands


def cmd_record(args) -> None:
    from diffmem.config import RecordConfig
    from diffmem.data import read_prompts

    prompts = read_prompts(args.prompts)
    if args.add_empty_prompt:
        prompts = [""] + prompts
    pipe = _load(args)
    s = _sampling(args)
    cfg = RecordConfig(
        num_inference_steps=s["num_inference_steps"], record_steps=args.record_steps,
        guidance_scale=s["guidance_scale"], num_seeds=args.seeds, seed=args.seed,
        batch_size=args.batch_size or 8, height=s["height"], width=s["width"], target=args.target,
        signatures=args.signatures,
    )
    extra = {"guidance_rescale": s["guidance_rescale"]} if "guidance_rescale" in s else None
    from diffmem.distributed import record_distributed

    stats = record_distributed(pipe, prompts, cfg, out=args.out, model_id=str(args.model), pipe_kwargs=extra,
                               checkpoint_every=args.checkpoint_every)
    if stats is not None:
        logger.info("wrote %s (%d layers, %d steps, %d prompts)", args.out, len(stats.layers), stats.steps, len(prompts))


def cmd_locate(args) -> None:
    from diffmem.config import LocateConfig
    from diffmem.locate import locate
    from diffmem.stats import ActivationStats

    method = args.method or ("neuron" if args.level == "neuron" else "wanda")
    cfg = LocateConfig(method=method, ratio=args.ratio, steps=args.steps, min_step_fraction=args.min_step_fraction,
                       half=args.half, rank=args.rank, explained_variance=args.explained_variance)
    mem = ActivationStats.load(args.memorized)
    base = ActivationStats.load(args.base)
    pipe = _load(args)
    result = locate(pipe, mem, base, cfg)
    path = result.save(args.out)
    if hasattr(result, "num_masked"):
        logger.info("mask: %d of %d FFN weights (%.4f%%) -> %s", result.num_masked(), result.num_total(),
                    100 * result.fraction(), path)
    else:
        logger.info("directions: %s -> %s", result.ranks(), path)


def cmd_prune(args) -> None:
    from diffmem.prune import export_pruned

    if bool(args.mask) == bool(args.directions):
        raise SystemExit("diffmem: error: give exactly one of --mask or --directions")
    pipe = _load(args)
    if args.mask:
        from diffmem.locate import Mask

        mask = Mask.load(args.mask)
        out = export_pruned(pipe, mask, args.out, overwrite=args.overwrite, source=str(args.model), mask_path=args.mask)
    else:
        from diffmem.directions import DirectionBasis, export_projected

        basis = DirectionBasis.load(args.directions)
        out = export_projected(pipe, basis, args.out, overwrite=args.overwrite, source=str(args.model),
                               basis_path=args.directions)
    logger.info("exported %s", out)


def cmd_iou(args) -> None:
    from diffmem.locate import Mask, mask_iou

    res = mask_iou(Mask.load(args.mask_a), Mask.load(args.mask_b))
    print(json.dumps(res, indent=2, sort_keys=True))  # noqa: T201 - the command's output


def cmd_detect(args) -> None:
    from diffmem.detect import DetectConfig
    from diffmem.distributed import detect_distributed

    entries = _entries(args.prompts)
    prompts = [e.prompt for e in entries]
    labels = [e.memorized for e in entries] if any(e.memorized for e in entries) else None
    calib = None
    if args.calibration:
        from diffmem.data import read_prompts

        calib = read_prompts(args.calibration)
    pipe = _load(args)
    s = _sampling(args)
    cfg = DetectConfig(steps=args.k, num_seeds=args.seeds, seed=args.seed, num_inference_steps=s["num_inference_steps"],
                       guidance_scale=s["guidance_scale"], guidance_rescale=s.get("guidance_rescale", 0.0),
                       batch_size=args.batch_size or 8, height=s["height"], width=s["width"])
    res = detect_distributed(pipe, prompts, cfg, labels=labels, calibration_prompts=calib, m=args.m)
    if res is None:
        return
    rows = res.ranked()
    out = Path(args.out)
    from diffmem.utils import write_table

    write_table(out, rows)
    summary = res.summary()
    _write_json(out.with_suffix(".summary.json"), {"summary": summary, "config": cfg.to_dict()})
    logger.info("wrote %s; %s", out, json.dumps(summary, sort_keys=True))


def _edit_from_args(args):
    if getattr(args, "mask", None):
        from diffmem.locate import Mask

        return Mask.load(args.mask)
    if getattr(args, "directions", None):
        from diffmem.directions import DirectionBasis

        return DirectionBasis.load(args.directions)
    return None


def cmd_attack(args) -> None:
    from diffmem.attack import AttackConfig
    from diffmem.data import read_prompts
    from diffmem.distributed import attack_distributed
    from diffmem.evaluate import edit_context, load_reference
    from diffmem.score import get_scorer

    entries = _entries(args.prompts)
    refs = None
    if args.references:
        refs = _references(args.references, entries)
    calib = read_prompts(args.calibration) if args.calibration else None
    pipe = _load(args)
    s = _sampling(args)
    scorer = get_scorer(args.scorer, fallback="ssim") if args.scorer == "sscd" else get_scorer(args.scorer)
    cfg = AttackConfig(num_generations=args.generations, seed=args.seed, clique_size=args.clique,
                       threshold=args.threshold, false_flag_rate=args.false_flag_rate, batch_size=args.batch_size or 64)
    size = (s["height"], s["width"]) if s["height"] else None
    ref_imgs = None if refs is None else [None if r is None else load_reference(r, size) for r in refs]
    call = {k: v for k, v in s.items() if v is not None}
    with edit_context(pipe, _edit_from_args(args)):
        res = attack_distributed(pipe, [e.prompt for e in entries], cfg, scorer, references=ref_imgs,
                                 calibration_prompts=calib, call_kwargs=call, out_dir=Path(args.out))
    if res is not None:
        logger.info("attack: %s", json.dumps(res.summary(), sort_keys=True))


def _references(spec: str, entries) -> list:
    """References for ``entries``: from the manifest itself, from another manifest, or from a folder."""
    p = Path(spec)
    if p.is_dir():
        index = p / "references.jsonl"
        if not index.is_file():
            from diffmem.errors import PromptFileError

            raise PromptFileError(f"{p}: a reference folder needs a references.jsonl manifest ({{\"prompt\", \"reference\"}} per line)")
        by_prompt = {}
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                    by_prompt[obj["prompt"]] = (p / obj["reference"]).resolve()
                except (json.JSONDecodeError, KeyError) as err:
                    from diffmem.errors import PromptFileError

                    raise PromptFileError(f"{index}:{n}: {err}") from None
        return [by_prompt.get(e.prompt) for e in entries]
    from diffmem.data import read_manifest

    by_prompt = {m.prompt: m.reference for m in read_manifest(p)}
    return [by_prompt.get(e.prompt, e.reference) for e in entries]


def cmd_evaluate(args) -> None:
    from diffmem.data import read_manifest
    from diffmem.evaluate import EvalConfig
    from diffmem.score import get_scorer

    entries = read_manifest(args.prompts)
    pipe = _load(args)
    s = _sampling(args)
    call = {k: v for k, v in s.items() if v is not None}
    scorer = get_scorer(args.scorer, fallback="ssim") if args.scorer == "sscd" else get_scorer(args.scorer)
    clip = None
    if args.clip_pretrained:
        clip = get_scorer("clip", model_name=args.clip_model, pretrained=args.clip_pretrained)
    cfg = EvalConfig(num_seeds=args.seeds, seed=args.seed, batch_size=args.batch_size or 64, call_kwargs=call)
    edit = _edit_from_args(args)
    from diffmem.distributed import evaluate_distributed

    report = evaluate_distributed(pipe, entries, cfg, scorer, edit, clip_scorer=clip)
    if report is None:
        return
    report["model"] = str(args.model)
    report["edit"] = args.mask or args.directions
    _write_json(args.out, report)
    logger.info("wrote %s", args.out)
    for name in ("before", "after"):
        if name in report:
            logger.info("%s: %s", name, json.dumps({k: v.get("replication_rate") for k, v in report[name].items()
                                                     if isinstance(v, dict) and "replication_rate" in v}))


def cmd_demo(args) -> None:
    from diffmem.demo import DemoConfig, run_demo

    extra = {k: v for k, v in (("eval_seeds", args.eval_seeds), ("attack_generations", args.attack_generations),
                               ("scorer", args.scorer)) if v is not None}
    cfg = DemoConfig(model=args.model, out=args.out, ratio=args.ratio, quick=args.quick, seed=args.seed,
                     compare_directions=not args.no_directions, **extra)
    report = run_demo(cfg)
    print(report["headline_text"])  # noqa: T201 - the command's output


def cmd_audit(args) -> None:
    from diffmem.demo import AuditConfig, run_audit

    cfg = AuditConfig(model=args.model, prompts=args.prompts, references=args.references, out=args.out,
                      calibration=args.calibration, allow_pickle=args.allow_pickle, quick=args.quick)
    report = run_audit(cfg)
    print(report["headline_text"])  # noqa: T201 - the command's output


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from diffmem import __version__

    parser = argparse.ArgumentParser(prog="diffmem", description="Locate and delete memorization in diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("record", help="record FFN activation statistics over prompts")
    _add_model(p)
    p.add_argument("--prompts", required=True, help="prompt file (.txt, .jsonl, .csv)")
    p.add_argument("--out", required=True, help="output statistics (.safetensors + .json)")
    _add_sampling(p)
    p.add_argument("--record-steps", type=int, default=10, help="leading steps to record (tau)")
    p.add_argument("--seeds", type=int, default=1, help="generations per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default=None, help="regex or name suffix of the layers to record")
    p.add_argument("--signatures", action="store_true", help="also keep per-prompt mean activations")
    p.add_argument("--add-empty-prompt", action="store_true", help="also record the empty prompt (for a base set)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint partial statistics every N prompts (resumable)")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("locate", help="score and select the weights (or directions) behind memorization")
    _add_model(p)
    p.add_argument("--memorized", required=True, help="statistics of memorized prompts")
    p.add_argument("--base", required=True, help="statistics of base prompts")
    p.add_argument("--out", required=True, help="output mask / directions (.safetensors + .json)")
    p.add_argument("--ratio", type=float, default=0.01, help="fraction per row (weight) or per layer (neuron)")
    p.add_argument("--steps", type=int, default=10, help="use the first N recorded steps (tau)")
    p.add_argument("--level", choices=["weight", "neuron"], default="weight")
    p.add_argument("--method", choices=["wanda", "neuron", "directions"], default=None, help="overrides --level")
    p.add_argument("--min-step-fraction", type=float, default=0.0)
    p.add_argument("--half", choices=["cond", "uncond", "both"], default="cond")
    p.add_argument("--rank", type=int, default=None, help="directions: fixed k per layer")
    p.add_argument("--explained-variance", type=float, default=0.5, help="directions: energy share that picks k")
    p.set_defaults(func=cmd_locate)

    p = sub.add_parser("prune", help="export a pruned (or projected) pipeline that plain diffusers loads")
    _add_model(p)
    p.add_argument("--mask", default=None)
    p.add_argument("--directions", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("iou", help="overlap of two masks, per layer and overall")
    p.add_argument("mask_a")
    p.add_argument("mask_b")
    p.set_defaults(func=cmd_iou)

    p = sub.add_parser("detect", help="rank prompts by Wen et al.'s noise-prediction magnitude")
    _add_model(p)
    p.add_argument("--prompts", required=True, help="prompt file or manifest (labels give AUC)")
    p.add_argument("--out", required=True, help="ranked table (.jsonl or .csv)")
    _add_sampling(p)
    p.add_argument("--k", type=int, default=1, help="leading steps to average (1 = cheap mode)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", default=None, help="non-memorized prompts: flag scores above mean + m*std")
    p.add_argument("--m", type=float, default=3.0)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("attack", help="Carlini et al.'s generate-and-filter extraction attack")
    _add_model(p)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True, help="output folder (attack.json, extractions/)")
    p.add_argument("--references", default=None, help="manifest or folder with references.jsonl")
    p.add_argument("--calibration", default=None, help="non-memorized prompts that calibrate the threshold")
    _add_sampling(p)
    p.add_argument("--generations", type=int, default=16)
    p.add_argument("--clique", type=int, default=4, help="clique size m")
    p.add_argument("--threshold", type=float, default=None, help="fixed similarity threshold (skips calibration)")
    p.add_argument("--false-flag-rate", type=float, default=0.05)
    p.add_argument("--scorer", default="ssim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask", default=None, help="apply a mask reversibly first")
    p.add_argument("--directions", default=None, help="apply a direction projection reversibly first")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("evaluate", help="replication, diversity and drift with and without an edit")
    _add_model(p)
    p.add_argument("--prompts", required=True, help="manifest (jsonl with prompt/split/reference)")
    p.add_argument("--out", default="evaluation.json")
    p.add_argument("--mask", default=None)
    p.add_argument("--directions", default=None)
    _add_sampling(p)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default="sscd", help="sscd (falls back to ssim when unavailable), clip, ssim, ...")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--clip-pretrained", default=None, help="CLIP weights tag or file for the CLIP score")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the full locate-and-delete demo on the embedded tiny memorizer")
    p.add_argument("--model", default=None, help="default: assets/tiny-sd-memorizer")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ratio", type=float, default=None, help="mask ratio (default: chosen by a sweep on the locate split)")
    p.add_argument("--quick", action="store_true", help="reduced settings (CI)")
    p.add_argument("--no-directions", action="store_true", help="skip the low-rank projection editor")
    p.add_argument("--eval-seeds", type=int, default=None, help="seeds per prompt in the evaluation (default 4)")
    p.add_argument("--attack-generations", type=int, default=None, help="generations per attacked prompt (default 8)")
    p.add_argument("--scorer", default=None, help="evaluation scorer (default ssim: the embedded model is 32 px)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("audit", help="detect, attack and (with references) evaluate any checkpoint")
    p.add_argument("model")
    p.add_argument("--prompts", required=True)
    p.add_argument("--references", default=None, help="manifest or folder with references.jsonl")
    p.add_argument("--calibration", default=None, help="non-memorized prompts")
    p.add_argument("--out", default="runs/audit")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffmem`` console script."""
    from diffmem.errors import DiffmemError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except (DiffmemError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"diffmem: error: {msg}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
