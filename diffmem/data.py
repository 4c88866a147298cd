"""Prompt sets and manifests.

Prompt files (``read_prompts`` / ``read_prompt_records``):

* ``.txt``: one prompt per line; blank lines are skipped.
* ``.jsonl``: one JSON object per line with a ``prompt`` or ``caption`` field (e.g. Wen et al.'s
  ``sdv1_500_memorized.jsonl``).
* ``.csv`` / ``.tsv``: a header row with a ``prompt`` or ``caption`` column (any case); the delimiter is sniffed
  among ``, ; TAB |`` (NeMo's prompt lists use ``;`` and quoted fields with doubled quotes).
* ``.parquet``: a ``prompt`` or ``caption`` column (e.g. Webster's ground-truth files); needs pyarrow
  (``pip install 'diffmem[formats]'``). Rows are counted from 1 and named ``file row N`` in messages.

Manifests (``read_manifest``) are jsonl files written next to the images they reference, one entry per prompt::

    {"prompt": "the zorblax emblem", "memorized": true, "duplicates": 32, "reference": "train/0007.png",
     "split": "locate"}

``reference`` is a path relative to the manifest's folder (and must lie inside it, after resolving symlinks and
``..``, unless the caller allows otherwise) or an ``http(s)`` URL. :func:`read_entries` reads either kind of file;
a plain prompt file becomes unlabelled ``nonmem`` entries whose ``reference`` comes from a ``reference`` or ``url``
column when there is one (Wen et al.'s ``url``, NeMo's ``URL``). Two published sets carry labels and are read as
manifests: Webster's ground-truth parquet files and MemBench's csv (see :mod:`diffmem.formats`), their memorized
rows split between ``locate`` and ``heldout`` by a seeded hash of the prompt. :func:`convert_manifest` writes any of
these files as a checked manifest.

Reference images (:func:`load_reference`, :func:`fetch_references`): a URL is downloaded once into a cache folder
(``~/.cache/diffmem``, or ``$DIFFMEM_CACHE``, or the ``cache`` argument) under the sha256 of the URL, with limits on
size and time, and only when the server says ``image/*`` and the body decodes as an image.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import formats
from .errors import ConfigError, PromptFileError
from .files import atomic_write_text
from .formats import ConversionSummary, SplitConfig, _where

__all__ = [
    "PROMPT_SUFFIXES",
    "MANIFEST_SPLITS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "ManifestEntry",
    "ReferenceFailure",
    "read_prompts",
    "read_prompt_records",
    "read_manifest",
    "read_entries",
    "write_manifest",
    "convert_manifest",
    "ConversionSummary",
    "SplitConfig",
    "split_entries",
    "resolve_references",
    "is_url",
    "default_cache_dir",
    "download_reference",
    "load_reference",
    "fetch_references",
]

logger = logging.getLogger(__name__)

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")
"""File suffixes that :func:`read_prompt_records` understands."""

MANIFEST_SPLITS = ("locate", "heldout", "nonmem", "never_seen")
"""Manifest splits: prompts used to locate memorization, held-out memorized prompts, non-memorized prompts (once-seen
training images or ordinary prompts), and ``never_seen`` images like the memorized ones that are in no training set
(the attack's control: what re-extraction reaches without memorization)."""

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
"""Largest reference download kept (20 MiB); reading stops as soon as a body grows past it."""

DEFAULT_TIMEOUT = 20.0
"""Seconds allowed for connecting and for each read of a reference download."""

DEFAULT_TOTAL_TIMEOUT = 120.0
"""Seconds allowed for a whole reference download, so that a server trickling bytes cannot stall a run."""

_PROMPT_KEYS = ("prompt", "caption")
_REFERENCE_KEYS = ("reference", "url")
_URL_SCHEMES = ("http", "https")
_DELIMITERS = ",;\t|"
_SNIFF_BYTES = 64 * 1024
_CHUNK_BYTES = 64 * 1024
_CACHE_ENV = "DIFFMEM_CACHE"
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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


# ----------------------------------------------------------------------------------------------------------------
# Manifests


@dataclass(frozen=True)
class ManifestEntry:
    """One prompt of a manifest.

    Args:
        prompt: The prompt.
        memorized: Whether the prompt is (meant to be) memorized.
        duplicates: How many times its image occurs in the training set (0 when it is not there, or not known, as
            in the published prompt sets).
        split: ``"locate"``, ``"heldout"``, ``"nonmem"`` or ``"never_seen"``.
        reference: The training image the prompt should replicate, if any: an absolute path (as read from a
            manifest), or an ``http(s)`` URL kept as a string.
        extra: Any other fields of the manifest line.
        source: The file the entry was read from (for messages; not compared).
        line: Its line in ``source`` (for messages; not compared).
        folder: The resolved folder that a local ``reference`` must lie in: the folder of the file that named it
            (not compared). ``None`` when the entry was built in code; then no containment check applies.
    """

    prompt: str
    memorized: bool
    duplicates: int
    split: str
    reference: Path | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False, repr=False)
    line: int | None = field(default=None, compare=False, repr=False)
    folder: Path | None = field(default=None, compare=False, repr=False)

    @property
    def row(self) -> str:
        """Where the entry came from, for messages: ``file:line`` when known, else the (shortened) prompt."""
        if self.source is not None and self.line is not None:
            return _where(self.source, self.line)
        if self.source is not None:
            return f"{self.source} (prompt {_short(self.prompt)!r})"
        return f"prompt {_short(self.prompt)!r}"


_MANIFEST_FIELDS = ("prompt", "memorized", "duplicates", "split", "reference")


def _short(text: str, limit: int = 60) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ReferenceProblem(Exception):
    """Why one reference cannot be used; the caller turns it into a one-line error naming the row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = _one_line(reason)


def _url_scheme(ref: str) -> str | None:
    """The scheme of ``ref`` when it looks like a URL (``x://`` or ``x:`` with a scheme longer than a drive letter)."""
    scheme = urllib.parse.urlsplit(ref).scheme
    return scheme.lower() if len(scheme) > 1 else None


def is_url(ref: Any) -> bool:
    """Whether a reference is an ``http(s)`` URL.

    Args:
        ref: A reference (path, string or ``None``).

    Returns:
        ``True`` for a string whose scheme is ``http`` or ``https``.
    """
    return isinstance(ref, str) and _url_scheme(ref.strip()) in _URL_SCHEMES


def _local_path(ref: str | os.PathLike[str], folder: Path | None, allow_outside: bool) -> Path:
    """Resolve a local reference against ``folder``, refuse it outside ``folder``, and require an existing file."""
    path = Path(ref)
    if folder is not None and not path.is_absolute():
        path = folder / path
    resolved = path.resolve()
    if folder is not None and not allow_outside:
        root = Path(folder).resolve()
        if not resolved.is_relative_to(root):
            raise _ReferenceProblem(
                f"lies outside the folder {root} (resolved to {resolved}); "
                "pass allow_outside=True (--allow-outside-references) to allow it"
            )
    if not resolved.exists():
        raise _ReferenceProblem(f"does not exist (looked for {resolved})")
    if not resolved.is_file():
        raise _ReferenceProblem(f"is not a file ({resolved})")
    return resolved


def _checked_reference(value: Any, folder: Path, allow_outside: bool, *, local: bool = True) -> Path | str:
    """A reference read from a file: an http(s) URL as a string, or an existing local file inside ``folder``."""
    if not isinstance(value, str) or not value.strip():
        kind = "a path or http(s) URL" if local else "an http(s) URL"
        raise _ReferenceProblem(f"must be {kind} string or null, got {value!r}")
    ref = value.strip()
    scheme = _url_scheme(ref)
    if scheme in _URL_SCHEMES:
        return ref
    if scheme is not None or not local:
        raise _ReferenceProblem(f"is not an http(s) URL{' or a local path' if local else ''}")
    return _local_path(ref, folder, allow_outside)


def _manifest_entry(path: Path, n: int, obj: dict[str, Any], folder: Path, allow_outside: bool) -> ManifestEntry:
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
        try:
            reference = _checked_reference(reference, folder, allow_outside)
        except _ReferenceProblem as err:
            raise _fail(path, n, f"reference {obj['reference']!r} {err.reason}") from None
    extra = {k: v for k, v in obj.items() if k not in _MANIFEST_FIELDS}
    return ManifestEntry(prompt, memorized, duplicates, split, reference, extra, source=path, line=n, folder=folder)


def read_manifest(path: str | os.PathLike[str], *, allow_outside: bool = False) -> list[ManifestEntry]:
    """Read a jsonl manifest and check every line.

    Args:
        path: The manifest; local ``reference`` paths inside it are relative to its folder, and ``http(s)`` URLs
            are kept as they are (see :func:`fetch_references`).
        allow_outside: Accept local references that lie outside the manifest's folder (after resolving symlinks
            and ``..``). Off by default, so that a manifest cannot make diffmem read e.g. ``../../etc/passwd``.

    Returns:
        The entries in file order, with local references resolved to absolute paths; each records its file, line
        and folder.

    Raises:
        PromptFileError: Missing or empty file, bad JSON, a missing or mistyped field, an unknown split, or a
            reference that does not exist or lies outside the folder; the message names the file and line.
    """
    p = Path(path).expanduser()
    text = _read_text(p)
    folder = p.resolve().parent
    entries = [_manifest_entry(p, n, obj, folder, allow_outside) for n, obj in _jsonl_objects(p, text)]
    if not entries:
        raise _fail(p, None, "empty manifest")
    return entries


def _is_manifest(path: Path) -> bool:
    """Whether ``path`` is a jsonl file whose first non-blank line is an object with ``split`` and ``memorized``."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8-sig") as fh:
            first = next((ln for ln in fh if ln.strip()), "")
        obj = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the prompt-file reader reports the problem with its line
    return isinstance(obj, dict) and "split" in obj and "memorized" in obj


def read_entries(
    path: str | os.PathLike[str],
    *,
    allow_outside: bool = False,
    memorized: bool | None = None,
    split: SplitConfig | None = None,
) -> list[ManifestEntry]:
    """Read a manifest, a published prompt set or a plain prompt file as manifest entries.

    * A ``.jsonl`` file whose first row has ``split`` and ``memorized`` fields is a manifest (:func:`read_manifest`).
    * Webster's ground-truth parquet (a ``.parquet`` with ``overfit_type``): ``MV``, ``RV`` and ``TV`` rows are
      memorized, ``N`` rows are not (split ``"nonmem"``); ``extra["kind"]`` records the type, and the ``url``
      column (the caption's own LAION image) is the reference. For ``RV`` and ``TV`` rows the images the
      generations matched are listed in ``retrieved_urls``, kept in ``extra`` with the other columns.
    * MemBench's csv (a ``.csv`` with a ``urls`` column holding a Python-style list): every row is memorized; the
      first URL is the reference and the others are kept in ``extra["extra_references"]``.
    * Any other prompt file (see :func:`read_prompt_records`) becomes unlabelled entries (``memorized=False``,
      split ``"nonmem"``) unless ``memorized`` labels them all; a ``reference`` column (a path relative to the
      file's folder, or a URL) or else a ``url`` column (any case: Wen et al.'s ``url``, NeMo's ``URL``) gives
      each entry's reference.

    Memorized rows that are not from a manifest are split between ``locate`` and ``heldout`` by
    :func:`diffmem.formats.assign_splits` (a seeded hash of the prompt). ``duplicates`` is 0: the published
    files do not give it. A row's other fields (not the prompt, caption, reference, url or manifest ones) are kept
    in ``extra``.

    Args:
        path: The manifest or prompt file.
        allow_outside: Accept local references outside the file's folder (see :func:`read_manifest`).
        memorized: Label every row of a file that carries no labels of its own (a plain prompt list, Wen's jsonl,
            NeMo's csv) as memorized (``True``) or not (``False``); ``None`` leaves them unlabelled. It must be
            ``None`` for a manifest, Webster's parquet and MemBench's csv.
        split: Seed and locate fraction of the split of memorized rows (default: seed 0, half and half).

    Returns:
        The entries in file order, each recording its file, line (or parquet row) and folder.

    Raises:
        PromptFileError: A missing or malformed file, an unknown ``overfit_type``, a ``url`` value that is not
            an http(s) URL, a local reference that does not exist or lies outside the folder, or ``memorized``
            given for a file with labels; the message names the file and line (or row).
    """
    return _read_labelled(Path(path).expanduser(), allow_outside, memorized, split)[1]


def _read_labelled(
    p: Path, allow_outside: bool, memorized: bool | None, split: SplitConfig | None
) -> tuple[str, list[ManifestEntry]]:
    """``(format, entries)`` of a file, as :func:`read_entries` describes."""
    own_labels = "carries its own labels; leave out memorized= (--memorized / --not-memorized)"
    if _is_manifest(p):
        if memorized is not None:
            raise _fail(p, None, f"a diffmem manifest {own_labels}")
        return "manifest", read_manifest(p, allow_outside=allow_outside)
    records = _read_records(p)
    fmt = formats.detect_format(p, records[0][1])
    if memorized is not None and formats.is_labelled(fmt):
        raise _fail(p, None, f"a {formats.format_name(fmt)} {own_labels}")
    folder = p.resolve().parent
    special = {*_PROMPT_KEYS, *_REFERENCE_KEYS, *_MANIFEST_FIELDS, "overfit_type", "urls"}
    rows = []
    for n, record in records:
        extra = {k: v for k, v in record.items() if str(k).strip().lower() not in special}
        label = bool(memorized)
        if fmt == "webster":
            label, extra["kind"] = formats.webster_label(p, n, record)
        if fmt == "membench":
            label = True
            urls = formats.membench_urls(p, n, record)
            refs = [_row_reference(p, n, "urls", url, folder, allow_outside) for url in urls]
            reference = refs[0] if refs else None
            if len(refs) > 1:
                extra["extra_references"] = refs[1:]
        else:
            ref_key = _find_key(record, _REFERENCE_KEYS)
            reference = _row_reference(p, n, ref_key, record.get(ref_key), folder, allow_outside) if ref_key else None
        rows.append((n, record["prompt"], label, reference, extra))
    splits = formats.assign_splits([r[1] for r in rows], [r[2] for r in rows], split)
    entries = [
        ManifestEntry(prompt, label, 0, s, reference, extra, source=p, line=n, folder=folder)
        for (n, prompt, label, reference, extra), s in zip(rows, splits)
    ]
    return fmt, entries


def _row_reference(p: Path, n: int, key: str, value: Any, folder: Path, allow_outside: bool) -> Path | str | None:
    """The checked reference of one prompt-file row: a local path only from a ``reference`` column, else a URL."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return _checked_reference(value, folder, allow_outside, local=key.strip().lower() == "reference")
    except _ReferenceProblem as err:
        raise _fail(p, n, f"field {key!r} {value!r} {err.reason}") from None


def write_manifest(entries: Iterable[ManifestEntry], path: str | os.PathLike[str]) -> Path:
    """Write a jsonl manifest (sorted keys) that :func:`read_manifest` reads back.

    Args:
        entries: Entries to write; local references are stored relative to the manifest's folder, URLs as they are.
        path: Output file, replaced atomically (temporary file, fsync, rename), so a reader never sees half a
            manifest; its folder is created when missing.

    Returns:
        The path written.
    """
    p = Path(path).expanduser()
    base = p.resolve().parent
    lines = []
    for entry in entries:
        clash = set(entry.extra) & set(_MANIFEST_FIELDS)
        if clash:
            raise ConfigError(f"extra fields {sorted(clash)} clash with manifest fields")
        if entry.reference is None:
            reference = None
        elif is_url(entry.reference):
            reference = str(entry.reference).strip()
        else:
            reference = Path(os.path.relpath(Path(entry.reference).resolve(), base)).as_posix()
        obj: dict[str, Any] = {
            **entry.extra,
            "prompt": entry.prompt,
            "memorized": entry.memorized,
            "duplicates": entry.duplicates,
            "split": entry.split,
            "reference": reference,
        }
        lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=False))
    atomic_write_text(p, "".join(line + "\n" for line in lines))
    return p


def convert_manifest(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    memorized: bool | None = None,
    split: SplitConfig | None = None,
    allow_outside: bool = False,
) -> ConversionSummary:
    """Write any supported prompt set as a checked manifest (:func:`write_manifest`, atomically).

    The source is read and every row checked (:func:`read_entries`) before anything is written, so a malformed
    file leaves ``path`` untouched. Sources: a diffmem manifest, Webster's ground-truth parquet, MemBench's csv,
    or a file without labels (Wen's jsonl, NeMo's csv, any prompt list), which needs ``memorized``.

    Args:
        source: The file to convert.
        path: The manifest to write (``.jsonl``). Local references are stored relative to its folder and must lie
            inside it unless ``allow_outside``.
        memorized: The label of every row of a source without labels (required there, refused elsewhere).
        split: Seed and locate fraction of the ``locate`` / ``heldout`` split of memorized rows (a manifest keeps
            its own splits).
        allow_outside: Accept local references outside the source's folder, and outside the output's folder.

    Returns:
        A :class:`ConversionSummary`; its ``text`` is one line with the rows by label and split.

    Raises:
        PromptFileError: A malformed source (naming the file and line or row), a source without labels and no
            ``memorized``, ``memorized`` for a source with labels, an output without a ``.jsonl`` suffix, or a
            local reference outside the output's folder.
    """
    src, dst = Path(source).expanduser(), Path(path).expanduser()
    if dst.suffix.lower() != ".jsonl":
        raise PromptFileError(f"{dst}: a manifest is a .jsonl file")
    fmt, entries = _read_labelled(src, allow_outside, memorized, split)
    if memorized is None and not formats.is_labelled(fmt):
        raise _fail(src, None, f"a {formats.format_name(fmt)} does not say which prompts are memorized; "
                               "give memorized=True or False (--memorized / --not-memorized)")
    base = dst.resolve().parent
    for e in entries:
        if e.reference is not None and not is_url(e.reference) and not allow_outside:
            if not Path(e.reference).resolve().is_relative_to(base):
                raise PromptFileError(
                    f"{e.row}: reference {str(e.reference)!r} lies outside the folder of {dst}; write the manifest "
                    "next to its images, or pass allow_outside=True (--allow-outside-references)"
                )
    write_manifest(entries, dst)
    counts: dict[str, dict[str, int]] = {"memorized": {}, "not memorized": {}}
    for e in sorted(entries, key=lambda e: MANIFEST_SPLITS.index(e.split)):  # splits in their usual order
        by_split = counts["memorized" if e.memorized else "not memorized"]
        by_split[e.split] = by_split.get(e.split, 0) + 1
    summary = ConversionSummary(src, dst, fmt, counts)
    logger.debug("%s", summary.text)
    return summary


def split_entries(entries: Iterable[ManifestEntry], split: str) -> list[ManifestEntry]:
    """The entries of one split.

    Args:
        entries: Manifest entries.
        split: ``"locate"``, ``"heldout"``, ``"nonmem"`` or ``"never_seen"``.

    Returns:
        The entries whose ``split`` matches, in order.
    """
    if split not in MANIFEST_SPLITS:
        raise ConfigError(f"split={split!r} is invalid: expected one of {', '.join(MANIFEST_SPLITS)}")
    return [e for e in entries if e.split == split]


# ----------------------------------------------------------------------------------------------------------------
# Where references come from


def _read_reference_index(index: Path, allow_outside: bool) -> dict[str, str | None]:
    """Prompt -> reference from a folder's ``references.jsonl`` (``{"prompt": ..., "reference": ...}`` a line)."""
    text = _read_text(index)
    folder = index.resolve().parent
    by_prompt: dict[str, str | None] = {}
    first_line: dict[str, int] = {}
    for n, obj in _jsonl_objects(index, text):
        for name in ("prompt", "reference"):
            if name not in obj:
                raise _fail(index, n, f"missing field {name!r} (each line needs 'prompt' and 'reference')")
        prompt = _clean_prompt(index, n, "prompt", obj["prompt"])
        reference: str | None = None
        if obj["reference"] is not None:
            try:
                reference = str(_checked_reference(obj["reference"], folder, allow_outside))
            except _ReferenceProblem as err:
                raise _fail(index, n, f"reference {obj['reference']!r} {err.reason}") from None
        if prompt in by_prompt and by_prompt[prompt] != reference:
            earlier = first_line[prompt]
            raise _fail(index, n, f"prompt {_short(prompt)!r} already has another reference on line {earlier}")
        by_prompt[prompt] = reference
        first_line.setdefault(prompt, n)
    if not by_prompt:
        raise _fail(index, None, "empty file")
    return by_prompt


def _as_str(ref: Path | str | None) -> str | None:
    return None if ref is None else str(ref)


def resolve_references(
    spec: str | os.PathLike[str] | None,
    entries: Sequence[ManifestEntry],
    *,
    allow_outside: bool = False,
) -> list[str | None]:
    """The reference of each entry: from the entries themselves, another manifest, or a folder.

    Args:
        spec: ``None`` for the entries' own references; a folder holding ``references.jsonl`` (one
            ``{"prompt": ..., "reference": ...}`` object a line, paths relative to the folder, or URLs); or a
            manifest or prompt file read with :func:`read_entries` (e.g. a NeMo csv with its ``URL`` column).
            Prompts are matched exactly; a prompt that ``spec`` does not give a reference keeps its own.
        entries: The entries to find references for.
        allow_outside: Accept local references outside the folder of the file that names them.

    Returns:
        One reference per entry, in order: an absolute path or an http(s) URL as a string, or ``None``. Local
        paths were checked (inside their folder, existing) here; :func:`load_reference` loads them.

    Raises:
        PromptFileError: ``spec`` is missing, or a line of it is malformed, names a missing file or one outside
            its folder; the message names the file and line.
    """
    if spec is None:
        return [_as_str(e.reference) for e in entries]
    p = Path(spec).expanduser()
    if p.is_dir():
        index = p / "references.jsonl"
        if not index.is_file():
            raise _fail(p, None, 'a reference folder needs a references.jsonl ({"prompt": ..., "reference": ...} '
                                 "a line)")
        by_prompt = _read_reference_index(index, allow_outside)
    elif p.exists():
        by_prompt = {}
        for other in read_entries(p, allow_outside=allow_outside):
            if other.reference is not None:
                by_prompt.setdefault(other.prompt, str(other.reference))
    else:
        raise _fail(p, None, "no such file or folder")
    found = [by_prompt.get(e.prompt) for e in entries]
    logger.info("references from %s for %d of %d prompts", p, sum(r is not None for r in found), len(entries))
    return [ref if ref is not None else _as_str(e.reference) for ref, e in zip(found, entries)]


# ----------------------------------------------------------------------------------------------------------------
# Reference images: download cache and loading


def default_cache_dir() -> Path:
    """The folder reference downloads are cached in when no ``cache`` argument is given.

    Returns:
        ``$DIFFMEM_CACHE`` when set, else ``~/.cache/diffmem``. Nothing is created here.
    """
    env = os.environ.get(_CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffmem"


def _cache_dir(cache: str | os.PathLike[str] | None) -> Path:
    return Path(cache).expanduser() if cache is not None else default_cache_dir()


def _cached_file(url: str, folder: Path) -> Path | None:
    """The cached download of ``url`` in ``folder``, if any (``<sha256 of the url><suffix>``)."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    if not folder.is_dir():
        return None
    return next((p for p in sorted(folder.glob(f"{digest}.*")) if p.is_file()), None)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would also follow one to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        if _url_scheme(newurl) not in _URL_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_body(url: str, timeout: float, max_bytes: int, total_timeout: float | None) -> bytes:
    """GET ``url`` within the limits; the body of an ``image/*`` response, or a :class:`_ReferenceProblem`."""
    request = urllib.request.Request(url, headers={"User-Agent": "diffmem", "Accept": "image/*"})
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    start = time.monotonic()
    timed_out = f"timed out (limit {timeout:g} s to connect and for each read)"
    try:
        with opener.open(request, timeout=timeout) as response:
            content_type = response.headers.get("Content-Type")
            if not content_type or not response.headers.get_content_type().startswith("image/"):
                raise _ReferenceProblem(f"is not an image (content type {content_type!r})")
            length = response.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise _ReferenceProblem(f"is too large ({int(length)} bytes; the limit is {max_bytes})")
            chunks, size = [], 0
            while True:
                chunk = response.read1(_CHUNK_BYTES)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise _ReferenceProblem(f"is too large (more than {max_bytes} bytes)")
                if total_timeout is not None and time.monotonic() - start > total_timeout:
                    raise _ReferenceProblem(f"timed out (download took over {total_timeout:g} s)")
                chunks.append(chunk)
    except urllib.error.HTTPError as err:
        err.close()
        raise _ReferenceProblem(f"could not be downloaded: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise _ReferenceProblem(timed_out) from None
        raise _ReferenceProblem(f"could not be downloaded ({err.reason})") from None
    except TimeoutError:
        raise _ReferenceProblem(timed_out) from None
    except (http.client.HTTPException, OSError, ValueError) as err:
        raise _ReferenceProblem(f"could not be downloaded ({type(err).__name__}: {err})") from None
    return b"".join(chunks)


def _image_suffix(body: bytes) -> str:
    """The file suffix of an image body after PIL has verified it, or a :class:`_ReferenceProblem`."""
    try:
        with Image.open(io.BytesIO(body)) as img:
            fmt = img.format
            img.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types on untrusted bytes; all mean "not an image"
        raise _ReferenceProblem(f"is not an image (the body does not decode: {type(err).__name__}: {err})") from None
    if fmt in _SUFFIXES:
        return _SUFFIXES[fmt]
    by_format = {f: ext for ext, f in Image.registered_extensions().items()}
    return by_format.get(fmt or "", ".img")


def _store(folder: Path, name: str, body: bytes) -> Path:
    """Write ``body`` to ``folder / name`` atomically (temp file in ``folder``, fsync, os.replace)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    except OSError as err:
        raise _ReferenceProblem(f"could not be cached in {folder} ({err})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _ReferenceProblem(f"could not be cached in {folder} ({err})") from None
        raise
    return folder / name


def _download(
    url: str, cache: str | os.PathLike[str] | None, timeout: float, max_bytes: int, total_timeout: float | None
) -> Path:
    """The cached file of ``url``, downloading it first when it is not in the cache."""
    folder = _cache_dir(cache)
    hit = _cached_file(url, folder)
    if hit is not None:
        logger.debug("reference %s from the cache (%s)", url, hit)
        return hit
    body = _fetch_body(url, timeout, max_bytes, total_timeout)
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    path = _store(folder, digest + _image_suffix(body), body)
    logger.info("downloaded %s (%d bytes) to %s", url, len(body), path)
    return path


def _check_limits(timeout: float, max_bytes: int, total_timeout: float | None) -> None:
    if not timeout > 0:
        raise ConfigError(f"timeout={timeout!r} is invalid: must be > 0 seconds")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError(f"max_bytes={max_bytes!r} is invalid: must be an integer >= 1")
    if total_timeout is not None and not total_timeout > 0:
        raise ConfigError(f"total_timeout={total_timeout!r} is invalid: must be > 0 seconds or None")


def _row_label(row: ManifestEntry | str | None) -> str | None:
    if isinstance(row, ManifestEntry):
        return row.row
    return None if row is None else _one_line(str(row))


def _message(row: ManifestEntry | str | None, ref: Any, reason: str) -> str:
    label = _row_label(row)
    text = f"reference {_one_line(str(ref))!r} {reason}"
    return text if label is None else f"{label}: {text}"


def _reference_file(
    ref: str | os.PathLike[str],
    folder: Path | None,
    *,
    cache: str | os.PathLike[str] | None,
    allow_outside: bool,
    timeout: float,
    max_bytes: int,
    total_timeout: float | None,
) -> Path:
    """The local file of a reference: the cached download of a URL, or a checked local path."""
    if isinstance(ref, str):
        text = ref.strip()
        scheme = _url_scheme(text)
        if scheme in _URL_SCHEMES:
            return _download(text, cache, timeout, max_bytes, total_timeout)
        if scheme is not None:
            raise _ReferenceProblem("is not an http(s) URL or a local path")
    return _local_path(ref, folder, allow_outside)


def _own_folder(ref: Any, row: ManifestEntry | str | None) -> Path | None:
    """The containment folder for ``ref``: the row's folder when ``ref`` is the row's own reference."""
    if isinstance(row, ManifestEntry) and row.reference is not None and os.fspath(ref) == os.fspath(row.reference):
        return row.folder
    return None


def download_reference(
    url: str,
    *,
    row: ManifestEntry | str | None = None,
    cache: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
) -> Path:
    """Download a reference image once into the cache and return the cached file.

    The file is named after the sha256 of the URL plus the suffix of the image format, and written atomically
    (temp file in the cache folder, fsync, ``os.replace``) only after the server answered ``image/*``, the body
    stayed within ``max_bytes`` and PIL verified it. Nothing outside the cache folder is written; the folder is
    created only when a download is stored. A URL already cached is not requested again.

    Args:
        url: An ``http(s)`` URL.
        row: The manifest entry (or a label) that names the URL, for messages.
        cache: The cache folder; default :func:`default_cache_dir` (``$DIFFMEM_CACHE`` or ``~/.cache/diffmem``).
        timeout: Seconds allowed to connect and for each read.
        max_bytes: Largest body accepted; reading stops as soon as the body grows past it.
        total_timeout: Seconds allowed for the whole download, or ``None`` for no overall limit.

    Returns:
        The path of the cached image.

    Raises:
        PromptFileError: One line naming the row and the reason (HTTP status, not an image, too large, timed out).
    """
    _check_limits(timeout, max_bytes, total_timeout)
    if not is_url(url):
        raise PromptFileError(_message(row, url, "is not an http(s) URL"))
    try:
        return _download(url.strip(), cache, timeout, max_bytes, total_timeout)
    except _ReferenceProblem as err:
        raise PromptFileError(_message(row, url, err.reason)) from None


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """An image file as uint8 RGB (EXIF orientation applied), optionally resized to ``(height, width)``."""
    try:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:
        raise _ReferenceProblem(f"is not an image ({path})") from None
    except Image.DecompressionBombError as err:
        raise _ReferenceProblem(f"is too large to decode ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise _ReferenceProblem(f"cannot be read as an image ({path}: {err})") from None
    if size is not None:
        height, width = size
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def load_reference(
    ref: str | os.PathLike[str] | ManifestEntry,
    size: tuple[int, int] | None = None,
    *,
    row: ManifestEntry | str | None = None,
    cache: str | os.PathLike[str] | None = None,
    allow_outside: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
) -> np.ndarray:
    """Load a reference image as uint8 RGB, from a local file or an http(s) URL (through the download cache).

    When ``row`` is a manifest entry and ``ref`` is that entry's own reference (or ``ref`` is the entry itself),
    a local path must lie inside the entry's ``folder`` (the folder of the file that named it), after resolving
    symlinks and ``..``. References that came from elsewhere (:func:`resolve_references`) were checked where
    they were read.

    Args:
        ref: A path, an http(s) URL, or a :class:`ManifestEntry` (its ``reference`` is loaded).
        size: Optional ``(height, width)`` to resize to (bicubic).
        row: The manifest entry (or a label such as ``"file:line"``) the reference belongs to, for messages and
            for the containment check.
        cache: The download cache folder (see :func:`download_reference`).
        allow_outside: Accept a local reference outside its manifest's folder.
        timeout: Seconds allowed to connect and for each read of a download.
        max_bytes: Largest download accepted.
        total_timeout: Seconds allowed for a whole download, or ``None``.

    Returns:
        An ``(H, W, 3)`` uint8 array (EXIF orientation applied).

    Raises:
        PromptFileError: One line naming the row (``file:line`` or its prompt) when the reference is missing,
            outside its folder, not an image, or cannot be downloaded.
    """
    _check_limits(timeout, max_bytes, total_timeout)
    if isinstance(ref, ManifestEntry):
        row = ref if row is None else row
        if ref.reference is None:
            raise PromptFileError(f"{ref.row}: has no reference image")
        ref = ref.reference
    try:
        path = _reference_file(
            ref, _own_folder(ref, row), cache=cache, allow_outside=allow_outside, timeout=timeout,
            max_bytes=max_bytes, total_timeout=total_timeout,
        )
        return _decode(path, size)
    except _ReferenceProblem as err:
        raise PromptFileError(_message(row, ref, err.reason)) from None


@dataclass(frozen=True)
class ReferenceFailure:
    """A reference that could not be fetched, for the run's report.

    Args:
        row: Where the entry came from (``file:line``, or its prompt).
        prompt: The entry's prompt.
        reference: The reference as given (path or URL).
        reason: Why it failed (e.g. ``"could not be downloaded: HTTP 404 Not Found"``).
    """

    row: str
    prompt: str
    reference: str
    reason: str

    @property
    def message(self) -> str:
        """The one-line message logged (or raised) for this failure."""
        return f"{self.row}: reference {_one_line(self.reference)!r} {self.reason}"

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready dict of the failure."""
        return {"row": self.row, "prompt": self.prompt, "reference": self.reference, "reason": self.reason}


def _verify_local(path: Path) -> None:
    try:
        with Image.open(path) as img:
            img.verify()
    except UnidentifiedImageError:
        raise _ReferenceProblem(f"is not an image ({path})") from None
    except Exception as err:  # noqa: BLE001 - as in _image_suffix: any PIL error means an unusable file
        raise _ReferenceProblem(f"cannot be read as an image ({path}: {type(err).__name__}: {err})") from None


def fetch_references(
    entries: Iterable[ManifestEntry],
    *,
    skip_missing: bool = False,
    cache: str | os.PathLike[str] | None = None,
    allow_outside: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
) -> tuple[list[ManifestEntry], list[ReferenceFailure]]:
    """Make sure every entry's reference is usable before a run: download URLs into the cache, check local files.

    Each URL is requested at most once per call (a URL that failed for one row fails the same way for the others
    without a new request) and not at all when it is already cached. Local references must exist, lie inside
    their entry's folder and decode as images. Entries keep their references as given, so a later
    ``load_reference(entry, cache=cache)`` reads URLs from the cache without a request.

    Args:
        entries: Manifest entries (entries without a reference pass through).
        skip_missing: Log each failure (one line per row) and go on with the other rows; otherwise the first
            failure raises.
        cache: The download cache folder (see :func:`download_reference`).
        allow_outside: Accept local references outside their manifest's folder.
        timeout: Seconds allowed to connect and for each read of a download.
        max_bytes: Largest download accepted.
        total_timeout: Seconds allowed for a whole download, or ``None``.

    Returns:
        ``(entries_ok, failures)``: the entries whose reference is usable (or absent), in order, and one
        :class:`ReferenceFailure` per failed row (empty unless ``skip_missing``).

    Raises:
        PromptFileError: Without ``skip_missing``, the first failure, naming its row and the reason.
    """
    _check_limits(timeout, max_bytes, total_timeout)
    ok: list[ManifestEntry] = []
    failures: list[ReferenceFailure] = []
    failed_urls: dict[str, str] = {}
    total = 0
    for entry in entries:
        total += 1
        ref = entry.reference
        if ref is None:
            ok.append(entry)
            continue
        try:
            key = str(ref).strip()
            if key in failed_urls:
                raise _ReferenceProblem(failed_urls[key])
            try:
                path = _reference_file(
                    ref, entry.folder, cache=cache, allow_outside=allow_outside, timeout=timeout,
                    max_bytes=max_bytes, total_timeout=total_timeout,
                )
            except _ReferenceProblem as err:
                if is_url(ref):
                    failed_urls[key] = err.reason
                raise
            if not is_url(ref):
                _verify_local(path)
        except _ReferenceProblem as err:
            failure = ReferenceFailure(entry.row, entry.prompt, str(ref), err.reason)
            if not skip_missing:
                raise PromptFileError(failure.message) from None
            logger.warning("%s; skipped", failure.message)
            failures.append(failure)
            continue
        ok.append(entry)
    if failures:
        logger.warning("%d of %d references failed; going on with %d entries", len(failures), total, len(ok))
    return ok, failures
