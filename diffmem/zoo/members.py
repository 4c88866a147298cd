"""The zoo: memorizers of different designs, each one seeded training configuration.

| member | denoiser | data design | size | sampler |
|---|---|---|---|---|
| ``tiny-sd-memorizer`` | UNet | shapes + distinct two-tone emblems | 32 px | 25 steps, guidance 4, rescale 0.7 |
| ``tiny-sd-overlap`` | UNet | memorized scenes that share content with ordinary ones | 32 px | 25 steps, guidance 5 |
| ``tiny-sd-photos`` | UNet | real photographs (skimage) memorized among shapes and textures | 64 px | 25 steps, guidance 4 |
| ``tiny-pixart-memorizer`` | PixArt DiT | shapes + emblems (another seed) | 32 px | 25 steps, guidance 4 |

The PixArt member reuses the embedded model's autoencoder (its data come from the same generator, with another
seed), so it trains its denoiser only. All use v-prediction on a zero-terminal-SNR schedule with trailing DDIM (Lin et al. 2023). Train one with
``python -m diffmem.zoo.train_memorizer --member NAME --out assets/zoo/NAME``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError
from diffmem.zoo.designs import OverlapConfig, PhotosConfig
from diffmem.zoo.shapes import ShapesConfig
from diffmem.zoo.train_config import TrainConfig

__all__ = ["MEMBERS", "member_config", "zoo_model_path", "zoo_models"]

MEMBERS: dict[str, Callable[[], TrainConfig]] = {
    "tiny-sd-memorizer": lambda: TrainConfig(),
    "tiny-sd-overlap": lambda: TrainConfig(
        design="overlap", dataset=OverlapConfig(seed=1), seed=1, text_dim=48, vae_steps=1000, unet_steps=2400,
        guidance_scale=5.0, guidance_rescale=0.0),
    "tiny-sd-photos": lambda: TrainConfig(
        design="photos", dataset=PhotosConfig(seed=3), seed=3, vae_channels=(32, 64, 64), vae_steps=800,
        vae_batch_size=16, unet_steps=1600, guidance_scale=4.0, guidance_rescale=0.7),
    "tiny-pixart-memorizer": lambda: TrainConfig(
        design="shapes", dataset=ShapesConfig(seed=2, duplicates=(32, 64, 128), emblems_per_level=6,
                                              num_controls=6),
        denoiser="pixart", seed=2, vae_from="tiny-sd-memorizer", unet_steps=4000, guidance_scale=4.0,
        guidance_rescale=0.0),
}
"""Zoo members by name: each a function returning its training configuration."""


def member_config(name: str) -> TrainConfig:
    """The training configuration of zoo member ``name``."""
    if name not in MEMBERS:
        raise ConfigError(f"zoo member {name!r} is unknown: expected one of {', '.join(MEMBERS)}")
    return MEMBERS[name]()


def zoo_model_path(name: str) -> Path:
    """Where member ``name`` ships: ``assets/tiny-sd-memorizer`` for the embedded one, else ``assets/zoo/NAME``."""
    from diffmem.zoo import default_model_path

    if name == "tiny-sd-memorizer":
        return default_model_path()
    return Path(__file__).resolve().parents[2] / "assets" / "zoo" / name


def load_zoo_model(name: str) -> tuple[Path, Any, Any, list]:
    """A zoo member (by name) or a model folder, loaded for measuring: ``(path, pipeline, sampler, manifest rows)``.

    The pipeline's progress bars are off and its own sampler settings (``diffmem_defaults.json``) are applied.
    A folder without ``model_index.json`` is a ``FileNotFoundError`` naming it.
    """
    from diffmem.config import SamplerConfig
    from diffmem.data import read_manifest
    from diffmem.pipelines import load_pipeline

    path = zoo_model_path(name) if name in MEMBERS else Path(name)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{name}: no diffusers model at {path} (model_index.json missing)")
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig.resolve(pipe)
    sampler.apply_scheduler(pipe)
    return path, pipe, sampler, read_manifest(path / "memorization.jsonl")


def zoo_models() -> dict[str, Path]:
    """Every member that is present on disk, by name."""
    return {n: zoo_model_path(n) for n in MEMBERS if (zoo_model_path(n) / "model_index.json").is_file()}
