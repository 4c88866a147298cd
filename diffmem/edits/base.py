"""The ``Edit`` protocol: every weight edit of a denoiser (a sparse mask, a direction projection, a weight delta).

An edit is checked against a model before anything is touched (:meth:`Edit.validate`), applied reversibly as a
context manager (:meth:`Edit.apply`, restored bit for bit on exit, also after an exception), baked for good
(:meth:`Edit.bake`), saved as ``<stem>.safetensors`` plus a ``<stem>.json`` sidecar with sorted keys
(:meth:`Edit.save`), loaded back by its class or by :func:`load_edit`, and describes itself for an export manifest
(:meth:`Edit.describe`). :func:`register_edit` makes a kind loadable by its ``format``; :func:`apply_edit` is the
reversible form that also accepts ``None``. No caller needs to know which kind of edit it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..errors import EditMismatchError
from ..files import atomic_write_bytes, pair_paths, write_json
from ..targets import get_denoiser
from .loading import HEADER_KEY, read_edit

logger = logging.getLogger(__name__)

__all__ = ["Edit", "register_edit", "list_edit_formats", "load_edit", "apply_edit"]

E = TypeVar("E", bound="Edit")

_EDIT_TYPES: dict[str, type[Edit]] = {}


def register_edit(cls: type[E]) -> type[E]:
    """Class decorator: make an :class:`Edit` subclass loadable by :func:`load_edit` under its ``format``.

    Raises:
        ValueError: Another class is already registered under the same ``format``.
    """
    if cls.format in _EDIT_TYPES and _EDIT_TYPES[cls.format] is not cls:
        raise ValueError(f"edit format {cls.format!r} is already registered")
    _EDIT_TYPES[cls.format] = cls
    return cls


def list_edit_formats() -> list[str]:
    """The ``format`` names of the registered edit classes."""
    return sorted(_EDIT_TYPES)


class Edit(ABC):
    """A reversible change of some weights of a denoiser, relative to the denoiser's module names.

    Subclasses define the weights they touch (:meth:`layer_shapes`), how they change them (:meth:`edit_`), how
    many entries change (:meth:`num_params_changed`) and their storage (:meth:`tensors`, :meth:`header`,
    :meth:`from_storage`). Everything else (validation, reversible application, baking, saving, loading,
    manifests) is shared.
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
            EditMismatchError: Naming the first parameter missing from the model or differing in shape.
        """
        denoiser = get_denoiser(pipe_or_denoiser)
        modules = dict(denoiser.named_modules())
        params = dict(denoiser.named_parameters())
        found: dict[str, Tensor] = {}
        for name, shape in self.layer_shapes().items():
            module = modules.get(name)
            tensor = getattr(module, "weight", None) if module is not None else params.get(name)
            if not isinstance(tensor, Tensor):
                raise EditMismatchError(
                    f"{self.kind} layer {name!r} is not in the model ({type(denoiser).__name__}); "
                    "was it made for another model?"
                )
            if tuple(tensor.shape) != tuple(shape):
                raise EditMismatchError(
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
            EditMismatchError: The edit does not fit the model (nothing is changed).
        """
        params = self.validate(pipe_or_denoiser)
        with torch.no_grad():
            self.edit_(params)
        n = self.num_params_changed()
        logger.info("baked %s: %d weights changed in %d layers", self.kind, n, len(params))
        return n

    def to_bytes(self) -> bytes:
        """Deterministic safetensors bytes of the edit (not its ``meta``): their sha256 identifies it."""
        header = {"format": self.format, **self.header()}
        metadata = {HEADER_KEY: json.dumps(header, sort_keys=True)}
        return safetensors_bytes({n: t.contiguous() for n, t in self.tensors().items()}, metadata=metadata)

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

    @classmethod
    def load(cls: type[E], path: str | os.PathLike) -> E:
        """Load an edit written by :meth:`save`: of this class, or of any registered kind when called on ``Edit``.

        Args:
            path: Stem or either file name.

        Returns:
            The edit; ``meta`` is empty when the sidecar is missing (a warning is logged).

        Raises:
            DiffmemError: The file is missing, unreadable, not a diffmem edit, or not of this class.
        """
        return read_edit(path, _EDIT_TYPES, expect=None if cls is Edit else cls)  # type: ignore[return-value]


def load_edit(path: str | os.PathLike, expect: type[Edit] | None = None) -> Edit:
    """Load any edit written by :meth:`Edit.save`.

    Args:
        path: Stem or either file name.
        expect: Require this edit class (e.g. :class:`~diffmem.edits.Mask`).

    Returns:
        The edit; ``meta`` is empty when the sidecar is missing (a warning is logged).

    Raises:
        DiffmemError: The file is missing, unreadable, not a diffmem edit, or not of the expected kind.
    """
    return (expect or Edit).load(path)


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
