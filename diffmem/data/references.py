"""Reference images: where they come from, loading them, and checking them all before a run.

:func:`resolve_references` finds each entry's reference (its own, another manifest's, or a folder's
``references.jsonl``); :func:`load_reference` loads one as uint8 RGB, from a local file or an ``http(s)`` URL
through the download cache (:mod:`diffmem.data.download`); :func:`fetch_references` makes sure every reference of a
run is usable before the run starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PromptFileError
from .download import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    _check_limits,
    _download,
    _message,
)
from .manifest import (
    _URL_SCHEMES,
    ManifestEntry,
    _checked_reference,
    _local_path,
    _ReferenceProblem,
    _url_scheme,
    is_url,
    read_entries,
)
from .prompts import _clean_prompt, _fail, _jsonl_objects, _one_line, _read_text, _short

__all__ = [
    "ReferenceFailure",
    "resolve_references",
    "load_reference",
    "fetch_references",
]

logger = logging.getLogger(__name__)


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
