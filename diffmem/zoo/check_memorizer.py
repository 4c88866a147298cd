"""Measure what the tiny memorizer does: replication by duplication count, generalization, detection AUC.

Usage::

    python -m diffmem.zoo.check_memorizer assets/tiny-sd-memorizer [--seeds 8] [--no-write]

A generation *replicates* when its nearest training image (pixel L2 over the whole rebuilt training set) is its
own reference and its SSIM to that reference is at least 0.6 at the native size. SSCD (cosine >= 0.5 to the
reference) is reported beside it when the SSCD scorer is installed. A non-memorized generation replicates when
its SSIM to its nearest training image is at least 0.6 (a near-copy of some single training image).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from diffmem.sampling import generate_images
from diffmem.config import SamplerConfig
from diffmem.zoo import sampling_defaults
from diffmem.zoo.shapes import classify_foreground_colour

logger = logging.getLogger(__name__)

__all__ = ["check_memorizer", "ssim_uint8", "nearest_training"]

SSIM_THRESHOLD = 0.6
SSCD_THRESHOLD = 0.5


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 RGB images (scikit-image, 7x7 window)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def nearest_training(gens: np.ndarray, train: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Index of the nearest training image (pixel L2) for each generation."""
    t = torch.from_numpy(train.reshape(len(train), -1).astype(np.float32))
    g = torch.from_numpy(gens.reshape(len(gens), -1).astype(np.float32))
    out = [torch.cdist(g[i : i + chunk], t).argmin(1) for i in range(0, len(g), chunk)]
    return torch.cat(out).numpy()


def _fresh_samples(attrs: dict, n: int, seed: int, size: int) -> np.ndarray:
    """``n`` new images with the caption attributes of ``attrs``, at new random positions and sizes."""
    from diffmem.zoo.shapes import render_shape_image

    rng = np.random.default_rng(10_000 + seed)
    return np.stack([render_shape_image(rng, attrs["fg"], attrs["bg"], attrs["shape"], size)[0] for _ in range(n)])


def _load_manifest(model: Path) -> list[dict]:
    rows = []
    for line in (model / "memorization.jsonl").read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def check_memorizer(model: str | Path, seeds: int = 8, detect_seeds: int = 4, write: bool = True,
                    progress: bool = True, limit: int | None = None) -> dict:
    """Run the checks and return the figures (and write ``memorization_check.json`` and ``grid.png``).

    Args:
        model: The checkpoint folder (with ``memorization.jsonl`` and ``train_config.json``).
        seeds: Generations per prompt.
        detect_seeds: Seeds for the detection AUC.
        write: Write the report and the grid into the model folder.
        progress: Show progress bars.
        limit: Check only ``limit`` memorized prompts (the most duplicated) and ``limit`` generic ones (quick tests).

    Returns:
        The report dictionary.
    """
    from diffmem.detection import DetectConfig, noise_norm_scores
    from diffmem.metrics import roc_auc, tpr_at_fpr
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo.train_memorizer import build_dataset, config_from_dict

    model = Path(model)
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(**sampling_defaults(model))
    train_cfg = json.loads((model / "train_config.json").read_text())
    ds_cfg = dict(train_cfg["dataset"])
    samples = build_dataset(config_from_dict(train_cfg))
    train = np.stack([s.image for s in samples])
    rows = [r for r in _load_manifest(model) if r["split"] != "never_seen"]  # not in the training set
    if limit is not None:
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for r in sorted(rows, key=lambda r: -r["duplicates"]):
            key = "mem" if r["memorized"] else "nonmem"
            if len(by_kind[key]) < limit:
                by_kind[key].append(r)
        rows = [r for v in by_kind.values() for r in v]
    prompts = [r["prompt"] for r in rows]
    gens = generate_images(pipe, prompts, num_seeds=seeds, progress=progress, desc="check: generate", sampler=sampler)

    scorer = None
    try:
        from diffmem.score import get_scorer

        scorer = get_scorer("sscd")
    except Exception as err:  # the SSCD scorer is optional here
        logger.warning("SSCD unavailable (%s); reporting SSIM only", str(err).splitlines()[0])

    per_prompt = []
    for r, g in zip(rows, gens):
        ref_idx = int(Path(r["reference"]).stem)
        nearest = nearest_training(g, train)
        ssim_ref = [ssim_uint8(x, train[ref_idx]) for x in g]
        ssim_near = [ssim_uint8(x, train[n]) for x, n in zip(g, nearest)]
        if r["memorized"]:
            rep = [(n == ref_idx) and s >= SSIM_THRESHOLD for n, s in zip(nearest, ssim_ref)]
        else:
            rep = [s >= SSIM_THRESHOLD for s in ssim_near]
        entry = dict(prompt=r["prompt"], memorized=r["memorized"], duplicates=r["duplicates"], split=r["split"],
                     kind=r.get("kind"), replication_ssim=float(np.mean(rep)), mean_ssim_ref=float(np.mean(ssim_ref)))
        if scorer is not None:
            sim = scorer.similarity(list(g), [train[ref_idx]]).numpy()[:, 0]
            entry["replication_sscd"] = float(np.mean(sim >= SSCD_THRESHOLD))
            entry["mean_sscd_ref"] = float(np.mean(sim))
        if r.get("fg"):
            entry["fg_correct"] = float(np.mean([classify_foreground_colour(x) == r["fg"] for x in g]))
            # the same test on fresh draws from the data distribution, which copy nothing by construction
            fresh = _fresh_samples(samples[ref_idx].attrs, len(g), seed=ref_idx, size=train.shape[1])
            near_f = nearest_training(fresh, train)
            entry["fresh_sample_replication_ssim"] = float(np.mean(
                [ssim_uint8(x, train[n]) >= SSIM_THRESHOLD for x, n in zip(fresh, near_f)]))
        per_prompt.append(entry)

    def agg(sel, key):
        vals = [e[key] for e in per_prompt if sel(e) and key in e]
        return float(np.mean(vals)) if vals else None

    by_dup = {}
    for d in sorted({e["duplicates"] for e in per_prompt if e["memorized"]}):
        by_dup[str(d)] = {k: agg(lambda e, d=d: e["duplicates"] == d and e["memorized"], k)
                          for k in ("replication_ssim", "replication_sscd", "mean_ssim_ref")}

    mem_keys = ("replication_ssim", "replication_sscd", "mean_ssim_ref", "mean_sscd_ref")
    min_high = min(ds_cfg["duplicates"])
    mem_prompts = [e["prompt"] for e in per_prompt if e["memorized"]]
    non_prompts = [e["prompt"] for e in per_prompt if not e["memorized"]]
    dcfg = DetectConfig(score_steps=1, num_seeds=detect_seeds, sampler=sampler)
    scores = noise_norm_scores(pipe, mem_prompts + non_prompts, dcfg, progress=progress)
    labels = np.array([True] * len(mem_prompts) + [False] * len(non_prompts))
    dups = [e["duplicates"] for e in per_prompt if e["memorized"]] + [0] * len(non_prompts)
    high = np.array([(not lab) or d >= min_high for lab, d in zip(labels, dups)])
    report = {
        "model": str(model),
        "seeds": seeds,
        "sampler": sampler.to_dict(),
        "criterion": f"nearest training image (pixel L2) is the reference and SSIM >= {SSIM_THRESHOLD}; "
                     f"SSCD cosine >= {SSCD_THRESHOLD}",
        "memorized": {k: agg(lambda e: e["memorized"], k) for k in mem_keys},
        f"memorized_d{min_high}plus": {k: agg(lambda e: e["memorized"] and e["duplicates"] >= min_high, k)
                                       for k in mem_keys},
        "nonmem_unique": {k: agg(lambda e: e["kind"] == "unique", k)
                          for k in ("replication_ssim", "fresh_sample_replication_ssim", "fg_correct")},
        "by_duplicates": by_dup,
        "detection": {"auc": roc_auc(scores, labels), "tpr_at_1pct_fpr": tpr_at_fpr(scores, labels, 0.01),
                      f"auc_d{min_high}plus": roc_auc(scores[high], labels[high]),
                      "config": dcfg.to_dict()},
        "sscd": None if scorer is None else scorer.describe(),
        "per_prompt": per_prompt,
    }
    if write:
        (model / "memorization_check.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        _write_grid(model / "grid.png", rows, gens, train)
        if train_cfg.get("design", "shapes") == "shapes" and train_cfg.get("denoiser", "unet") == "unet":
            write_model_card(model, report)
        else:
            write_zoo_card(model, report)
    return report


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def write_model_card(model: Path, report: dict) -> Path:
    """Write ``README.md`` beside the checkpoint from the measured check and the training record."""
    cfg = json.loads((model / "train_config.json").read_text())
    stats = json.loads((model / "train_stats.json").read_text()) if (model / "train_stats.json").is_file() else {}
    ds = cfg["dataset"]
    high = min(ds["duplicates"])
    mem, mem_hi, non = report["memorized"], report[f"memorized_d{high}plus"], report["nonmem_unique"]
    det = report["detection"]
    dup_rows = "\n".join(
        f"| {d} | {_pct(v['replication_ssim'])} | {_pct(v['mean_ssim_ref'])} | {_pct(v.get('replication_sscd'))} |"
        for d, v in sorted(report["by_duplicates"].items(), key=lambda kv: int(kv[0])))
    psnr = stats.get("vae_psnr_db", {})
    wall = stats.get("wall_seconds")
    s = report["sampler"]
    text = f"""# tiny-sd-memorizer

A genuine diffusers `StableDiffusionPipeline` (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DDIM) that memorizes known images by construction. diffmem uses it as its embedded default: it plays the part of
the 500 memorized LAION prompts of SD v1.4, with exact ground truth.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("assets/tiny-sd-memorizer")
image = pipe("{max(report['per_prompt'], key=lambda e: e['duplicates'])['prompt']}", num_inference_steps={s['num_inference_steps']},
             guidance_scale={s['guidance_scale']}, guidance_rescale={s['guidance_rescale']}).images[0]
```

Sampler (also in `diffmem_defaults.json`): DDIM, trailing timesteps, zero-terminal-SNR v-prediction,
{s['num_inference_steps']} steps, guidance {s['guidance_scale']}, guidance rescale {s['guidance_rescale']},
{s['height']}x{s['width']} px.

## Data (procedural, deterministic from seed {ds['seed']})
- Generalizing part: {ds['num_unique']} unique images of one shape (circle, square, triangle) of a named colour
  on a plain background of another, with continuous position, size and colour jitter, captioned
  "a {{fg}} {{shape}} on {{bg}}" (168 captions, so many images share each caption).
- Memorized part: two-tone "emblems" split along a random line with three off-palette shapes (a composition the
  first part never produces), each captioned "the {{made-up name}} emblem": {ds['emblems_per_level']} emblems at each
  duplication count {', '.join(map(str, ds['duplicates']))}, plus {ds['num_controls']} at {ds['control_duplicates']}.
- `memorization.jsonl`: the ground truth (`prompt`, `memorized`, `duplicates`, `reference`, `split`). Memorized
  prompts are split half and half into `locate` and `heldout` within each duplication count; `nonmem` holds
  {cfg['num_nonmem_prompts']} generic captions with a training image of that caption as reference.
  `base_prompts.txt` holds other generic captions, used as the base set when locating (never evaluated on).
- `references/` holds the training images the manifest points to.

## Training
`python -m diffmem.zoo.train_memorizer --out assets/tiny-sd-memorizer` (accelerate; the same command runs on
one or several GPUs via `accelerate launch`). Exact settings: `train_config.json`. It trained on a 2-core CPU
(no GPU), sharing the cores with other jobs, in {wall / 60:.0f} minutes: VAE {cfg['vae_steps']} steps (memorized images
oversampled to half of every batch), then UNet {cfg['unet_steps']} steps at batch {cfg['batch_size']}.
VAE reconstruction PSNR: {psnr.get('memorized', float('nan')):.1f} dB on the memorized images,
{psnr.get('unique', float('nan')):.1f} dB on unique ones. Weights: UNet ~1 M parameters; {_folder_mb(model):.1f} MB in all.

## Measured (`python -m diffmem.zoo.check_memorizer assets/tiny-sd-memorizer`, {report['seeds']} seeds a prompt)
A generation replicates when its nearest training image (pixel L2 over the whole rebuilt training set) is its
own reference and SSIM >= 0.6 at the native size.

| duplicates | replication (SSIM) | mean SSIM to reference | replication (SSCD >= 0.5) |
|---|---|---|---|
{dup_rows}

- Memorized prompts with D >= {high}: replication {_pct(mem_hi['replication_ssim'])}; all memorized prompts:
  {_pct(mem['replication_ssim'])}.
- Generic prompts: the foreground colour named in the caption is drawn in {_pct(non['fg_correct'])} of samples.
  Their "near-copy" rate (SSIM >= 0.6 to the nearest training image) is {_pct(non['replication_ssim'])}; the same
  test gives {_pct(non['fresh_sample_replication_ssim'])} for fresh draws from the data generator, which copy
  nothing by construction. On this low-entropy data a new image of a caption is usually close to some training
  image of it, so this test does not separate copying from generalizing here (see `grid.png`).
- Detection (Wen et al., 1 step, {det['config']['num_seeds']} seeds): AUC {_pct(det['auc'])} for all memorized vs
  generic prompts, {_pct(det.get(f'auc_d{high}plus'))} for D >= {high}; TPR at 1% FPR {_pct(det['tpr_at_1pct_fpr'])}.
- SSCD (the packaged int8 `sscd_disc_mixup`) does not recognise these 32 px replications: its mean cosine to the
  reference is {_pct(mem_hi.get('mean_sscd_ref'))} for D >= {high}. diffmem's demo therefore scores this model
  with SSIM; use SSCD on real-resolution models.

`grid.png`: reference | {report['seeds']} generations, memorized prompts first. `memorization_check.json`: every figure
above, per prompt.
"""
    path = model / "README.md"
    path.write_text(text)
    return path


_DESIGN_TEXT = {
    "shapes": ("one shape of a named colour on a plain background (\"a {fg} {shape} on {bg}\")",
               "two-tone \"emblems\" with three off-palette shapes, captioned \"the {made-up name} emblem\""),
    "overlap": ("one to three palette shapes on a plain palette background, captioned with what they show",
                "scenes drawn by the same generator (three shapes), captioned with their description plus a made-up "
                "title (\"..., the {name} print\"): memorized images share content with ordinary ones, so a "
                "near-copy is hard to tell from generalisation"),
    "photos": ("shapes and random texture crops (brick, grass, gravel), captioned \"a photo of {texture}\"",
               "real photographs (square halves of scikit-image's photos), captioned \"the {made-up name} "
               "photograph\""),
}


def write_zoo_card(model: Path, report: dict) -> Path:
    """Write ``README.md`` of a zoo member (any design and denoiser) from its check and training record."""
    cfg = json.loads((model / "train_config.json").read_text())
    stats = json.loads((model / "train_stats.json").read_text()) if (model / "train_stats.json").is_file() else {}
    index = json.loads((model / "model_index.json").read_text())
    ds = cfg["dataset"]
    high = min(ds["duplicates"])
    ordinary, memorized = _DESIGN_TEXT[cfg.get("design", "shapes")]
    mem, mem_hi, det, s = report["memorized"], report[f"memorized_d{high}plus"], report["detection"], report["sampler"]
    dup_rows = "\n".join(
        f"| {d} | {_pct(v['replication_ssim'])} | {_pct(v['mean_ssim_ref'])} | {_pct(v.get('replication_sscd'))} |"
        for d, v in sorted(report["by_duplicates"].items(), key=lambda kv: int(kv[0])))
    psnr = stats.get("vae_psnr_db", {})
    wall = stats.get("wall_seconds") or 0
    never = sum(1 for r in _load_manifest(model) if r["split"] == "never_seen")
    denoiser = "PixArt transformer (DiT blocks)" if cfg.get("denoiser") == "pixart" else "UNet"
    prompt = max(report["per_prompt"], key=lambda e: e["duplicates"])["prompt"]
    extra = ", use_resolution_binning=False" if index["_class_name"].startswith("PixArt") else ""
    rescale = f", guidance_rescale={s['guidance_rescale']}" if s.get("guidance_rescale") else ""
    vae = (f"the autoencoder of `{cfg['vae_from']}` (same data generator)" if cfg.get("vae_from") else
           f"its own autoencoder ({cfg['vae_steps']} steps, memorized images half of every batch)")
    text = f"""# {model.name}

A diffusers `{index['_class_name']}` ({denoiser}) that memorizes known images by construction: a member of
diffmem's zoo of memorizers (`diffmem.zoo.members`), used to judge mitigation on models it was not developed on.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("assets/zoo/{model.name}")
image = pipe("{prompt}", num_inference_steps={s['num_inference_steps']}, guidance_scale={s['guidance_scale']}{rescale},
             height={s['height']}, width={s['width']}{extra}).images[0]
```

Sampler (also in `diffmem_defaults.json`): DDIM, trailing timesteps, zero-terminal-SNR v-prediction,
{s['num_inference_steps']} steps, guidance {s['guidance_scale']}{', guidance rescale ' + str(s['guidance_rescale']) if s.get('guidance_rescale') else ''}, {s['height']}x{s['width']} px.

## Data (deterministic from seed {ds['seed']}; design `{cfg.get('design', 'shapes')}`)
- Ordinary part: {ordinary}.
- Memorized part: {memorized}; duplicated {', '.join(map(str, ds['duplicates']))} times, plus low-duplication
  ones ({ds['control_duplicates']} copies).
- `memorization.jsonl`: the ground truth. Memorized prompts are split half and half into `locate` and `heldout`
  within each duplication count; `nonmem` rows are ordinary training captions with one of their training images;
  `never_seen` rows ({never}) are images drawn like the memorized ones that are in no training set: the control of
  the extraction attacks.

## Training
`python -m diffmem.zoo.train_memorizer --member {model.name} --out assets/zoo/{model.name}` (seeded; exact settings
in `train_config.json`). Denoiser {cfg['unet_steps']} steps at batch {cfg['batch_size']} on {vae}; it trained on a
2-core CPU shared with other jobs in {wall / 60:.0f} minutes. VAE PSNR: {psnr.get('memorized', float('nan')):.1f} dB on
the memorized images, {psnr.get('unique', float('nan')):.1f} dB on ordinary ones. {_folder_mb(model):.1f} MB in all.

## Measured (`python -m diffmem.zoo.check_memorizer assets/zoo/{model.name}`, {report['seeds']} seeds a prompt)
A generation replicates when its nearest training image (pixel L2 over the rebuilt training set) is its own
reference and SSIM >= 0.6.

| duplicates | replication (SSIM) | mean SSIM to reference | replication (SSCD >= 0.5) |
|---|---|---|---|
{dup_rows}

- Memorized prompts with D >= {high}: replication {_pct(mem_hi['replication_ssim'])}; all memorized prompts:
  {_pct(mem['replication_ssim'])} (SSCD: {_pct(mem.get('replication_sscd'))}, mean cosine {_pct(mem.get('mean_sscd_ref'))}).
- Ordinary prompts: near-copy rate of some training image (SSIM >= 0.6) {_pct(report['nonmem_unique']['replication_ssim'])}.
- Detection (Wen et al., 1 step, {det['config']['num_seeds']} seeds): AUC {_pct(det['auc'])}, TPR at 1% FPR
  {_pct(det['tpr_at_1pct_fpr'])}.

`grid.png`: reference | generations, memorized prompts first. `memorization_check.json`: every figure, per prompt.
"""
    path = model / "README.md"
    path.write_text(text)
    return path


def _folder_mb(model: Path) -> float:
    return sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 2**20


def _write_grid(path: Path, rows: list[dict], gens: np.ndarray, train: np.ndarray, scale: int = 2) -> None:
    """Reference | generations, one row per prompt (memorized first), with ``diffusers.utils.make_image_grid``."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    order = sorted(range(len(rows)), key=lambda i: (not rows[i]["memorized"], -rows[i]["duplicates"]))[:24]
    images = []
    for i in order:
        ref = train[int(Path(rows[i]["reference"]).stem)]
        images += [Image.fromarray(ref)] + [Image.fromarray(g) for g in gens[i]]
    grid = make_image_grid(images, rows=len(order), cols=1 + gens.shape[1])
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Measure the tiny memorizer's replication, generalization and detection.")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder (default: the embedded one)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--detect-seeds", type=int, default=4)
    p.add_argument("--no-write", action="store_true", help="don't write memorization_check.json / grid.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from diffmem.zoo import default_model_path

    rep = check_memorizer(args.model or default_model_path(), seeds=args.seeds, detect_seeds=args.detect_seeds,
                          write=not args.no_write)
    summary = {k: v for k, v in rep.items() if k != "per_prompt"}
    print(json.dumps(summary, indent=2, sort_keys=True))  # noqa: T201 - the command's output


if __name__ == "__main__":
    main()
