"""Apply, bake and export a mask: zero the located feed-forward weights of a denoiser.

Shapes never change, so an exported model loads with a plain ``from_pretrained``. :func:`apply_mask` is the
reversible form (a context manager that restores the original weights bit for bit), :func:`bake` writes the
zeros for good, and :func:`export_pruned` saves a pruned copy next to a ``diffmem_manifest.json`` while leaving
the in-memory model as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ExportError, MaskMismatchError
from .locate import Mask, mask_paths
from .targets import get_denoiser

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "validate_mask", "apply_mask", "bake", "export_pruned", "build_manifest"]

MANIFEST_NAME = "diffmem_manifest.json"
_MANIFEST_FORMAT = "diffmem.export"


def validate_mask(pipe_or_denoiser: Any, mask: Mask) -> dict[str, Tensor]:
    """Check that every mask layer exists in the denoiser with the same weight shape; touch nothing.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser.
        mask: The mask to check.

    Returns:
        Layer name -> the model's weight parameter, in mask order.

    Raises:
        MaskMismatchError: Naming the first mask layer that is missing from the model or differs in shape.
    """
    denoiser = get_denoiser(pipe_or_denoiser)
    modules = dict(denoiser.named_modules())
    weights: dict[str, Tensor] = {}
    for name, m in mask.layers.items():
        module = modules.get(name)
        if module is None:
            raise MaskMismatchError(f"mask layer {name!r} is not in the model ({type(denoiser).__name__})")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise MaskMismatchError(f"mask layer {name!r} has no 2-D weight in the model")
        model_shape = (int(weight.shape[0]), int(weight.shape[1]))
        mask_shape = (int(m.shape[0]), int(m.shape[1]))
        if model_shape != mask_shape:
            raise MaskMismatchError(f"mask layer {name!r} has shape {mask_shape} but the model's is {model_shape}")
        weights[name] = weight
    return weights


def _zero_(weights: dict[str, Tensor], mask: Mask) -> None:
    with torch.no_grad():
        for name, weight in weights.items():
            weight.masked_fill_(mask.layers[name].to(weight.device), 0)


@contextmanager
def apply_mask(pipe_or_denoiser: Any, mask: Mask) -> Iterator[Any]:
    """Zero the masked weights inside a ``with`` block and restore them bit for bit on exit.

    The mask is validated before anything changes. Only the masked entries are saved on entry (memory grows
    with the mask, not with the layers), and on exit, also after an exception, they are written back.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser.
        mask: The weights to zero.

    Returns:
        A context manager yielding ``pipe_or_denoiser``.

    Raises:
        MaskMismatchError: The mask does not fit the model (nothing is changed).
    """
    weights = validate_mask(pipe_or_denoiser, mask)
    index = {name: mask.layers[name].to(w.device) for name, w in weights.items()}
    originals = {name: w.detach()[index[name]].clone() for name, w in weights.items()}
    try:
        _zero_(weights, mask)
        logger.debug("applied mask: %d weights zeroed in %d layers", mask.num_masked(), len(weights))
        yield pipe_or_denoiser
    finally:
        with torch.no_grad():
            for name, weight in weights.items():
                weight[index[name]] = originals[name]
        logger.debug("restored %d masked layers", len(weights))


def bake(pipe_or_denoiser: Any, mask: Mask) -> int:
    """Zero the masked weights permanently.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser.
        mask: The weights to zero.

    Returns:
        The number of masked weights (now zero).

    Raises:
        MaskMismatchError: The mask does not fit the model (nothing is changed).
    """
    weights = validate_mask(pipe_or_denoiser, mask)
    _zero_(weights, mask)
    n = mask.num_masked()
    logger.info("baked mask: %d weights zeroed in %d layers", n, len(weights))
    return n


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _source_of(obj: Any) -> str | None:
    for holder in (obj, get_denoiser(obj)):
        config = getattr(holder, "config", None)
        name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
        if name:
            return str(name)
    return None


def build_manifest(
    mask: Mask,
    *,
    source: str | None = None,
    mask_path: str | os.PathLike | None = None,
    config: dict | None = None,
    component: str | None = None,
) -> dict[str, Any]:
    """The provenance record written as ``diffmem_manifest.json`` beside an export.

    Args:
        mask: The mask baked into the export.
        source: The source model (path or hub id).
        mask_path: The mask file; its sha256 is recorded. Without it, the sha256 of the mask's canonical
            safetensors bytes (:meth:`Mask.to_bytes`) is recorded, which equals the file's when saved by diffmem.
        config: Settings to record; defaults to the locate config stored in the mask's meta.
        component: ``"pipeline"`` or the class name of an exported bare denoiser.

    Returns:
        A JSON-serialisable dictionary.

    Raises:
        ExportError: ``mask_path`` does not name an existing mask file.
    """
    from . import __version__

    if mask_path is not None:
        st_path = Path(mask_path)
        if st_path.suffix != ".safetensors":
            st_path = mask_paths(mask_path)[0]
        if not st_path.is_file():
            raise ExportError(f"mask file {st_path} does not exist")
        mask_sha = _sha256_file(st_path)
        mask_file: str | None = str(st_path)
    else:
        mask_sha = mask.sha256()
        mask_file = None
    return {
        "format": _MANIFEST_FORMAT,
        "source": source,
        "component": component,
        "mask_sha256": mask_sha,
        "mask_path": mask_file,
        "level": mask.level,
        "counts": mask.counts(),
        "num_zeroed": mask.num_masked(),
        "num_ffn_weights": mask.num_total(),
        "fraction_zeroed": mask.fraction(),
        "diffmem_version": __version__,
        "config": config if config is not None else mask.meta.get("config"),
        "mask_meta": mask.meta,
    }


def export_component(pipe: Any) -> str:
    """``"pipeline"`` for a diffusers pipeline, the class name for a bare diffusers model; else ExportError."""
    from diffusers import DiffusionPipeline, ModelMixin

    if isinstance(pipe, DiffusionPipeline):
        return "pipeline"
    if isinstance(pipe, ModelMixin):
        return type(pipe).__name__
    raise ExportError(f"cannot export a {type(pipe).__name__}: expected a DiffusionPipeline or a diffusers model")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite``, and anything there that is not a folder."""
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ExportError(f"output folder {out_dir} already exists; pass overwrite=True to replace it")
        if not out_dir.is_dir():
            raise ExportError(f"output path {out_dir} exists and is not a folder")


def replace_dir(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Fill a fresh temporary folder beside ``out_dir``, then swap it into place.

    An existing ``out_dir`` is parked beside it and removed only once the new folder is in place; on any failure
    the temporary folder is removed and ``out_dir`` is restored as it was.
    """
    tag = uuid.uuid4().hex[:12]
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    old_dir = out_dir.parent / f".{out_dir.name}.old-{tag}"
    parked = installed = False
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp_dir)
        fill(tmp_dir)
        if out_dir.exists() or out_dir.is_symlink():
            os.replace(out_dir, old_dir)
            parked = True
        os.replace(tmp_dir, out_dir)
        installed = True
    except OSError as err:
        raise ExportError(f"could not write the export to {out_dir}: {err}") from err
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if parked and installed:
            _remove(old_dir)
        elif parked:
            try:
                os.replace(old_dir, out_dir)
            except OSError:
                logger.error("the previous content of %s could not be restored; it is in %s", out_dir, old_dir)


def write_edited(pipe: Any, out_dir: Path, edit: Callable[[], Any], manifest: dict) -> None:
    """Atomically save ``pipe`` with ``edit()`` (a reversible context manager) applied, plus the manifest."""
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"

    def fill(folder: Path) -> None:
        with edit():
            pipe.save_pretrained(str(folder), safe_serialization=True)
        (folder / MANIFEST_NAME).write_text(text, encoding="utf-8")

    replace_dir(out_dir, fill)


def export_pruned(
    pipe: Any,
    mask: Mask,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    source: str | None = None,
    mask_path: str | os.PathLike | None = None,
    config: dict | None = None,
) -> Path:
    """Save a pruned copy of a pipeline (or of a bare denoiser) with a ``diffmem_manifest.json``.

    The mask is applied with :func:`apply_mask` around ``save_pretrained`` so that the in-memory model is left
    unchanged. Files go to a temporary folder beside ``out_dir`` that is renamed into place only once complete;
    with ``overwrite`` an existing ``out_dir`` is removed only after the new export is in place. On failure the
    temporary folder is removed and ``out_dir`` is left as it was.

    Args:
        pipe: A ``DiffusionPipeline``, or a diffusers ``ModelMixin`` denoiser (e.g. a transformer), which is
            saved alone.
        mask: The weights to zero, relative to the denoiser.
        out_dir: Output folder; must not exist unless ``overwrite``.
        overwrite: Replace an existing ``out_dir``.
        source: Source model recorded in the manifest; defaults to the model's ``_name_or_path``.
        mask_path: Mask file whose sha256 is recorded (see :func:`build_manifest`).
        config: Settings recorded in the manifest.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: ``out_dir`` exists without ``overwrite``, ``pipe`` cannot be saved, or writing failed.
        MaskMismatchError: The mask does not fit the model.
    """
    out_dir = Path(out_dir)
    component = export_component(pipe)
    check_out_dir(out_dir, overwrite)
    validate_mask(pipe, mask)
    manifest = build_manifest(
        mask, source=source or _source_of(pipe), mask_path=mask_path, config=config, component=component
    )
    write_edited(pipe, out_dir, lambda: apply_mask(pipe, mask), manifest)
    logger.info(
        "exported %s with %d of %d FFN weights zeroed (%.4f%%) to %s",
        component,
        manifest["num_zeroed"],
        manifest["num_ffn_weights"],
        100 * manifest["fraction_zeroed"],
        out_dir,
    )
    return out_dir
