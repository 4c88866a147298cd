"""Reading a saved edit: the one path behind :meth:`Edit.load <diffmem.edits.Edit.load>` and :func:`load_edit`.

An edit is stored as ``<stem>.safetensors`` (its tensors, and its structure as JSON under the header key
``diffmem_edit``) plus a ``<stem>.json`` sidecar with sorted keys whose ``meta`` entry is its provenance. The kind of
edit is the ``format`` of the header, looked up in the registry of edit classes
(:func:`~diffmem.edits.register_edit`), which the caller passes in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from ..errors import DiffmemError, EditMismatchError
from ..files import pair_paths

if TYPE_CHECKING:
    from .base import Edit

logger = logging.getLogger(__name__)

__all__ = ["HEADER_KEY", "read_edit"]

HEADER_KEY = "diffmem_edit"
# Header keys of files written before every edit kind shared ``HEADER_KEY``; still read.
_OLD_HEADER_KEYS = ("diffmem_mask", "diffmem_directions")


def read_edit(
    path: str | os.PathLike, edit_types: Mapping[str, type[Edit]], expect: type[Edit] | None = None
) -> Edit:
    """Load any edit written by :meth:`Edit.save <diffmem.edits.Edit.save>`.

    Args:
        path: Stem or either file name (``out/mask``, ``out/mask.safetensors``, ``out/mask.json``).
        edit_types: Edit ``format`` -> its class (the registry).
        expect: Require this edit class or a subclass of it; ``None`` accepts every kind.

    Returns:
        The edit; ``meta`` is empty when the sidecar is missing (a warning is logged).

    Raises:
        DiffmemError: The file is missing, unreadable, not a diffmem edit, or not of the expected kind.
    """
    st_path, json_path = pair_paths(path)
    if not st_path.is_file():
        raise DiffmemError(f"edit file {st_path} does not exist")
    try:
        with safe_open(str(st_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise DiffmemError(f"cannot read edit file {st_path}: {' '.join(str(err).split())}") from None
    raw = next((metadata[k] for k in (HEADER_KEY, *_OLD_HEADER_KEYS) if k in metadata), None)
    try:
        header = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        header = {}
    cls = edit_types.get(header.get("format")) if isinstance(header, dict) else None
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
    except (TypeError, ValueError, EditMismatchError) as err:
        raise DiffmemError(f"{st_path} is malformed: {err}") from None
