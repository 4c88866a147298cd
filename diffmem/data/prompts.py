"""Prompt files: ``.txt``, ``.jsonl``, ``.csv`` / ``.tsv`` and ``.parquet`` readers.

* ``.txt``: one prompt per line; blank lines are skipped.
* ``.jsonl``: one JSON object per line with a ``prompt`` or ``caption`` field (e.g. Wen et al.'s
  ``sdv1_500_memorized.jsonl``).
* ``.csv`` / ``.tsv``: a header row with a ``prompt`` or ``caption`` column (any case); the delimiter is sniffed
  among ``, ; TAB |`` (NeMo's prompt lists use ``;`` and quoted fields with doubled quotes).
* ``.parquet``: a ``prompt`` or ``caption`` column (e.g. Webster's ground-truth files); needs pyarrow
  (``pip install 'diffmem[formats]'``). Rows are counted from 1 and named ``file row N`` in messages.

Every problem is a :class:`~diffmem.errors.PromptFileError` whose one-line message names the file and line
(``_fail``); the other modules of :mod:`diffmem.data` use the same helpers for their messages.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import PromptFileError
from . import formats
from .formats import _where

__all__ = ["PROMPT_SUFFIXES", "read_prompts", "read_prompt_records"]

logger = logging.getLogger(__name__)

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")
"""File suffixes that :func:`read_prompt_records` understands."""

_PROMPT_KEYS = ("prompt", "caption")
_DELIMITERS = ",;\t|"
_SNIFF_BYTES = 64 * 1024


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _short(text: str, limit: int = 60) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(path: Path, line: int | None, problem: str) -> PromptFileError:
    return PromptFileError(f"{_where(path, line)}: {_one_line(problem)}")


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


def _find_key(keys: Iterable[str], wanted: Sequence[str]) -> str | None:
    """The first key named like one of ``wanted`` (any case, surrounding spaces ignored), in ``wanted``'s order."""
    by_lower: dict[str, str] = {}
    for k in keys:
        by_lower.setdefault(str(k).strip().lower(), k)
    for want in wanted:
        if want in by_lower:
            return by_lower[want]
    return None


def _prompt_key(keys: Iterable[str]) -> str | None:
    """The first key named ``prompt`` or ``caption`` (any case, surrounding spaces ignored)."""
    return _find_key(keys, _PROMPT_KEYS)


def _clean_prompt(path: Path, line: int, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(path, line, f"field {key!r} is {type(value).__name__}, not a string")
    text = value.strip()
    if not text:
        raise _fail(path, line, f"field {key!r} is empty")
    return text


def _jsonl_objects(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines text, in order.

    Raises:
        PromptFileError: A line that is not valid JSON or not a JSON object, naming the file and line.
    """
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _fail(path, n, f"bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise _fail(path, n, f"expected a JSON object, got {type(obj).__name__}")
        yield n, obj


# A record is (line number, fields): the file's own fields plus "prompt", the stripped prompt text.
_Record = tuple[int, dict[str, Any]]


def _read_txt(path: Path, text: str) -> list[_Record]:
    return [(n, {"prompt": s}) for n, s in enumerate((ln.strip() for ln in text.splitlines()), start=1) if s]


def _read_jsonl(path: Path, text: str) -> list[_Record]:
    return _read_objects(path, _jsonl_objects(path, text))


def _read_objects(path: Path, objects: Iterable[tuple[int, dict[str, Any]]]) -> list[_Record]:
    records = []
    for n, obj in objects:
        key = _prompt_key(obj)
        if key is None:
            raise _fail(path, n, f"missing field 'prompt' or 'caption' (fields: {', '.join(obj) or 'none'})")
        record = dict(obj)
        record["prompt"] = _clean_prompt(path, n, key, obj[key])
        records.append((n, record))
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


def _read_csv(path: Path, text: str) -> list[_Record]:
    delimiter = _sniff_delimiter(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[_Record] = []
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
            records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as err:
        raise _fail(path, reader.line_num, f"malformed CSV ({err})") from None
    return records


def _read_records(path: Path) -> list[_Record]:
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        kind = suffix or "(none)"
        raise _fail(path, None, f"unknown prompt file type {kind!r}; expected one of {', '.join(PROMPT_SUFFIXES)}")
    if suffix == ".parquet":
        columns, rows = formats.read_parquet_rows(path)
        if _prompt_key(columns) is None:
            raise _fail(path, None, f"no 'prompt' or 'caption' column (columns: {', '.join(columns) or 'none'})")
        if not rows:
            raise _fail(path, None, "no prompts (no rows)")
        return _read_objects(path, rows)
    text = _read_text(path)
    if not text.strip():
        raise _fail(path, None, "empty file")
    if suffix == ".txt":
        records = _read_txt(path, text)
    elif suffix == ".jsonl":
        records = _read_jsonl(path, text)
    else:
        records = _read_csv(path, text)
    if not records:
        raise _fail(path, None, "no prompts (only a header or blank lines)")
    logger.debug("read %d prompts from %s", len(records), path)
    return records


def read_prompt_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a prompt file, keeping every field of every row.

    Args:
        path: A ``.txt``, ``.jsonl``, ``.csv``, ``.tsv`` or ``.parquet`` file (see the module docstring).

    Returns:
        One dict per prompt, in file order, with the file's fields (CSV values stay strings) and a ``prompt``
        key holding the stripped prompt text (taken from ``prompt`` or else ``caption``).

    Raises:
        PromptFileError: Missing, empty or malformed file; the message names the file and line.
    """
    return [record for _, record in _read_records(Path(path).expanduser())]


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Read the prompts of a prompt file.

    Args:
        path: A ``.txt``, ``.jsonl``, ``.csv``, ``.tsv`` or ``.parquet`` file (see the module docstring).

    Returns:
        The stripped prompts, in file order.

    Raises:
        PromptFileError: Missing, empty or malformed file; the message names the file and line.
    """
    return [r["prompt"] for r in read_prompt_records(path)]
