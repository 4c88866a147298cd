"""Small file helpers: atomic writes and result tables."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_write_bytes", "write_table"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_table(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows as ``.csv`` (header from the union of keys, in first-seen order) or ``.jsonl`` (sorted keys)."""
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
        raise ValueError(f"table {str(path)!r}: use a .jsonl or .csv suffix")
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
