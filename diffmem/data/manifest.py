"""Manifests: jsonl files written next to the images they reference, one entry per prompt.

::

    {"prompt": "the zorblax emblem", "memorized": true, "duplicates": 32, "reference": "train/0007.png",
     "split": "locate"}

``reference`` is a path relative to the manifest's folder (and must lie inside it, after resolving symlinks and
``..``, unless the caller allows otherwise) or an ``http(s)`` URL. :func:`read_entries` reads either a manifest or
a prompt file (:mod:`diffmem.data.prompts`); a plain prompt file becomes unlabelled ``nonmem`` entries whose
``reference`` comes from a ``reference`` or ``url`` column when there is one (Wen et al.'s ``url``, NeMo's
``URL``). Two published sets carry labels and are read as manifests: Webster's ground-truth parquet files and
MemBench's csv (see :mod:`diffmem.data.formats`), their memorized rows split between ``locate`` and ``heldout`` by
a seeded hash of the prompt. :func:`convert_manifest` writes any of these files as a checked manifest.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PromptFileError
from ..files import atomic_write_text
from . import formats
from .formats import ConversionSummary, SplitConfig, _where
from .prompts import (
    _PROMPT_KEYS,
    _clean_prompt,
    _fail,
    _find_key,
    _jsonl_objects,
    _one_line,
    _read_records,
    _read_text,
    _short,
)

__all__ = [
    "MANIFEST_SPLITS",
    "ManifestEntry",
    "read_manifest",
    "read_entries",
    "write_manifest",
    "convert_manifest",
    "split_entries",
    "is_url",
]

logger = logging.getLogger(__name__)

MANIFEST_SPLITS = ("locate", "heldout", "nonmem", "never_seen")
"""Manifest splits: prompts used to locate memorization, held-out memorized prompts, non-memorized prompts (once-seen
training images or ordinary prompts), and ``never_seen`` images like the memorized ones that are in no training set
(the attack's control: what re-extraction reaches without memorization)."""

_REFERENCE_KEYS = ("reference", "url")
_URL_SCHEMES = ("http", "https")


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


# ----------------------------------------------------------------------------------------------------------------
# References named by a file: an http(s) URL is kept as it is, a local path must exist inside the file's folder


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


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing manifests


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
    :func:`diffmem.data.formats.assign_splits` (a seeded hash of the prompt). ``duplicates`` is 0: the published
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
