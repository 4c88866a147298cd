"""File helpers shared by every stage: atomic writes, JSON sidecars, tensor-file pairs and folder swaps.

Every file diffmem writes goes through :func:`atomic_write_bytes`: a temporary file beside the target, flushed
and fsynced, then renamed into place, so a reader never sees half a file. Files get the permissions the user's
umask gives (``mkstemp`` would create them 0600). Folders (exports, run outputs) are filled in a temporary
folder and swapped in with :func:`replace_dir`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "jsonable",
    "read_json",
    "pair_paths",
    "sha256_file",
    "write_table",
    "replace_dir",
    "remove_stale_temp",
]

logger = logging.getLogger(__name__)

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename), with the user's umask.

    Args:
        path: Target file; its folder is created when missing.
        data: File content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic UTF-8 text write (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """A strict-JSON copy of ``obj``, the one sanitiser of every file diffmem writes.

    NaN and infinities become ``None``; numpy scalars and arrays become Python values; paths become strings; mapping
    keys become strings. Anything else is passed through ``default`` when given (else left for the encoder).
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v, default) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):
        return jsonable(obj.tolist(), default)
    return default(obj) if default is not None else obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with sorted keys, atomically; NaN and inf become ``null``."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_json(path: str | os.PathLike, what: str = "file", *, fmt: str | None = None, hint: str = "") -> Any:
    """Read a JSON file, raising a one-line :class:`~diffmem.errors.DiffmemError` naming it when unreadable.

    Args:
        path: The file.
        what: What the file is, for messages ("checkpoint", "activation statistics file", ...).
        fmt: When given, the file must be a JSON object whose ``format`` is ``fmt``.
        hint: Appended to every message (e.g. how to recover).
    """
    from .errors import DiffmemError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffmemError(f"{what} {path} does not exist{hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffmemError(f"cannot read {what} {path}: {err}{hint}") from None
    if fmt is not None and (not isinstance(data, dict) or data.get("format") != fmt):
        raise DiffmemError(f"{path} is not a diffmem {what}{hint}")
    return data


def pair_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The ``(safetensors, json)`` pair of an artifact saved at ``path``.

    ``out/mask``, ``out/mask.safetensors`` and ``out/mask.json`` all give
    ``(out/mask.safetensors, out/mask.json)``.
    """
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_table(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows as ``.csv`` (header from the union of keys, first-seen order) or ``.jsonl`` (sorted keys)."""
    path = Path(path)
    if path.suffix == ".csv":
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        return atomic_write_text(path, buf.getvalue())
    if path.suffix != ".jsonl":
        raise ConfigError(f"table {str(path)!r}: use a .jsonl or .csv suffix")
    return atomic_write_text(path, "".join(json.dumps(jsonable(r), sort_keys=True) + "\n" for r in rows))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that pid
        return True
    return True


def remove_stale_temp(out_dir: Path) -> list[Path]:
    """Remove diffmem's own leftover temporary folders of ``out_dir`` (from a killed run); say so in the log.

    Only siblings named ``.<name>.tmp-<pid>-<8 hex>`` or ``.<name>.old-<pid>-<8 hex>`` (the names
    :func:`replace_dir` makes) whose process no longer runs on this machine are removed.

    Returns:
        The removed paths.
    """
    parent = out_dir.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for mark in (_TMP_MARK, _OLD_MARK):
        prefix = f".{out_dir.name}{mark}"
        for p in parent.glob(f"{prefix}*"):
            pid, _, tag = p.name[len(prefix):].partition("-")
            if not pid.isdigit() or len(tag) != 8 or any(c not in "0123456789abcdef" for c in tag):
                continue
            if _alive(int(pid)):
                continue
            _remove(p)
            removed.append(p)
            logger.warning("removed %s, left behind by an interrupted diffmem run", p)
    return removed


def replace_dir(out_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary folder beside ``out_dir``, then swap it into place.

    An existing ``out_dir`` is parked beside it and removed only once the new folder is in place; on any failure
    the temporary folder is removed and ``out_dir`` is restored as it was. Stale temporary folders of an earlier,
    killed run are removed first.

    Args:
        out_dir: The folder to create or replace (the caller decides whether replacing is allowed).
        fill: Writes the content into the temporary folder it is given.

    Returns:
        ``out_dir``.
    """
    from .errors import ExportError

    out_dir = Path(out_dir)
    remove_stale_temp(out_dir)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir = out_dir.parent / f".{out_dir.name}{_TMP_MARK}{tag}"
    old_dir = out_dir.parent / f".{out_dir.name}{_OLD_MARK}{tag}"
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
        raise ExportError(f"could not write {out_dir}: {err}") from err
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
    return out_dir
