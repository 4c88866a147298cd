"""The page model handed to the template: sections made of tables, plots, definitions, notes and galleries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .labels import NOT_MEASURED, _fmt, _guess_kind, _humanize



@dataclass
class Cell:
    """One table cell: its text, and whether it holds a number (right-aligned)."""

    text: str
    numeric: bool = False
    css: str = ""
    code: bool = False


@dataclass
class Table:
    """A table with a header row; rendered inside a horizontally scrolling container."""

    columns: list[str]
    rows: list[list[Cell]]
    numeric_columns: list[bool] = field(default_factory=list)
    caption: str | None = None


@dataclass
class Plot:
    """A plot embedded as a PNG data URI, shown ``width`` CSS pixels wide at most."""

    uri: str
    width: int
    alt: str
    wide: bool = False


@dataclass
class GalleryCell:
    """One image of a gallery row with its label, score and replication verdict."""

    label: str
    uri: str
    width: int
    height: int
    pixelated: bool
    score: str
    replicated: bool | None
    detail: str = ""


@dataclass
class GalleryRow:
    """One prompt of a gallery: the prompt text, its split and duplication, and its images."""

    prompt: str
    details: str
    cells: list[GalleryCell]


@dataclass
class Block:
    """A piece of a section: ``table``, ``tables`` (side by side where there is room), ``plots``,
    ``definitions``, ``paragraph``, ``note`` or ``gallery``."""

    kind: str
    table: Table | None = None
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    definitions: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""
    heading: str = ""
    gallery: list[GalleryRow] = field(default_factory=list)


@dataclass
class Section:
    """A section of the page, listed in the table of contents."""

    id: str
    title: str
    intro: str
    blocks: list[Block] = field(default_factory=list)


def _num_cell(value: Any, kind: str) -> Cell:
    text = _fmt(value, kind)
    numeric = kind not in ("text", "bool") and text != NOT_MEASURED and not isinstance(value, str)
    return Cell(text, numeric=numeric, css="missing" if text == NOT_MEASURED else "")


def _kv_table(items: Iterable[tuple[str, Any, str]], value_header: str = "Value",
              caption: str | None = None, key_header: str = "Quantity") -> Table:
    """A two-column table from ``(label, value, kind)`` triples; settings are left-aligned like text."""
    rows = []
    for label, value, kind in items:
        cell = _num_cell(value, kind)
        cell.numeric = cell.numeric and kind != "setting"
        rows.append([Cell(label), cell])
    numeric = bool(rows) and all(r[1].numeric or r[1].css == "missing" for r in rows)
    if not numeric:  # a mix of text and numbers reads best left-aligned
        for row in rows:
            row[1].numeric = False
    return Table([key_header, value_header], rows, [False, numeric], caption)


def _scalar_items(d: Mapping[str, Any], skip: Sequence[str] = ()) -> list[tuple[str, Any, str]]:
    """``(label, value, kind)`` for every non-private entry, one level of nesting flattened."""
    out: list[tuple[str, Any, str]] = []
    for key, value in d.items():
        key = str(key)
        if key.startswith("_") or key in skip:
            continue
        if isinstance(value, Mapping):
            for sub, v in value.items():
                if not isinstance(v, Mapping):
                    out.append((f"{_humanize(key)}: {_humanize(str(sub))}", v, _guess_kind(str(sub), v)))
            continue
        out.append((_humanize(key), value, _guess_kind(key, value)))
    return out

