"""User-facing errors. Each message is one line that names the culprit.

The command line reports a :class:`DiffmemError` as one line with exit status 2; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "DiffmemError",
    "ConfigError",
    "TargetNotFoundError",
    "EditMismatchError",
    "MaskMismatchError",
    "PromptFileError",
    "ModelLoadError",
    "ExportError",
    "PushError",
]


class DiffmemError(Exception):
    """Base class of the errors a user can fix; ``str(err)`` is one line naming the culprit."""


class ConfigError(DiffmemError, ValueError):
    """A value given by the user is invalid: a config field, a function argument or a command-line value.

    It is also a ``ValueError``, so code that catches (or tests that expect) ``ValueError`` keeps working.
    """


class TargetNotFoundError(DiffmemError):
    """No module of the denoiser matched the target pattern."""


class EditMismatchError(DiffmemError):
    """An edit (mask, direction basis, weight delta) or a set of statistics does not fit the model's layers."""


MaskMismatchError = EditMismatchError  # the name before edits other than masks existed


class PromptFileError(DiffmemError):
    """A prompt file is missing or malformed."""


class ModelLoadError(DiffmemError):
    """A model path or hub id could not be loaded."""


class ExportError(DiffmemError):
    """An export could not be written."""


class PushError(DiffmemError):
    """An export could not be uploaded to the Hugging Face Hub (network, login or permissions)."""
