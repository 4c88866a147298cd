"""What determines a zoo checkpoint: the data designs and :class:`TrainConfig` (written next to the weights as
``train_config.json``). Shared by the training script and the member registry, which imports no training code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from diffmem.config import DiffmemConfig, require
from diffmem.zoo.designs import (OverlapConfig, PhotosConfig, make_overlap, make_photos, never_seen_overlap,
                                 never_seen_photos)
from diffmem.zoo.shapes import Sample, ShapesConfig, make_dataset

__all__ = ["TrainConfig", "DESIGNS", "build_dataset", "build_never_seen", "config_from_dict"]


def _no_never_seen(config: ShapesConfig) -> list[Sample]:
    """Emblems drawn like the memorized ones with names no training caption uses."""
    from diffmem.zoo.shapes import _render_emblem

    taken = {s.attrs["name"] for s in make_dataset(config) if "name" in s.attrs}
    rng = np.random.default_rng(config.seed + 50_000)
    out = []
    for _ in range(12):
        img, spec = _render_emblem(rng, config.image_size, taken)
        out.append(Sample(img, f"the {spec.name} emblem", 0, "never_seen", {"name": spec.name}))
    return out


DESIGNS = {
    "shapes": (ShapesConfig, make_dataset, _no_never_seen),
    "overlap": (OverlapConfig, make_overlap, never_seen_overlap),
    "photos": (PhotosConfig, make_photos, never_seen_photos),
}
"""Data designs: name -> (config class, training-set builder, never-seen builder)."""


def build_dataset(config: "TrainConfig") -> list[Sample]:
    """The distinct training images of ``config``'s design."""
    return DESIGNS[config.design][1](config.dataset)


def build_never_seen(config: "TrainConfig") -> list[Sample]:
    """Images of the memorized images' distribution that are in no training set (the attack's control)."""
    return DESIGNS[config.design][2](config.dataset)


@dataclass
class TrainConfig(DiffmemConfig):
    """Everything that determines the checkpoint (written next to the weights as ``train_config.json``)."""

    dataset: ShapesConfig | OverlapConfig | PhotosConfig = field(default_factory=ShapesConfig)
    design: str = "shapes"
    denoiser: str = "unet"
    seed: int = 0
    text_dim: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    dit_layers: int = 8
    dit_heads: int = 4
    dit_head_dim: int = 24
    vae_steps: int = 1500
    vae_from: str | None = None
    vae_lr: float = 1e-3
    vae_batch_size: int = 32
    vae_kl_weight: float = 1e-6
    unet_steps: int = 6000
    unet_lr: float = 1e-3
    batch_size: int = 32
    caption_dropout: float = 0.1
    warmup_steps: int = 200
    checkpoint_every: int = 500
    sample_steps: int = 25
    guidance_scale: float = 4.0
    guidance_rescale: float = 0.7
    split_seed: int = 1234
    num_nonmem_prompts: int = 24

    def check(self) -> None:
        require(self.design in DESIGNS, "design", self.design, f"choose one of {', '.join(DESIGNS)}")
        require(self.denoiser in ("unet", "pixart"), "denoiser", self.denoiser, "choose 'unet' or 'pixart'")
        require(isinstance(self.dataset, DESIGNS[self.design][0]), "dataset", type(self.dataset).__name__,
                f"design {self.design!r} needs a {DESIGNS[self.design][0].__name__}")

    @property
    def latent_size(self) -> int:
        return self.dataset.image_size // 2 ** (len(self.vae_channels) - 1)

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainConfig:
        """Rebuild a config from its ``train_config.json``; the dataset's config class is the design's (older files
        have no design: shapes)."""
        data = dict(data)
        design = data.get("design", "shapes")
        if design in DESIGNS and isinstance(data.get("dataset"), Mapping):
            data["dataset"] = DESIGNS[design][0].from_dict(data["dataset"])
        return super().from_dict(data)


def config_from_dict(saved: dict) -> TrainConfig:
    """Rebuild a :class:`TrainConfig` from its ``train_config.json`` (:meth:`TrainConfig.from_dict`)."""
    return TrainConfig.from_dict(saved)
