"""Models that ship with diffmem: the tiny memorizing Stable Diffusion checkpoint and tiny test pipelines."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["default_model_path", "sampling_defaults", "DEFAULT_MODEL_NAME"]

DEFAULT_MODEL_NAME = "tiny-sd-memorizer"


def default_model_path() -> Path:
    """Path of the embedded tiny memorizing checkpoint (``assets/tiny-sd-memorizer`` in the repository)."""
    here = Path(__file__).resolve().parents[2] / "assets" / DEFAULT_MODEL_NAME
    if here.exists():
        return here
    return Path.cwd() / "assets" / DEFAULT_MODEL_NAME


def sampling_defaults(model: str | Path) -> dict:
    """Sampler settings a checkpoint declares in ``diffmem_defaults.json`` (empty when absent).

    Keys may include ``num_inference_steps``, ``guidance_scale``, ``guidance_rescale``, ``height``, ``width``.
    """
    path = Path(model) / "diffmem_defaults.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {}
