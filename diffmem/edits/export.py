"""Export an edited pipeline: a folder that a plain ``from_pretrained`` loads, with a manifest and a model card.

:func:`export_edited` applies any :class:`~diffmem.edits.Edit` reversibly around ``save_pretrained``, writes
``diffmem_manifest.json`` and a ``README.md`` model card, and swaps the folder in atomically.
:func:`check_output_dir` is its guard against replacing anything diffmem did not write; the other commands that
write a model folder use it too.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ExportError
from ..files import pair_paths, replace_dir, sha256_file, write_json
from ..modelcard import write_model_card
from ..targets import model_source
from .base import Edit, apply_edit

logger = logging.getLogger(__name__)

__all__ = ["export_edited", "check_output_dir", "MANIFEST_NAME", "MANIFEST_FORMAT", "MODEL_SIDECARS"]

MANIFEST_NAME = "diffmem_manifest.json"
MANIFEST_FORMAT = "diffmem.export"
# Files of a model folder that belong to diffmem and travel with every export of that model.
MODEL_SIDECARS = ("diffmem_defaults.json",)


def _component(pipe: Any) -> str:
    from diffusers import DiffusionPipeline, ModelMixin

    if isinstance(pipe, DiffusionPipeline):
        return "pipeline"
    if isinstance(pipe, ModelMixin):
        return type(pipe).__name__
    raise ExportError(f"cannot export a {type(pipe).__name__}: expected a DiffusionPipeline or a diffusers model")


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_output_dir(out_dir: Path, overwrite: bool, source: str | None = None,
                     marks: tuple[str, ...] = (MANIFEST_NAME,)) -> None:
    """Refuse an output folder that would destroy something diffmem did not create.

    The output may not be the source model, contain it or lie inside it; an existing folder is replaced only with
    ``overwrite`` and only when it is an earlier diffmem export (it holds ``diffmem_manifest.json``).

    Raises:
        ExportError: Naming the folder and the reason, in one line.
    """
    target = out_dir.expanduser().resolve()
    if source is not None and Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        if _inside(target, src) or _inside(src, target):
            raise ExportError(f"output folder {out_dir} would overwrite the input model {source}; choose another --out")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise ExportError(f"output path {out_dir} exists and is not a folder")
        if not overwrite:
            raise ExportError(f"output folder {out_dir} already exists; pass --overwrite to replace an earlier export")
        if any(out_dir.iterdir()) and not any((out_dir / m).is_file() for m in marks):
            raise ExportError(
                f"output folder {out_dir} is not an earlier diffmem output (no {' or '.join(marks)}); "
                "--overwrite replaces only what diffmem wrote"
            )


def export_edited(
    pipe: Any,
    edit: Edit | None,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    source: str | None = None,
    edit_path: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    results: list[dict[str, Any]] | str | None = None,
) -> Path:
    """Save an edited copy of a pipeline (or of a bare denoiser) with a ``diffmem_manifest.json`` and a model card.

    The edit is applied with :meth:`Edit.apply` around ``save_pretrained``, so the in-memory model is left as it
    was. Shapes never change, so the export loads with a plain ``from_pretrained``. Files go to a temporary folder
    that replaces ``out_dir`` only once complete; on failure ``out_dir`` is left as it was. diffmem's own sidecars
    of the source model folder (``diffmem_defaults.json``: the sampler settings) are copied into the export, and a
    ``README.md`` model card in the Hub's convention describes the edit (:func:`~diffmem.modelcard.write_model_card`).

    Args:
        pipe: A ``DiffusionPipeline``, or a diffusers ``ModelMixin`` denoiser, which is saved alone.
        edit: The edit (``None`` exports the model unchanged).
        out_dir: Output folder; must not exist unless ``overwrite`` (and then only an earlier export).
        overwrite: Replace an earlier diffmem export at ``out_dir``.
        source: Source model (path or hub id); defaults to the model's ``_name_or_path``.
        edit_path: The edit's file; its sha256 is recorded beside the edit's own.
        settings: Settings recorded in the manifest (e.g. locate and sampler settings); a ``"sampler"`` entry is
            listed on the model card when the export has no ``diffmem_defaults.json``.
        results: Measured figures for the model card's table (rows of a table, or a Markdown table).

    Returns:
        ``out_dir``.

    Raises:
        ExportError: The output is refused (see :func:`check_output_dir`) or could not be written.
        EditMismatchError: The edit does not fit the model.
    """
    out_dir = Path(out_dir)
    component = _component(pipe)
    source = source or model_source(pipe)
    check_output_dir(out_dir, overwrite, source)
    if edit is not None:
        edit.validate(pipe)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "component": component,
        "edit": None if edit is None else edit.describe(),
        "edit_meta": None if edit is None else edit.meta,
        "settings": settings,
        "diffmem_version": __version__,
    }
    if edit_path is not None:
        st_path = pair_paths(edit_path)[0]
        if not st_path.is_file():
            raise ExportError(f"edit file {st_path} does not exist")
        manifest["edit_path"] = str(st_path)
        manifest["edit_file_sha256"] = sha256_file(st_path)
    src_dir = Path(source) if source and Path(source).is_dir() else None
    sampler = (settings or {}).get("sampler") if isinstance((settings or {}).get("sampler"), dict) else None

    def fill(folder: Path) -> None:
        with apply_edit(pipe, edit):
            pipe.save_pretrained(str(folder), safe_serialization=True)
        carried = []
        for name in MODEL_SIDECARS:
            if src_dir is not None and (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, folder / name)
                carried.append(name)
        write_json(folder / MANIFEST_NAME, {**manifest, "carried_sidecars": carried})
        write_model_card(folder, edit, base_model=source, sampler=None if carried else sampler, results=results)

    replace_dir(out_dir, fill)
    logger.info("exported %s with %s to %s", component,
                "no edit" if edit is None else f"{edit.num_params_changed()} weights changed ({edit.kind})", out_dir)
    return out_dir
