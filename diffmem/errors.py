"""User-facing errors. Each message is one line that names the culprit."""

from __future__ import annotations

__all__ = [
    "DiffmemError",
    "TargetNotFoundError",
    "MaskMismatchError",
    "PromptFileError",
    "ModelLoadError",
    "ExportError",
]


class DiffmemError(Exception):
    """Base class of the errors a user can fix; ``str(err)`` is one line naming the culprit."""


class TargetNotFoundError(DiffmemError):
    """No module of the denoiser matched the target pattern."""


class MaskMismatchError(DiffmemError):
    """A mask (or direction basis) does not fit the model's target layers."""


class PromptFileError(DiffmemError):
    """A prompt file is missing or malformed."""


class ModelLoadError(DiffmemError):
    """A model path or hub id could not be loaded."""


class ExportError(DiffmemError):
    """An export could not be written."""
