"""The ``Edit`` protocol: every weight edit of a denoiser (a sparse mask, a direction projection, a weight delta).

An edit is checked against a model before anything is touched (:meth:`Edit.validate`), applied reversibly as a
context manager (:meth:`Edit.apply`, restored bit for bit on exit, also after an exception), baked for good
(:meth:`Edit.bake`), saved as ``<stem>.safetensors`` plus a ``<stem>.json`` sidecar with sorted keys
(:meth:`Edit.save` / :func:`load_edit`), and describes itself for an export manifest (:meth:`Edit.describe`).
:func:`export_edited` writes any edit's pipeline atomically with a ``diffmem_manifest.json``; :func:`apply_edit`
is the reversible form that also accepts ``None``. No caller needs to know which kind of edit it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import DiffmemError, ExportError, MaskMismatchError
from .files import atomic_write_bytes, pair_paths, replace_dir, sha256_file, write_json
from .modelcard import write_model_card
from .targets import get_denoiser, model_source

logger = logging.getLogger(__name__)

__all__ = [
    "Edit",
    "register_edit",
    "load_edit",
    "apply_edit",
    "export_edited",
    "MANIFEST_NAME",
    "MODEL_SIDECARS",
]

MANIFEST_NAME = "diffmem_manifest.json"
MANIFEST_FORMAT = "diffmem.export"
# Files of a model folder that belong to diffmem and travel with every export of that model.
MODEL_SIDECARS = ("diffmem_defaults.json",)
_HEADER_KEY = "diffmem_edit"
_EDIT_TYPES: dict[str, type[Edit]] = {}


def register_edit(cls: type[Edit]) -> type[Edit]:
    """Class decorator: make an :class:`Edit` subclass loadable by :func:`load_edit` under its ``format``."""
    if cls.format in _EDIT_TYPES and _EDIT_TYPES[cls.format] is not cls:
        raise ValueError(f"edit format {cls.format!r} is already registered")
    _EDIT_TYPES[cls.format] = cls
    return cls


class Edit(ABC):
    """A reversible change of some weights of a denoiser, relative to the denoiser's module names.

    Subclasses define the weights they touch (:meth:`layer_shapes`), how they change them (:meth:`edit_`), how
    many entries change (:meth:`num_params_changed`) and their storage (:meth:`tensors`, :meth:`header`,
    :meth:`from_storage`). Everything else (validation, reversible application, baking, saving, manifests)
    is shared.
    """

    format: ClassVar[str]
    kind: ClassVar[str]
    meta: dict[str, Any]

    # ------------------------------------------------------------------------------------------ to implement
    @abstractmethod
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name (relative to the denoiser) -> the shape the model's parameter must have."""

    @abstractmethod
    def edit_(self, params: Mapping[str, Tensor]) -> None:
        """Write the edit into the given parameters in place (called under ``torch.no_grad``)."""

    @abstractmethod
    def num_params_changed(self) -> int:
        """Number of weight entries whose value the edit changes."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors that :meth:`save` stores (deterministic content)."""

    @abstractmethod
    def header(self) -> dict[str, Any]:
        """JSON-serialisable structure stored in the safetensors header (without ``meta``)."""

    @classmethod
    @abstractmethod
    def from_storage(cls, header: dict[str, Any], tensors: dict[str, Tensor], meta: dict[str, Any]) -> Edit:
        """Rebuild the edit from what :meth:`save` wrote."""

    def summary(self) -> dict[str, Any]:
        """Kind-specific figures for the sidecar and the manifest (e.g. ranks, per-layer counts)."""
        return {}

    def saved_entries(self, name: str, param: Tensor) -> Any:
        """What :meth:`apply` saves of ``param`` before editing it (default: a full clone)."""
        return param.detach().clone()

    def restore_entries(self, name: str, param: Tensor, saved: Any) -> None:
        """Write back what :meth:`saved_entries` saved."""
        param.copy_(saved)

    # ------------------------------------------------------------------------------------------ shared
    def num_total(self) -> int:
        """Number of entries of all the parameters the edit touches."""
        total = 0
        for shape in self.layer_shapes().values():
            n = 1
            for d in shape:
                n *= int(d)
            total += n
        return total

    def fraction_changed(self) -> float:
        """Changed share of the touched parameters' entries (0 for an edit without layers)."""
        total = self.num_total()
        return self.num_params_changed() / total if total else 0.0

    def validate(self, pipe_or_denoiser: Any) -> dict[str, Tensor]:
        """Check that every parameter of the edit exists in the denoiser with the same shape; touch nothing.

        Args:
            pipe_or_denoiser: A diffusers pipeline or its denoiser.

        Returns:
            Parameter name -> the model's parameter tensor, in edit order.

        Raises:
            MaskMismatchError: Naming the first parameter missing from the model or differing in shape.
        """
        denoiser = get_denoiser(pipe_or_denoiser)
        modules = dict(denoiser.named_modules())
        params = dict(denoiser.named_parameters())
        found: dict[str, Tensor] = {}
        for name, shape in self.layer_shapes().items():
            module = modules.get(name)
            tensor = getattr(module, "weight", None) if module is not None else params.get(name)
            if not isinstance(tensor, Tensor):
                raise MaskMismatchError(
                    f"{self.kind} layer {name!r} is not in the model ({type(denoiser).__name__}); "
                    "was it made for another model?"
                )
            if tuple(tensor.shape) != tuple(shape):
                raise MaskMismatchError(
                    f"{self.kind} layer {name!r} has shape {tuple(shape)} but the model's is {tuple(tensor.shape)}"
                )
            found[name] = tensor
        return found

    @contextlib.contextmanager
    def apply(self, pipe_or_denoiser: Any) -> Iterator[Any]:
        """Apply the edit inside a ``with`` block and restore the touched weights bit for bit on exit.

        The edit is validated before anything changes; on exit, also after an exception, the saved entries are
        written back.

        Yields:
            ``pipe_or_denoiser``.
        """
        params = self.validate(pipe_or_denoiser)
        with torch.no_grad():
            saved = {name: self.saved_entries(name, p) for name, p in params.items()}
        try:
            with torch.no_grad():
                self.edit_(params)
            logger.debug("applied %s to %d layers", self.kind, len(params))
            yield pipe_or_denoiser
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    self.restore_entries(name, p, saved[name])
            logger.debug("restored %d layers", len(params))

    def bake(self, pipe_or_denoiser: Any) -> int:
        """Apply the edit for good.

        Returns:
            The number of changed entries.

        Raises:
            MaskMismatchError: The edit does not fit the model (nothing is changed).
        """
        params = self.validate(pipe_or_denoiser)
        with torch.no_grad():
            self.edit_(params)
        n = self.num_params_changed()
        logger.info("baked %s: %d weights changed in %d layers", self.kind, n, len(params))
        return n

    def _header_bytes_key(self) -> dict[str, str]:
        header = {"format": self.format, **self.header()}
        return {_HEADER_KEY: json.dumps(header, sort_keys=True)}

    def to_bytes(self) -> bytes:
        """Deterministic safetensors bytes of the edit (not its ``meta``): their sha256 identifies it."""
        from safetensors.torch import save

        return save({n: t.contiguous() for n, t in self.tensors().items()}, metadata=self._header_bytes_key())

    def sha256(self) -> str:
        """Hex sha256 of :meth:`to_bytes`."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What an export manifest records about the edit."""
        return {
            "kind": self.kind,
            "format": self.format,
            "sha256": self.sha256(),
            "num_params_changed": self.num_params_changed(),
            "num_total": self.num_total(),
            "fraction_changed": self.fraction_changed(),
            **self.summary(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``<stem>.safetensors`` and a ``<stem>.json`` sidecar (sorted keys), each written atomically.

        Args:
            path: Stem or either file name (``out/mask``, ``out/mask.safetensors``, ``out/mask.json``).

        Returns:
            The path of the safetensors file.
        """
        st_path, json_path = pair_paths(path)
        atomic_write_bytes(st_path, self.to_bytes())
        write_json(json_path, {**self.describe(), **self.header(), "meta": self.meta})
        logger.info("saved %s (%d weights changed) to %s", self.kind, self.num_params_changed(), st_path)
        return st_path


def load_edit(path: str | os.PathLike, expect: type[Edit] | None = None) -> Edit:
    """Load any edit written by :meth:`Edit.save`.

    Args:
        path: Stem or either file name.
        expect: Require this edit class (e.g. :class:`~diffmem.masks.Mask`).

    Returns:
        The edit; ``meta`` is empty when the sidecar is missing (a warning is logged).

    Raises:
        DiffmemError: The file is missing, unreadable, not a diffmem edit, or not of the expected kind.
    """
    from safetensors import safe_open

    _load_edit_types()
    st_path, json_path = pair_paths(path)
    if not st_path.is_file():
        raise DiffmemError(f"edit file {st_path} does not exist")
    try:
        with safe_open(str(st_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise DiffmemError(f"cannot read edit file {st_path}: {' '.join(str(err).split())}") from None
    raw = next((metadata[k] for k in (_HEADER_KEY, "diffmem_mask", "diffmem_directions") if k in metadata), None)
    try:
        header = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        header = {}
    cls = _EDIT_TYPES.get(header.get("format")) if isinstance(header, dict) else None
    if cls is None:
        raise DiffmemError(f"{st_path} is not a diffmem edit (mask, directions or weight delta)")
    if expect is not None and not issubclass(cls, expect):
        raise DiffmemError(f"{st_path} holds a {cls.kind}, not a {expect.kind}")
    meta: dict[str, Any] = {}
    if json_path.is_file():
        try:
            sidecar = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DiffmemError(f"cannot read {json_path}: {err}") from None
        meta = sidecar.get("meta", {}) if isinstance(sidecar, dict) else {}
    else:
        logger.warning("sidecar %s is missing; loading the %s without its metadata", json_path, cls.kind)
    try:
        return cls.from_storage(header, tensors, meta)
    except KeyError as err:
        raise DiffmemError(f"{st_path} lacks the tensors of layer {err}") from None
    except (TypeError, ValueError, MaskMismatchError) as err:
        raise DiffmemError(f"{st_path} is malformed: {err}") from None


def _load_edit_types() -> None:
    """Import the modules that define the built-in edits so that they are registered."""
    from . import deltas, directions, masks  # noqa: F401


@contextlib.contextmanager
def apply_edit(pipe_or_denoiser: Any, edit: Edit | None) -> Iterator[Any]:
    """Apply ``edit`` reversibly inside a ``with`` block; ``None`` applies nothing.

    Yields:
        ``pipe_or_denoiser``.

    Raises:
        TypeError: ``edit`` is neither ``None`` nor an :class:`Edit`.
    """
    if edit is None:
        yield pipe_or_denoiser
        return
    if not isinstance(edit, Edit):
        raise TypeError(f"unsupported edit {type(edit).__name__}: expected a diffmem Edit (Mask, DirectionBasis, ...)")
    with edit.apply(pipe_or_denoiser):
        yield pipe_or_denoiser


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
        MaskMismatchError: The edit does not fit the model.
    """
    from . import __version__

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
