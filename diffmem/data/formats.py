"""Published prompt-set formats: Webster's ground-truth parquet files, MemBench's csv, and the seeded split.

These readers know the layout of each published file; :mod:`diffmem.data` turns their rows into manifest entries
(:func:`diffmem.data.read_entries`) and writes checked manifests (:func:`diffmem.data.convert_manifest`).

* **Webster's ground truth** (``sdv1_bb_edge_groundtruth.parquet`` and its siblings for SD v2, DeepFloyd IF,
  Midjourney and Realistic Vision): one row per caption with ``caption``, ``url`` and ``overfit_type``, plus
  columns such as ``retrieved_urls``, ``gen_seeds`` and ``mse_real_gen``. ``overfit_type`` maps to labels as
  :data:`WEBSTER_LABELS` says: ``MV`` (matching verbatim), ``RV`` (retrieval verbatim) and ``TV`` (template
  verbatim) are memorized, ``N`` (none) is not. Reading parquet needs pyarrow (``pip install 'diffmem[formats]'``).
* **MemBench** (``SD1_final.csv``): an unnamed index column, ``prompt``, and ``urls`` holding a Python-style list
  of image URLs (``"['http://a.jpg', 'http://b.jpg']"``, parsed with :func:`ast.literal_eval`). Every row is a
  memorized prompt.

Memorized rows of these sets are split between ``locate`` and ``heldout`` by :func:`assign_splits`: a seeded hash
of the prompt, so the split does not depend on the order of the rows and identical prompts share a split.
"""

from __future__ import annotations

import ast
import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DiffmemConfig, require
from ..errors import ConfigError, PromptFileError

__all__ = [
    "WEBSTER_LABELS",
    "SplitConfig",
    "ConversionSummary",
    "assign_splits",
    "detect_format",
    "format_name",
    "is_labelled",
    "read_parquet_rows",
    "webster_label",
    "membench_urls",
]

WEBSTER_LABELS: dict[str, bool] = {"MV": True, "RV": True, "TV": True, "N": False}
"""Webster's ``overfit_type`` -> memorized: matching verbatim, retrieval verbatim, template verbatim, none."""

_FORMAT_NAMES = {
    "manifest": "diffmem manifest",
    "webster": "Webster ground-truth parquet",
    "membench": "MemBench csv",
    "nemo": "NeMo csv",
    "wen": "Wen jsonl",
    "prompts": "prompt list",
}
_LABELLED = ("manifest", "webster", "membench")
_INSTALL = "pip install 'diffmem[formats]' (or pip install pyarrow)"


def _where(path: Path, row: int | None) -> str:
    """``file:line`` for text files, ``file row N`` for parquet (which has rows, not lines)."""
    if row is None:
        return str(path)
    return f"{path} row {row}" if path.suffix.lower() == ".parquet" else f"{path}:{row}"


def _fail(path: Path, row: int | None, problem: str) -> PromptFileError:
    return PromptFileError(f"{_where(path, row)}: {' '.join(str(problem).split())}")


@dataclass(frozen=True)
class SplitConfig(DiffmemConfig):
    """How memorized rows of a published set are split between ``locate`` and ``heldout``.

    Args:
        seed: Mixed into the hash of each prompt; another seed gives another split.
        locate_fraction: Share of the distinct memorized prompts that go to ``locate`` (rounded half up); the rest
            go to ``heldout``. ``0`` puts every memorized prompt in ``heldout``, ``1`` every one in ``locate``.
    """

    seed: int = 0
    locate_fraction: float = 0.5

    def check(self) -> None:
        require(not isinstance(self.seed, bool) and isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed,
                "must be an integer >= 0")
        fraction = self.locate_fraction
        require(not isinstance(fraction, bool) and isinstance(fraction, (int, float)) and 0 <= fraction <= 1,
                "locate_fraction", fraction, "must be in [0, 1]")


def _split_key(prompt: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()


def assign_splits(prompts: Sequence[str], memorized: Sequence[bool], config: SplitConfig | None = None) -> list[str]:
    """The split of each row: ``nonmem`` for non-memorized rows, ``locate`` or ``heldout`` for memorized ones.

    The distinct memorized prompts are ranked by ``sha256(f"{seed}\\0{prompt}")``; the first
    ``floor(locate_fraction * n + 0.5)`` go to ``locate``, the others to ``heldout``. The result depends on the
    set of prompts and the seed only, not on the row order, and a prompt that occurs twice gets one split (so no
    prompt is both located on and evaluated on).

    Args:
        prompts: The prompt of each row.
        memorized: Whether each row is memorized.
        config: Seed and locate fraction (default ``SplitConfig()``: seed 0, half and half).

    Returns:
        One split per row, in order.
    """
    config = config or SplitConfig()
    if len(prompts) != len(memorized):
        raise ValueError(f"{len(prompts)} prompts but {len(memorized)} labels")
    distinct = sorted({p for p, m in zip(prompts, memorized) if m}, key=lambda p: (_split_key(p, config.seed), p))
    locate = set(distinct[: math.floor(config.locate_fraction * len(distinct) + 0.5)])
    return [("locate" if p in locate else "heldout") if m else "nonmem" for p, m in zip(prompts, memorized)]


def _lower(columns: Iterable[str]) -> set[str]:
    return {str(c).strip().lower() for c in columns}


def detect_format(path: str | os.PathLike[str], columns: Iterable[str]) -> str:
    """Which published layout a prompt file has, from its suffix and columns (not from its name).

    Args:
        path: The file (its suffix matters).
        columns: The fields of its rows (a csv header, a parquet schema, the keys of the first jsonl object).

    Returns:
        ``"webster"`` (a parquet with ``overfit_type``), ``"membench"`` (a csv with a ``urls`` column),
        ``"nemo"`` (a csv with ``Caption``, ``URL`` and ``Index``), ``"wen"`` (a jsonl with ``caption``, ``index``
        and ``url``) or ``"prompts"`` (anything else). Only ``webster`` and ``membench`` carry labels; the others
        are named for messages. A diffmem manifest is recognised by :func:`diffmem.data.read_entries`.
    """
    suffix = Path(path).suffix.lower()
    cols = _lower(columns)
    if suffix == ".parquet" and "overfit_type" in cols:
        return "webster"
    if suffix in (".csv", ".tsv") and "urls" in cols:
        return "membench"
    if suffix in (".csv", ".tsv") and {"caption", "url", "index"} <= cols:
        return "nemo"
    if suffix == ".jsonl" and {"caption", "index", "url"} <= cols:
        return "wen"
    return "prompts"


def format_name(fmt: str) -> str:
    """A readable name of a format returned by :func:`detect_format` (or ``"manifest"``)."""
    return _FORMAT_NAMES.get(fmt, fmt)


def is_labelled(fmt: str) -> bool:
    """Whether files of format ``fmt`` say which prompts are memorized (a manifest, Webster's, MemBench's)."""
    return fmt in _LABELLED


@dataclass(frozen=True)
class ConversionSummary:
    """What :func:`diffmem.data.convert_manifest` wrote.

    Args:
        source: The file read.
        path: The manifest written.
        format: The source's format (see :func:`detect_format`, or ``"manifest"``).
        counts: Rows by label, then split (in the order to print, splits without rows left out):
            ``{"memorized": {"locate": 250, "heldout": 250}, "not memorized": {}}``.
    """

    source: Path
    path: Path
    format: str
    counts: dict[str, dict[str, int]]

    @property
    def rows(self) -> int:
        """The number of rows written."""
        return sum(sum(by_split.values()) for by_split in self.counts.values())

    @property
    def text(self) -> str:
        """One line: the rows written, by label and split."""
        parts = []
        for label, by_split in self.counts.items():
            splits = ", ".join(f"{s} {n}" for s, n in by_split.items() if n)
            parts.append(f"{label} {sum(by_split.values())}" + (f" ({splits})" if splits else ""))
        return (f"wrote {self.path}: {self.rows} rows from {self.source} ({format_name(self.format)}); "
                + "; ".join(parts))


# ----------------------------------------------------------------------------------------------------------------
# Parquet


def _plain(value: Any) -> Any:
    """A parquet value as JSON-ready Python: non-finite floats become ``None``, other unknown types strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def read_parquet_rows(path: str | os.PathLike[str]) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Read every row of a parquet file (needs pyarrow).

    Args:
        path: The parquet file.

    Returns:
        ``(columns, rows)``: the column names (without pandas' ``__index_level_N__`` index columns) and one
        ``(row number from 1, {column: value})`` per row, values as JSON-ready Python (lists stay lists,
        non-finite floats become ``None``).

    Raises:
        PromptFileError: pyarrow is not installed (the message says what to install), or the file is missing or
            not a readable parquet file.
    """
    p = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _fail(p, None, f"reading parquet files needs pyarrow: {_INSTALL}") from None
    if not p.is_file():
        raise _fail(p, None, "no such file" if not p.exists() else "not a file")
    try:
        table = pq.read_table(p)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...; all mean "unreadable"
        raise _fail(p, None, f"not a readable parquet file ({type(err).__name__}: {err})") from None
    columns = [c for c in table.column_names if not c.startswith("__index_level_")]
    rows = [(n, {c: _plain(r[c]) for c in columns}) for n, r in enumerate(table.select(columns).to_pylist(), start=1)]
    return columns, rows


# ----------------------------------------------------------------------------------------------------------------
# Labels and references of the published sets


def _column(record: dict[str, Any], name: str) -> str | None:
    """The key of ``record`` named ``name`` (any case, surrounding spaces ignored)."""
    return next((k for k in record if str(k).strip().lower() == name), None)


def webster_label(path: str | os.PathLike[str], row: int, record: dict[str, Any]) -> tuple[bool, str]:
    """The label of one row of Webster's ground truth, from its ``overfit_type``.

    Args:
        path: The file, for messages.
        row: The row number, for messages.
        record: The row.

    Returns:
        ``(memorized, kind)``: ``kind`` is the type code (``MV``, ``RV``, ``TV`` or ``N``); see
        :data:`WEBSTER_LABELS`.

    Raises:
        PromptFileError: The type is missing or not one of the four codes; the message names the file and row.
    """
    key = _column(record, "overfit_type")
    value = record.get(key) if key is not None else None
    kind = value.strip().upper() if isinstance(value, str) else value
    if kind not in WEBSTER_LABELS:
        raise _fail(Path(path), row, f"field 'overfit_type' is {value!r}; expected one of {', '.join(WEBSTER_LABELS)}")
    return WEBSTER_LABELS[kind], kind


def membench_urls(path: str | os.PathLike[str], row: int, record: dict[str, Any]) -> list[str]:
    """The image URLs of one MemBench row, parsed from its ``urls`` field with :func:`ast.literal_eval`.

    Args:
        path: The file, for messages.
        row: The line of the row, for messages.
        record: The row.

    Returns:
        The non-blank URLs, stripped, in order (empty when the field is empty or ``[]``). Whether each is an
        http(s) URL is checked by the caller.

    Raises:
        PromptFileError: The field is not a Python-style list (or tuple) of strings; the message names the file
            and line.
    """
    key = _column(record, "urls")
    text = record.get(key) if key is not None else None
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if not isinstance(text, str):
        raise _fail(Path(path), row, f"field 'urls' is {type(text).__name__}, not a string")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        problem = f"field 'urls' is not a Python-style list of URLs ({type(err).__name__})"
        raise _fail(Path(path), row, problem) from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(Path(path), row, f"field 'urls' must be a list of URL strings, got {_short(repr(value))}")
    return [v.strip() for v in value if v.strip()]


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
