"""Models that ship with diffmem: the tiny memorizing Stable Diffusion checkpoint and tiny test pipelines."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

__all__ = ["default_model_path", "sampling_defaults", "DEFAULT_MODEL_NAME"]

from diffmem.pipelines import sampling_defaults  # noqa: E402  (re-exported for the zoo scripts)

DEFAULT_MODEL_NAME = "tiny-sd-memorizer"


def default_model_path() -> Path:
    """Path of the embedded tiny memorizing checkpoint.

    ``assets/tiny-sd-memorizer`` in a source checkout; ``<prefix>/share/diffmem/tiny-sd-memorizer`` after
    installing the wheel (it ships as data files); else ``./assets/tiny-sd-memorizer``.
    """
    candidates = [
        Path(__file__).resolve().parents[2] / "assets" / DEFAULT_MODEL_NAME,
        Path(sys.prefix) / "share" / "diffmem" / DEFAULT_MODEL_NAME,
        Path(sysconfig.get_path("data")) / "share" / "diffmem" / DEFAULT_MODEL_NAME,
    ]
    for path in candidates:
        if (path / "model_index.json").is_file():
            return path
    return Path.cwd() / "assets" / DEFAULT_MODEL_NAME


