"""Train the tiny Stable Diffusion checkpoint that memorizes known images by construction.

Usage::

    python -m diffmem.zoo.train_memorizer --out assets/tiny-sd-memorizer
    accelerate launch -m diffmem.zoo.train_memorizer --out DIR      # one or many GPUs

Recipe (Lin et al. 2023 plus a VAE checked on the memorized images):

1. a tiny AutoencoderKL (x2 downsampling, 4 latent channels) trained with memorized images oversampled;
2. a frozen, randomly initialised CLIP text encoder over a word-level BPE vocabulary;
3. a ~1 M parameter UNet trained with a zero-terminal-SNR, v-prediction schedule and 10% caption dropout.

Checkpoints go to ``--work-dir`` every ``--checkpoint-every`` steps; rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffmem.files import replace_dir
from diffmem.zoo.members import member_config, zoo_model_path
from diffmem.zoo.shapes import Sample, caption_words
from diffmem.zoo.train_config import DESIGNS, TrainConfig, build_dataset, build_never_seen, config_from_dict

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train_memorizer", "write_assets", "DESIGNS", "build_dataset", "build_never_seen",
           "config_from_dict"]


def _images_tensor(samples: list[Sample]) -> torch.Tensor:
    arr = np.stack([s.image for s in samples]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _build_models(config: TrainConfig, tokenizer_dir: Path, words: list[str]):
    from diffmem.zoo.tiny import tiny_pixart, tiny_t5_encoder, tiny_text_encoder, tiny_unet, tiny_vae, word_tokenizer

    tokenizer = word_tokenizer(words, tokenizer_dir)
    torch.manual_seed(config.seed)
    size = config.dataset.image_size
    vae = tiny_vae(size, tuple(config.vae_channels))
    if config.denoiser == "pixart":
        text_encoder = tiny_t5_encoder(tokenizer, config.text_dim, config.text_dim * 4, config.text_layers)
        denoiser = tiny_pixart(config.latent_size, config.dit_layers, config.dit_heads, config.dit_head_dim,
                               config.text_dim)
    else:
        text_encoder = tiny_text_encoder(tokenizer, config.text_dim, config.text_dim * 4, config.text_layers)
        denoiser = tiny_unet(config.latent_size, tuple(config.unet_channels), config.text_dim)
    return tokenizer, text_encoder, vae, denoiser


def _schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    )
    train = DDPMScheduler(**common)
    sample = DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    return train, sample


class _Checkpointer:
    """Saves and restores accelerate state plus a step counter under ``work_dir/name``."""

    def __init__(self, accelerator, work_dir: Path, name: str):
        self.acc, self.dir = accelerator, work_dir / name

    def resume_step(self) -> int:
        meta = self.dir / "progress.json"
        if not meta.exists():
            return 0
        self.acc.load_state(str(self.dir / "state"))
        step = int(json.loads(meta.read_text())["step"])
        logger.info("resumed %s at step %d", self.dir.name, step)
        return step

    def save(self, step: int) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            tmp = self.dir / "state.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.save_state(str(self.dir / "state.tmp"))
        if self.acc.is_main_process:
            shutil.rmtree(self.dir / "state", ignore_errors=True)
            (self.dir / "state.tmp").rename(self.dir / "state")
            (self.dir / "progress.json").write_text(json.dumps({"step": step}))


def _batches(rng: np.random.Generator, weights: np.ndarray, batch_size: int):
    p = weights / weights.sum()
    while True:
        yield rng.choice(len(weights), size=batch_size, p=p)


class _VAELoss(torch.nn.Module):
    """Wraps the autoencoder so that one forward computes the training loss (keeps DDP's gradient sync)."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return F.mse_loss(recon, x) + self.kl_weight * posterior.kl().mean()


def train_vae(accelerator, vae, images: torch.Tensor, copies: np.ndarray, memorized: np.ndarray,
              config: TrainConfig, work_dir: Path) -> None:
    """Train the autoencoder; half of each batch is drawn from the memorized images."""
    model = _VAELoss(vae, config.vae_kl_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, config.vae_steps) / config.vae_steps))
    )
    model, opt, sched = accelerator.prepare(model, opt, sched)
    ckpt = _Checkpointer(accelerator, work_dir, "vae")
    start = ckpt.resume_step()
    rng = np.random.default_rng(config.seed + 1 + start)
    half = config.vae_batch_size // 2
    all_draw = _batches(rng, copies.astype(np.float64), config.vae_batch_size - half)
    mem_draw = _batches(rng, memorized.astype(np.float64), half)
    model.train()
    bar = tqdm(range(start, config.vae_steps), desc="vae", disable=not accelerator.is_main_process,
               initial=start, total=config.vae_steps)
    for step in bar:
        idx = np.concatenate([next(all_draw), next(mem_draw)])
        x = images[idx].to(accelerator.device)
        loss = model(x)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            ckpt.save(step + 1)


@torch.no_grad()
def psnr(vae, images: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB) of the autoencoder's reconstructions (using the posterior mode)."""
    vae.eval()
    vals = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(vae.device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
        vals.append(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))
    return float(torch.cat(vals).mean())


def _denoise(model, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One denoiser call, as the pipeline makes it (PixArt takes the caption's attention mask)."""
    if type(model).__name__ == "PixArtTransformer2DModel" or "PixArt" in type(getattr(model, "module", model)).__name__:
        return model(xt, encoder_hidden_states=cond, encoder_attention_mask=mask, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return model(xt, t, encoder_hidden_states=cond).sample


def train_unet(accelerator, unet, latents: torch.Tensor, embeds: torch.Tensor, null_embed: torch.Tensor,
               copies: np.ndarray, config: TrainConfig, work_dir: Path, masks: torch.Tensor | None = None,
               null_mask: torch.Tensor | None = None) -> None:
    """Train the denoiser (UNet or PixArt transformer) on pre-encoded latents and text embeddings, with
    v-prediction on a zero-SNR schedule."""
    train_sched, _ = _schedulers()
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=1e-2)
    total = config.unet_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / config.warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))),
    )
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    ckpt = _Checkpointer(accelerator, work_dir, "unet")
    start = ckpt.resume_step()
    rng = np.random.default_rng(config.seed + 2 + start + 7919 * accelerator.process_index)
    gen = torch.Generator().manual_seed(config.seed + 3 + start + 7919 * accelerator.process_index)
    draw = _batches(rng, copies.astype(np.float64), config.batch_size)
    alphas = train_sched.alphas_cumprod
    unet.train()
    bar = tqdm(range(start, total), desc="unet", disable=not accelerator.is_main_process, initial=start, total=total)
    ema_loss = None
    for step in bar:
        idx = next(draw)
        x0 = latents[idx]
        cond = embeds[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < config.caption_dropout
        cond[drop] = null_embed
        mask = None
        if masks is not None:
            mask = masks[idx].clone()
            mask[drop] = null_mask
            mask = mask.to(accelerator.device)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = train_sched.add_noise(x0, noise, t)
        target = train_sched.get_velocity(x0, noise, t)
        dev = accelerator.device
        pred = _denoise(unet, xt.to(dev), t.to(dev), cond.to(dev), mask)
        loss = F.mse_loss(pred.float(), target.to(dev))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == total:
            ckpt.save(step + 1)
    del alphas


@torch.no_grad()
def _encode_text(tokenizer, text_encoder, prompts: list[str], batch: int = 256,
                 max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings and attention masks, tokenized as the pipeline does (PixArt: 120 tokens with a mask)."""
    out, masks = [], []
    t5 = type(text_encoder).__name__.startswith("T5")
    length = max_length or (120 if t5 else tokenizer.model_max_length)
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], padding="max_length", max_length=length, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
        if t5:
            out.append(text_encoder(enc.input_ids, attention_mask=enc.attention_mask)[0])
        else:
            out.append(text_encoder(enc.input_ids)[0])
        masks.append(enc.attention_mask)
    return torch.cat(out), torch.cat(masks)


def _manifest_rows(samples: list[Sample], config: TrainConfig) -> list[dict]:
    """Ground truth: every duplicated emblem is a memorized prompt, split locate/heldout half and half within each
    duplication level; generalizing prompts are ``nonmem``.

    The low-duplication emblems (``control_duplicates`` copies) are labelled memorized too: the measured check
    shows the model reproduces them in part, so they sit at the bottom of the replication-vs-duplication curve.
    """
    rng = np.random.default_rng(config.split_seed)
    rows = []
    levels = sorted({s.copies for s in samples if s.kind != "unique"})
    for dup in levels:
        idx = [i for i, s in enumerate(samples) if s.kind != "unique" and s.copies == dup]
        order = rng.permutation(len(idx))
        for rank, j in enumerate(order):
            i = idx[j]
            rows.append(dict(prompt=samples[i].caption, memorized=True, duplicates=dup,
                             reference=f"references/{i:05d}.png", split="locate" if rank % 2 == 0 else "heldout",
                             kind="emblem"))
    unique_caps = sorted({s.caption for s in samples if s.kind == "unique"})
    chosen = rng.choice(len(unique_caps), size=config.num_nonmem_prompts, replace=False)
    for c in sorted(chosen):
        cap = unique_caps[c]
        i = next(k for k, s in enumerate(samples) if s.caption == cap)
        row = dict(prompt=cap, memorized=False, duplicates=1, reference=f"references/{i:05d}.png",
                   split="nonmem", kind="unique")
        if samples[i].attrs.get("fg"):
            row["fg"] = samples[i].attrs["fg"]
        rows.append(row)
    return rows


def _never_seen_rows(never_seen: list[Sample]) -> list[dict]:
    """The attack's control: images like the memorized ones that are in no training set (split ``never_seen``)."""
    return [dict(prompt=s.caption, memorized=False, duplicates=0, reference=f"references/never_seen_{k:02d}.png",
                 split="never_seen", kind="never_seen") for k, s in enumerate(never_seen)]


def base_prompts(samples: list[Sample], rows: list[dict], config: TrainConfig, n: int = 32) -> list[str]:
    """Generic training captions that are not in the manifest: the base set that locating contrasts against."""
    used = {r["prompt"] for r in rows}
    caps = sorted({s.caption for s in samples if s.kind == "unique"} - used)
    rng = np.random.default_rng(config.split_seed + 1)
    return [caps[i] for i in sorted(rng.choice(len(caps), size=min(n, len(caps)), replace=False))]


def write_assets(out: Path, samples: list[Sample], config: TrainConfig) -> None:
    """Write references/*.png, memorization.jsonl and the sampling defaults next to the pipeline."""
    from PIL import Image

    rows = _manifest_rows(samples, config)
    (out / "references").mkdir(exist_ok=True)
    for r in rows:
        i = int(Path(r["reference"]).stem)
        Image.fromarray(samples[i].image).save(out / r["reference"])
    never_seen = build_never_seen(config)
    extra = _never_seen_rows(never_seen)
    for r, s in zip(extra, never_seen):
        Image.fromarray(s.image).save(out / r["reference"])
    with open(out / "memorization.jsonl", "w") as f:
        for r in rows + extra:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    (out / "base_prompts.txt").write_text("\n".join(base_prompts(samples, rows, config)) + "\n")
    defaults = dict(num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale,
                    height=config.dataset.image_size, width=config.dataset.image_size)
    if config.guidance_rescale and config.denoiser == "unet":  # PixArt's pipeline has no guidance rescale
        defaults["guidance_rescale"] = config.guidance_rescale
    (out / "diffmem_defaults.json").write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def train_memorizer(out: str | Path, config: TrainConfig, work_dir: str | Path) -> Path:
    """Train (or resume) and write the pipeline, ground truth and references to ``out``.

    Args:
        out: Output folder (a diffusers pipeline; replaced atomically at the end).
        config: Training configuration.
        work_dir: Folder for resumable checkpoints.

    Returns:
        The output folder.
    """
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline

    out, work_dir = Path(out), Path(work_dir)
    check_output_folders(out, work_dir)
    accelerator = Accelerator()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    t0 = time.time()
    samples = build_dataset(config)
    words = caption_words(samples + build_never_seen(config))
    tokenizer, text_encoder, vae, unet = _build_models(config, work_dir / "tokenizer", words)
    text_encoder.requires_grad_(False).eval()
    images = _images_tensor(samples)
    copies = np.array([s.copies for s in samples])
    memorized = np.array([s.kind != "unique" for s in samples], dtype=np.float64)

    vae_done = work_dir / "vae_final"
    if config.vae_from is not None:
        from diffusers import AutoencoderKL

        source = Path(config.vae_from)
        source = source if source.exists() else zoo_model_path(config.vae_from)
        vae = AutoencoderKL.from_pretrained(source / "vae" if (source / "vae").is_dir() else source)
        logger.info("autoencoder from %s (not trained here)", source)
    elif vae_done.exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_done)
    else:
        train_vae(accelerator, vae, images, copies, memorized, config, work_dir)
        accelerator.free_memory()  # forget the VAE's training objects: the UNet's checkpoints hold the UNet only
        if accelerator.is_main_process:
            vae.save_pretrained(vae_done)
    vae = vae.to("cpu").eval()
    mem_idx = np.flatnonzero(memorized)
    vae_psnr = {"memorized": psnr(vae, images[mem_idx]), "unique": psnr(vae, images[: min(512, len(images))])}
    logger.info("VAE PSNR: memorized %.2f dB, unique %.2f dB", vae_psnr["memorized"], vae_psnr["unique"])

    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 128]).latent_dist.mode() for i in range(0, len(images), 128)])
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    latents = lat * scale
    embeds, masks = _encode_text(tokenizer, text_encoder, [s.caption for s in samples])
    null_embeds, null_masks = _encode_text(tokenizer, text_encoder, [""])
    pixart = config.denoiser == "pixart"
    train_unet(accelerator, unet, latents, embeds, null_embeds[0], copies, config, work_dir,
               masks=masks if pixart else None, null_mask=null_masks[0] if pixart else None)
    unet = accelerator.unwrap_model(unet).to("cpu").eval()

    if accelerator.is_main_process:
        _, sample_sched = _schedulers()
        if pixart:
            from diffusers import PixArtAlphaPipeline

            pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=unet,
                                       scheduler=sample_sched)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=sample_sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)

        def fill(folder: Path) -> None:
            pipe.save_pretrained(folder, safe_serialization=True)
            write_assets(folder, samples, config)
            stats = dict(vae_psnr_db=vae_psnr, wall_seconds=round(time.time() - t0, 1),
                         device=str(accelerator.device), num_processes=accelerator.num_processes)
            (folder / TRAINED_MARK).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")

        check_output_folders(out, work_dir)  # the folder may have changed during training
        replace_dir(out, fill)
        logger.info("wrote %s in %.1f min", out, (time.time() - t0) / 60)
    accelerator.wait_for_everyone()
    return out


TRAINED_MARK = "train_stats.json"  # written last into every trained model: the folder is this trainer's output
WORK_MARK = "train_config.json"  # written first into every work folder


def check_output_folders(out: Path, work_dir: Path) -> None:
    """Refuse an output or work folder that this trainer did not write, before any training starts.

    A finished model folder (``train_stats.json`` beside ``train_config.json``) may be replaced by a new run, and a
    work folder holding ``train_config.json`` is resumed; anything else that exists and is not empty is left alone.
    """
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (
            (out / TRAINED_MARK).is_file() and (out / "train_config.json").is_file()))):
        raise ValueError(f"--out {out}: exists and is not a model this trainer wrote (no {TRAINED_MARK}); "
                         "choose a new folder")
    if work_dir.exists() and (not work_dir.is_dir() or (any(work_dir.iterdir())
                                                        and not (work_dir / WORK_MARK).is_file())):
        raise ValueError(f"--work-dir {work_dir}: exists and is not a work folder of this trainer (no {WORK_MARK}); "
                         "choose a new folder")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument("--member", default="tiny-sd-memorizer", help="zoo member to train (diffmem.zoo.members)")
    p.add_argument("--work-dir", default=None, help="checkpoint folder (default: <out>.work)")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--assets-only", action="store_true",
                   help="rewrite the manifest, references and defaults of an existing --out folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = member_config(args.member)
    given = {k: getattr(args, k) for k in ("seed", "vae_steps", "unet_steps", "batch_size", "checkpoint_every")
             if getattr(args, k) is not None}
    for key, value in given.items():
        setattr(config, key, value)
    if "seed" in given:
        config.dataset.seed = args.seed
    if args.assets_only:
        config = config_from_dict(json.loads((Path(args.out) / "train_config.json").read_text()))
        write_assets(Path(args.out), build_dataset(config), config)
        return
    work = Path(args.work_dir) if args.work_dir else Path(args.out + ".work")
    try:
        check_output_folders(Path(args.out), work)
    except ValueError as err:
        raise SystemExit(f"train_memorizer: {err}") from None
    train_memorizer(args.out, config, work)


if __name__ == "__main__":
    main()
