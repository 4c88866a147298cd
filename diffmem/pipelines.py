"""Load diffusers pipelines safely: safetensors only unless pickles are explicitly allowed."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .targets import get_denoiser

logger = logging.getLogger(__name__)

__all__ = [
    "load_pipeline",
    "check_model",
    "get_denoiser",
    "looks_like_path",
    "sampling_defaults",
    "DEFAULTS_FILE",
]

DEFAULTS_FILE = "diffmem_defaults.json"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def looks_like_path(model: str) -> bool:
    """Whether a model string names a local path rather than a hub id.

    A hub id is ``name`` or ``org/name``; anything starting with ``.``, ``/`` or ``~``, holding a backslash,
    a drive letter or more than one ``/``, or otherwise not shaped like a hub id is a path.

    Args:
        model: The user's model argument.

    Returns:
        ``True`` for a path.
    """
    if model.startswith((".", "/", "~")) or "\\" in model or re.match(r"^[A-Za-z]:", model):
        return True
    return _HUB_ID.fullmatch(model) is None


def _pickle_only_components(folder: Path) -> list[str]:
    """Components of a pipeline folder whose weights exist only as pickles."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    found = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            continue
        files = [p.name for p in sub.iterdir() if p.is_file()]
        has_safe = any(f.endswith(".safetensors") for f in files)
        has_pickle = any(f.endswith(_PICKLE_SUFFIXES) for f in files)
        if has_pickle and not has_safe:
            found.append(name)
    return found


def _dtype_kwargs(torch_dtype: torch.dtype | None) -> dict[str, Any]:
    if torch_dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (diffusers that takes `dtype`)
    except ImportError:
        return {"torch_dtype": torch_dtype}
    return {"dtype": torch_dtype}


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = (str(err).strip() or type(err).__name__).splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def check_model(model: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[Path, bool]:
    """Cheap checks of a model argument before anything is loaded: a local folder must be a pipeline folder.

    Returns:
        ``(path, is_local)``.

    Raises:
        ModelLoadError: A missing path, a file, a folder without ``model_index.json``, or pickle-only weights
            without ``allow_pickle``; one line.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    is_local = path.exists()
    parent_is_local = "/" in text and Path(text.split("/")[0]).expanduser().is_dir()
    if not is_local and (looks_like_path(text) or parent_is_local):
        raise ModelLoadError(f"model path not found: {text}")
    if is_local:
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a folder: {text} (expected a diffusers pipeline folder)")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"not a diffusers pipeline folder (no model_index.json): {text}")
        try:
            pickled = _pickle_only_components(path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read {path / 'model_index.json'}: {_first_line(err)}") from None
        if pickled and not allow_pickle:
            raise ModelLoadError(
                f"{text} has only pickle (.bin) weights for {', '.join(pickled)}; "
                "pass --allow-pickle (allow_pickle=True) to load them, only if you trust the source"
            )
    return path, is_local


def load_pipeline(
    model: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """Load a diffusers pipeline from a local folder or a hub id.

    Without ``allow_pickle`` only safetensors weights are read (``use_safetensors=True``); a local folder whose
    weights exist only as pickles (``.bin``) is refused before anything is loaded. A path that does not exist
    fails at once, without touching the network.

    Args:
        model: A diffusers pipeline folder (with ``model_index.json``) or a hub id such as ``org/name``.
        allow_pickle: Also accept pickled (``.bin``) weights. Pickles can run code when loaded.
        torch_dtype: Weight dtype (default: as stored).
        device: Device to move the pipeline to (default: leave on the CPU).

    Returns:
        The loaded ``DiffusionPipeline``.

    Raises:
        ModelLoadError: The path is missing or not a pipeline folder, the weights are pickles only, or loading
            failed; the message is one line.
    """
    from diffusers import DiffusionPipeline

    text = os.fspath(model)
    path, is_local = check_model(text, allow_pickle=allow_pickle)
    kwargs: dict[str, Any] = {"use_safetensors": True if not allow_pickle else None, **_dtype_kwargs(torch_dtype)}
    source = str(path) if is_local else text
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as err:  # diffusers and huggingface_hub raise many error types
        message = _first_line(err)
        hint = "; pass --allow-pickle if the weights are .bin only" if "safetensors" in message.lower() else ""
        raise ModelLoadError(f"cannot load {text!r}: {message}{hint}") from None
    if device is not None:
        pipe = pipe.to(device)
    logger.info("loaded %s (%s, denoiser %s)", text, type(pipe).__name__, type(get_denoiser(pipe)).__name__)
    return pipe


_DEFAULT_KEYS = ("num_inference_steps", "guidance_scale", "guidance_rescale", "height", "width")


def sampling_defaults(model: str | os.PathLike) -> dict[str, Any]:
    """Sampler settings a model folder declares in ``diffmem_defaults.json`` (empty for a hub id or without it).

    Keys may include ``num_inference_steps``, ``guidance_scale``, ``guidance_rescale``, ``height``, ``width``.

    Raises:
        ModelLoadError: The file exists but is not a JSON object of those keys.
    """
    path = Path(os.fspath(model)).expanduser() / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {_first_line(err)}") from None
    if not isinstance(data, dict) or any(k not in _DEFAULT_KEYS for k in data):
        raise ModelLoadError(f"{path} must be a JSON object with keys among {', '.join(_DEFAULT_KEYS)}")
    return data


def warn_long_prompts(pipe: Any, prompts: list[str]) -> int:
    """Say once, in one line, how many prompts the text encoder truncates (diffusers' own warning is muted).

    Returns:
        The number of prompts longer than the tokenizer's ``model_max_length``.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not limit or limit > 100_000:
        return 0
    long = [p for p in prompts if len(tokenizer(p, truncation=False).input_ids) > limit]
    if long:
        example = long[0] if len(long[0]) <= 60 else long[0][:57] + "..."
        logger.warning("%d of %d prompts are longer than the text encoder's %d tokens and are truncated (e.g. %r)",
                       len(long), len(prompts), limit, example)
    return len(long)


def quiet_diffusers() -> None:
    """Mute diffusers' and transformers' per-call warnings (e.g. the multi-line truncation notice); diffmem reports them itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
