"""Models that ship with diffmem: the tiny memorizing Stable Diffusion checkpoint and tiny test pipelines."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path", "sampling_defaults", "DEFAULT_MODEL_NAME"]

from diffmem.pipelines import sampling_defaults  # noqa: E402  (re-exported for the zoo scripts)

DEFAULT_MODEL_NAME = "tiny-sd-memorizer"


def default_model_path() -> Path:
    """Path of the embedded tiny memorizing checkpoint (``assets/tiny-sd-memorizer`` in the repository)."""
    here = Path(__file__).resolve().parents[2] / "assets" / DEFAULT_MODEL_NAME
    if here.exists():
        return here
    return Path.cwd() / "assets" / DEFAULT_MODEL_NAME


