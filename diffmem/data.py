"""Prompt sets and manifests.

Prompt files (``read_prompts`` / ``read_prompt_records``):

* ``.txt``: one prompt per line; blank lines are skipped.
* ``.jsonl``: one JSON object per line with a ``prompt`` or ``caption`` field (e.g. Wen et al.'s
  ``sdv1_500_memorized.jsonl``).
* ``.csv`` / ``.tsv``: a header row with a ``prompt`` or ``caption`` column (any case); the delimiter is sniffed
  among ``, ; TAB |`` (NeMo's prompt lists use ``;`` and quoted fields with doubled quotes).

Manifests (``read_manifest``) are jsonl files written next to the images they reference, one entry per prompt::

    {"prompt": "the zorblax emblem", "memorized": true, "duplicates": 32, "reference": "train/0007.png",
     "split": "locate"}
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PromptFileError

__all__ = [
    "PROMPT_SUFFIXES",
    "MANIFEST_SPLITS",
    "ManifestEntry",
    "read_prompts",
    "read_prompt_records",
    "read_manifest",
    "write_manifest",
    "split_entries",
]

logger = logging.getLogger(__name__)

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
"""File suffixes that :func:`read_prompt_records` understands."""

MANIFEST_SPLITS = ("locate", "heldout", "nonmem")
"""Manifest splits: prompts used to locate memorization, held-out memorized prompts, non-memorized prompts."""

_PROMPT_KEYS = ("prompt", "caption")
_DELIMITERS = ",;\t|"
_SNIFF_BYTES = 64 * 1024


def _fail(path: Path, line: int | None, problem: str) -> PromptFileError:
    where = f"{path}:{line}" if line is not None else str(path)
    return PromptFileError(f"{where}: {' '.join(problem.split())}")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise _fail(path, None, "no such file")
    if not path.is_file():
        raise _fail(path, None, "not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise _fail(path, line, f"not valid UTF-8 ({err.reason})") from None


def _prompt_key(keys: Iterable[str]) -> str | None:
    """The first key named ``prompt`` or ``caption`` (any case, surrounding spaces ignored)."""
    by_lower = {}
    for k in keys:
        by_lower.setdefault(str(k).strip().lower(), k)
    for want in _PROMPT_KEYS:
        if want in by_lower:
            return by_lower[want]
    return None


def _clean_prompt(path: Path, line: int, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(path, line, f"field {key!r} is {type(value).__name__}, not a string")
    text = value.strip()
    if not text:
        raise _fail(path, line, f"field {key!r} is empty")
    return text


def _read_txt(path: Path, text: str) -> list[dict[str, Any]]:
    return [{"prompt": s} for s in (ln.strip() for ln in text.splitlines()) if s]


def _read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _fail(path, n, f"bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise _fail(path, n, f"expected a JSON object, got {type(obj).__name__}")
        key = _prompt_key(obj)
        if key is None:
            raise _fail(path, n, f"missing field 'prompt' or 'caption' (fields: {', '.join(obj) or 'none'})")
        record = dict(obj)
        record["prompt"] = _clean_prompt(path, n, key, obj[key])
        records.append(record)
    return records


def _header(text: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
    except csv.Error:
        return []


def _sniff_delimiter(path: Path, text: str) -> str:
    """The delimiter among ``, ; TAB |`` whose header has a prompt column, preferring csv.Sniffer's choice."""
    candidates = []
    try:
        candidates.append(csv.Sniffer().sniff(text[:_SNIFF_BYTES], delimiters=_DELIMITERS).delimiter)
    except csv.Error:
        pass
    first_line = text.splitlines()[0] if text else ""
    candidates += sorted(_DELIMITERS, key=lambda d: -first_line.count(d))
    for delimiter in candidates:
        if _prompt_key(_header(text, delimiter)) is not None:
            return delimiter
    columns = _header(text, candidates[0])
    raise _fail(path, 1, f"no 'prompt' or 'caption' column in the header (columns: {', '.join(columns) or 'none'})")


def _read_csv(path: Path, text: str) -> list[dict[str, Any]]:
    delimiter = _sniff_delimiter(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[dict[str, Any]] = []
    try:
        header = next(reader)
        # An unnamed column (e.g. the index column pandas writes) gets a name of its own.
        names = [h.strip() or f"column_{i}" for i, h in enumerate(header)]
        if len(set(names)) != len(names):
            dupes = sorted({h for h in names if names.count(h) > 1})
            raise _fail(path, 1, f"duplicate column names: {', '.join(dupes)}")
        key = _prompt_key(names)
        assert key is not None  # _sniff_delimiter checked the header
        start = reader.line_num + 1
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                start = reader.line_num + 1
                continue
            if len(row) != len(names):
                raise _fail(path, start, f"{len(row)} columns, expected {len(names)} (delimiter {delimiter!r})")
            record: dict[str, Any] = dict(zip(names, row))
            record["prompt"] = _clean_prompt(path, start, key, record[key])
            records.append(record)
            start = reader.line_num + 1
    except csv.Error as err:
        raise _fail(path, reader.line_num, f"malformed CSV ({err})") from None
    return records


def read_prompt_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a prompt file, keeping every field of every row.

    Args:
        path: A ``.txt``, ``.jsonl``, ``.csv`` or ``.tsv`` file (see the module docstring).

    Returns:
        One dict per prompt, in file order, with the file's fields (CSV values stay strings) and a ``prompt``
        key holding the stripped prompt text (taken from ``prompt`` or else ``caption``).

    Raises:
        PromptFileError: Missing, empty or malformed file; the message names the file and line.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        kind = suffix or "(none)"
        raise _fail(p, None, f"unknown prompt file type {kind!r}; expected one of {', '.join(PROMPT_SUFFIXES)}")
    text = _read_text(p)
    if not text.strip():
        raise _fail(p, None, "empty file")
    if suffix == ".txt":
        records = _read_txt(p, text)
    elif suffix == ".jsonl":
        records = _read_jsonl(p, text)
    else:
        records = _read_csv(p, text)
    if not records:
        raise _fail(p, None, "no prompts (only a header or blank lines)")
    logger.debug("read %d prompts from %s", len(records), p)
    return records


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Read the prompts of a prompt file.

    Args:
        path: A ``.txt``, ``.jsonl``, ``.csv`` or ``.tsv`` file (see the module docstring).

    Returns:
        The stripped prompts, in file order.

    Raises:
        PromptFileError: Missing, empty or malformed file; the message names the file and line.
    """
    return [r["prompt"] for r in read_prompt_records(path)]


# ----------------------------------------------------------------------------------------------------------------
# Manifests


@dataclass(frozen=True)
class ManifestEntry:
    """One prompt of a manifest.

    Args:
        prompt: The prompt.
        memorized: Whether the prompt is (meant to be) memorized.
        duplicates: How many times its image occurs in the training set (0 when it is not there).
        split: ``"locate"``, ``"heldout"`` or ``"nonmem"``.
        reference: Absolute path of the training image the prompt should replicate, if any.
        extra: Any other fields of the manifest line.
    """

    prompt: str
    memorized: bool
    duplicates: int
    split: str
    reference: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_MANIFEST_FIELDS = ("prompt", "memorized", "duplicates", "split", "reference")


def _manifest_entry(path: Path, n: int, obj: Any) -> ManifestEntry:
    if not isinstance(obj, dict):
        raise _fail(path, n, f"expected a JSON object, got {type(obj).__name__}")
    for name in ("prompt", "memorized", "duplicates", "split"):
        if name not in obj:
            raise _fail(path, n, f"missing field {name!r}")
    prompt = _clean_prompt(path, n, "prompt", obj["prompt"])
    memorized = obj["memorized"]
    if not isinstance(memorized, bool):
        raise _fail(path, n, f"field 'memorized' must be true or false, got {memorized!r}")
    duplicates = obj["duplicates"]
    if isinstance(duplicates, bool) or not isinstance(duplicates, int) or duplicates < 0:
        raise _fail(path, n, f"field 'duplicates' must be an integer >= 0, got {duplicates!r}")
    split = obj["split"]
    if split not in MANIFEST_SPLITS:
        raise _fail(path, n, f"field 'split' is {split!r}; expected one of {', '.join(MANIFEST_SPLITS)}")
    reference = obj.get("reference")
    if reference is not None:
        if not isinstance(reference, str) or not reference.strip():
            raise _fail(path, n, f"field 'reference' must be a path string or null, got {reference!r}")
        resolved = (path.parent / reference).resolve()
        if not resolved.is_file():
            raise _fail(path, n, f"reference {reference!r} does not exist (looked for {resolved})")
        reference = resolved
    extra = {k: v for k, v in obj.items() if k not in _MANIFEST_FIELDS}
    return ManifestEntry(prompt, memorized, duplicates, split, reference, extra)


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Read a jsonl manifest and check every line.

    Args:
        path: The manifest; ``reference`` paths inside it are relative to its folder.

    Returns:
        The entries in file order, with references resolved to absolute paths.

    Raises:
        PromptFileError: Missing or empty file, bad JSON, a missing or mistyped field, an unknown split, or a
            reference that does not exist; the message names the file and line.
    """
    p = Path(path).expanduser()
    text = _read_text(p)
    entries = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _fail(p, n, f"bad JSON ({err.msg} at column {err.colno})") from None
        entries.append(_manifest_entry(p, n, obj))
    if not entries:
        raise _fail(p, None, "empty manifest")
    return entries


def write_manifest(entries: Iterable[ManifestEntry], path: str | os.PathLike[str]) -> Path:
    """Write a jsonl manifest (sorted keys) that :func:`read_manifest` reads back.

    Args:
        entries: Entries to write; references are stored relative to the manifest's folder.
        path: Output file; its folder must exist.

    Returns:
        The path written.
    """
    p = Path(path).expanduser()
    base = p.resolve().parent
    lines = []
    for entry in entries:
        clash = set(entry.extra) & set(_MANIFEST_FIELDS)
        if clash:
            raise ValueError(f"extra fields {sorted(clash)} clash with manifest fields")
        obj: dict[str, Any] = {
            **entry.extra,
            "prompt": entry.prompt,
            "memorized": entry.memorized,
            "duplicates": entry.duplicates,
            "split": entry.split,
            "reference": None
            if entry.reference is None
            else Path(os.path.relpath(Path(entry.reference).resolve(), base)).as_posix(),
        }
        lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=False))
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def split_entries(entries: Iterable[ManifestEntry], split: str) -> list[ManifestEntry]:
    """The entries of one split.

    Args:
        entries: Manifest entries.
        split: ``"locate"``, ``"heldout"`` or ``"nonmem"``.

    Returns:
        The entries whose ``split`` matches, in order.
    """
    if split not in MANIFEST_SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {', '.join(MANIFEST_SPLITS)}")
    return [e for e in entries if e.split == split]
