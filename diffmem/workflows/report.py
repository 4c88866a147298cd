"""Write a run's results as ``report.json`` and one self-contained, readable ``report.html``.

The report is a plain dictionary; every section is optional and a section that is absent is left out of the page.
The HTML embeds everything it shows (images as PNG data URIs, plots drawn with matplotlib), so the file can be
mailed or archived on its own. Every metric is shown with a human label and a fixed precision: rates as
percentages with one decimal, similarities with three decimals, counts as integers with thousands separators,
and ``not measured`` where a value is missing.

Sections read from the report dictionary (see :func:`render_html` for their shapes): ``edits`` (the main table),
``before`` / ``after``, ``sweep``, ``reextract``, ``attack``, ``detection``, ``iou_subsets``, ``locality`` and
the run details (``title``, ``model``, ``headline_text``, ``sampler``, ``scorer``, ``timings_s``,
``total_seconds``, ``machine``). Image grids are passed separately as ``gallery`` and never stored in the JSON.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import secrets
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import ExportError

logger = logging.getLogger(__name__)

__all__ = ["write_report", "render_html", "to_json_safe", "short_layer_name"]

NOT_MEASURED = "not measured"
_TEMPLATES = Path(__file__).with_name("templates")
_TEMPLATE_NAME = "report.html.j2"
# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies); the unedited model is always
# orange and the (first) edit blue.
_BEFORE_COLOUR, _AFTER_COLOUR = "#D55E00", "#0072B2"
_PALETTE = (_BEFORE_COLOUR, _AFTER_COLOUR, "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
# Gallery images at most this many pixels on a side are upscaled (nearest neighbour) to about _SMALL_DISPLAY px;
# larger ones are shrunk to _MAX_EMBED px before embedding so the page stays small.
_SMALL_DISPLAY = 128
_MAX_EMBED = 256

# ------------------------------------------------------------------------------------------------------------
# labels and number formats
# ------------------------------------------------------------------------------------------------------------

# key -> (human label, kind); the kind decides the number format (see _fmt).
_METRICS: dict[str, tuple[str, str]] = {
    # split summaries
    "num_prompts": ("Prompts", "count"),
    "replication_rate": ("Replication rate", "rate"),
    "replication_rate_strict": ("Replication rate, strict threshold", "rate"),
    "mean_similarity": ("Mean similarity to the training image", "similarity"),
    "max_similarity": ("Highest similarity to the training image", "similarity"),
    "diversity_similarity": ("Similarity between seeds", "similarity"),
    "drift_similarity": ("Similarity to the unedited image at the same seed", "similarity"),
    "seed_similarity_before": ("Similarity between seeds of the unedited model", "similarity"),
    "drift_within_seed_spread": ("Prompts whose drift stays within the seed spread", "rate"),
    "drift_within_spread": ("Prompts whose drift stays within the seed spread", "rate"),
    "within_spread_fraction": ("Prompts whose drift stays within the seed spread", "rate"),
    "pixel_drift": ("Mean absolute pixel change", "rate"),
    "clip_score": ("CLIP score, image against prompt", "similarity"),
    # edits
    "heldout_replication_prompt": ("Held-out replication, prompt", "rate"),
    "heldout_replication_attack": ("Held-out replication, attack", "rate"),
    "control_rate": ("Control re-extraction", "rate"),
    "parameters_changed": ("Parameters changed", "count"),
    "fraction_changed": ("Share of weights changed", "share"),
    "wall_time_s": ("Wall time", "seconds"),
    "measure_time_s": ("Measurement time", "seconds"),
    # sweep
    "ratio": ("Mask ratio", "ratio"),
    "fraction": ("Share of weights changed", "share"),
    "weights_zeroed": ("Parameters changed", "count"),
    "locate_replication": ("Replication, locate split", "rate"),
    "heldout_replication": ("Replication, held-out split", "rate"),
    # detection
    "auc": ("Area under the ROC curve", "similarity"),
    "tpr_at_1pct_fpr": ("True positives at 1% false positives", "rate"),
    # attack
    "num_flagged": ("Prompts flagged", "count"),
    "num_verified_prompts": ("Prompts with a verified extraction", "count"),
    "num_verified_generations": ("Verified extracted images", "count"),
    "extraction_rate": ("Share of prompts extracted", "rate"),
    "threshold": ("Similarity threshold", "similarity"),
    "false_flag_rate_target": ("Target false-flag rate", "rate"),
    "false_flag_rate_achieved": ("Achieved false-flag rate", "rate"),
    # re-extraction
    "memorization_rate": ("Memorized re-extraction", "rate"),
    # IoU
    "overall": ("Overlap (IoU) over all layers", "similarity"),
    "chance_overall": ("Overlap expected by chance", "similarity"),
    "subset_sizes": ("Prompts in each half", "count"),
    "weights": ("Weights in each mask", "count"),
    # run
    "total_seconds": ("Total", "seconds"),
}

# Settings are shown as given (no fixed precision): these are inputs, not measurements.
_SETTINGS: dict[str, str] = {
    "num_inference_steps": "Denoising steps",
    "guidance_scale": "Guidance scale",
    "guidance_rescale": "Guidance rescale",
    "height": "Height (px)",
    "width": "Width (px)",
    "name": "Name",
    "threshold": "Replication threshold",
    "report_thresholds": "Thresholds reported",
    "source": "Source",
    "preprocessing": "Preprocessing",
    "random_weights": "Random weights",
    "weights": "Weights",
}

# Short column headers of the wide tables (edits, sweep); the edits table explains each one under it.
_HEADERS: dict[str, str] = {
    "heldout_replication_prompt": "Replication from prompt",
    "heldout_replication_attack": "Replication under attack",
    "control_rate": "Control under attack",
    "drift_similarity": "Drift similarity",
    "seed_similarity_before": "Seed-to-seed similarity",
    "drift_within_spread": "Drift within seed spread",
    "drift_within_seed_spread": "Drift within seed spread",
    "parameters_changed": "Parameters changed",
    "fraction_changed": "Share of weights",
    "fraction": "Share of weights",
    "wall_time_s": "Wall time",
    "measure_time_s": "Measurement time",
    "locate_replication": "Replication, locate",
    "heldout_replication": "Replication, held-out",
    "pixel_drift": "Mean pixel change",
}
# Drift compares edited with unedited images: it exists after an edit only and gets a table of its own.
_DRIFT_KEYS = ("drift_similarity", "seed_similarity_before", "drift_within_seed_spread", "drift_within_spread",
               "within_spread_fraction", "pixel_drift")

_SPLITS: dict[str, str] = {
    "locate": "Locate split: memorized prompts used to find the edit",
    "heldout": "Held-out split: memorized prompts never used to find the edit",
    "nonmem": "Non-memorized prompts",
}
_SPLIT_SHORT: dict[str, str] = {"locate": "locate", "heldout": "held-out", "nonmem": "non-memorized"}
_GALLERY_SPLIT: dict[str, str] = {"locate": "locate split (used to find the edit)", "heldout": "held-out split",
                                  "nonmem": "non-memorized prompt"}

_WORDS: dict[str, str] = {
    "num": "number of", "tpr": "TPR", "fpr": "FPR", "pct": "%", "iou": "IoU", "auc": "AUC", "clip": "CLIP",
    "sscd": "SSCD", "ssim": "SSIM", "ffn": "FFN", "unet": "UNet", "gpu": "GPU", "cpu": "CPU", "heldout": "held-out",
    "nonmem": "non-memorized",
}
_MISSING_WORDS = re.compile(r"\b(?:None|nan|NaN|NAN)\b")


def _is_missing(value: Any) -> bool:
    """Whether ``value`` stands for a measurement that was not made (None, NaN or an infinity)."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return not math.isfinite(float(value))
    return False


def _humanize(key: str) -> str:
    """A readable label for a key nobody labelled: ``num_verified_prompts`` -> ``Number of verified prompts``."""
    if key in _METRICS:
        return _METRICS[key][0]
    if key in _SETTINGS:
        return _SETTINGS[key]
    words = [w for w in re.split(r"[_\-\s]+", str(key)) if w]
    if len(words) > 1 and words[-1] == "s":  # a unit suffix (``wall_time_s``): the value says "s" itself
        words = words[:-1]
    words = [_WORDS.get(w.lower(), w) for w in words]
    text = " ".join(words) or "Value"
    return text[0].upper() + text[1:]


def _guess_kind(key: str, value: Any) -> str:
    """The number format of an unlabelled key, guessed from its name and value."""
    if key in _METRICS:
        return _METRICS[key][1]
    k = key.lower()
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, str):
        return "text"
    if k.endswith("_s") or "seconds" in k or k.endswith("_time"):
        return "seconds"
    if "rate" in k or "fraction" in k or "share" in k or k.startswith(("tpr", "fpr")):
        return "rate"
    if any(w in k for w in ("similarity", "iou", "auc", "threshold", "score", "cosine", "drift")):
        return "similarity"
    if k.startswith("num_") or "count" in k or "parameters" in k or "weights" in k:
        return "count"
    if isinstance(value, (int, np.integer)):
        return "count"
    return "number"


def _signed(text: str, delta: float) -> str:
    if delta > 0:
        return "+" + text
    if delta < 0:
        return "\u2212" + text
    return text


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt(value: Any, kind: str) -> str:
    """One value in its kind's fixed format; ``not measured`` when missing.

    Kinds: ``rate`` (percentage, one decimal), ``share`` (percentage, three decimals, for small shares of weights),
    ``similarity`` (three decimals), ``ratio`` (two decimals), ``count`` (integer with thousands separators),
    ``seconds``, ``bool`` (yes / no), ``setting`` (as given), ``text`` and ``number`` (three decimals).
    """
    if _is_missing(value):
        return NOT_MEASURED
    if isinstance(value, (list, tuple)):
        parts = [_fmt(v, kind) for v in value]
        return ", ".join(parts) if parts else NOT_MEASURED
    if isinstance(value, Mapping):
        return "; ".join(f"{_humanize(str(k))}: {_fmt(v, _guess_kind(str(k), v))}" for k, v in value.items())
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    v = float(value)
    if kind == "rate":
        return f"{100 * v:.1f}%"
    if kind == "share":
        return f"{100 * v:.3f}%"
    if kind == "similarity":
        return f"{v:.3f}"
    if kind == "ratio":
        return f"{v:.2f}"
    if kind == "count":
        return f"{int(round(v)):,}"
    if kind == "seconds":
        return _fmt_seconds(v)
    if kind == "setting":
        return f"{int(value):,}" if isinstance(value, (int, np.integer)) else f"{v:g}"
    return f"{v:,.3f}"


def _fmt_change(before: Any, after: Any, kind: str) -> str:
    """``after - before`` in the kind's unit (percentage points for rates); empty when it means nothing."""
    if _is_missing(before) or _is_missing(after) or isinstance(before, (bool, str)) or isinstance(after, (bool, str)):
        return ""
    try:
        delta = float(after) - float(before)
    except (TypeError, ValueError):
        return ""
    if kind == "rate":
        return _signed(f"{abs(100 * delta):.1f} pp", round(100 * delta, 1))
    if kind == "share":
        return _signed(f"{abs(100 * delta):.3f} pp", round(100 * delta, 3))
    if kind == "similarity":
        return _signed(f"{abs(delta):.3f}", round(delta, 3))
    if kind == "count":
        return _signed(f"{abs(int(round(delta))):,}", round(delta))
    return ""


def _edit_label(name: Any) -> str:
    """Display name of an edit; the unedited baseline reads ``No edit (baseline)``."""
    if _is_missing(name) or str(name).strip().lower() in ("", "none", "baseline", "unedited", "no edit"):
        return "No edit (baseline)"
    return _humanize(str(name))


def _split_label(split: str) -> str:
    return _SPLITS.get(split, _humanize(split))


def _clean_text(text: str) -> str:
    """Free text with stray ``None`` / ``nan`` words replaced by ``not measured``."""
    return _MISSING_WORDS.sub(NOT_MEASURED, text)


def short_layer_name(name: str, width: int = 30) -> str:
    """A short, wrapped label for a layer name such as ``down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2``.

    Args:
        name: Module name in the denoiser.
        width: Wrap the label at about this many characters.

    Returns:
        For example ``down 1 · attn 0 · block 0`` (lines joined by ``\\n`` when longer than ``width``).
    """
    s = re.sub(r"\.(ff|feed_forward|mlp)(\.net)?(\.\d+)?(\.proj)?$", "", str(name))
    rules = (
        (r"^down_blocks\.(\d+)", r"down \1"),
        (r"^up_blocks\.(\d+)", r"up \1"),
        (r"^mid_block", "mid"),
        (r"attentions\.(\d+)", r"attn \1"),
        (r"single_transformer_blocks\.(\d+)", r"single block \1"),
        (r"transformer_blocks\.(\d+)", r"block \1"),
    )
    for pattern, repl in rules:
        s = re.sub(pattern, repl, s)
    s = " \u00b7 ".join(p for p in s.split(".") if p)
    s = s.replace("_", " ")
    return "\n".join(textwrap.wrap(s, width=width, break_long_words=True)) or str(name)


# ------------------------------------------------------------------------------------------------------------
# the page model handed to the template
# ------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib figure and axes outside pyplot (no global backend or figure registry is touched)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, color="#e3e6ea", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _fig_uri(fig: Any) -> tuple[str, int]:
    """The figure as a PNG data URI drawn at 150 dpi, and its display width in CSS pixels (100 per inch).

    Showing every plot at 100 CSS pixels per inch gives all plots the same text size on the page; the extra
    resolution keeps them sharp on high-density screens.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, facecolor="white")
    width = int(round(fig.get_size_inches()[0] * 100))
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), width


def _percent_axis(axis: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))


def _series(points: Mapping[Any, Any]) -> tuple[list[float], list[float]]:
    """Sorted ``(x, y)`` of a ``{step: value}`` mapping; keys may be strings (after a JSON round trip)."""
    pairs = []
    for k, v in points.items():
        try:
            x = float(k)
        except (TypeError, ValueError):
            continue
        if not _is_missing(v):
            pairs.append((x, float(v)))
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot_duplication(series: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[str, int] | None:
    styles = ((_BEFORE_COLOUR, "o", "-"), (_AFTER_COLOUR, "s", "--"))
    blocks = [(label, block, *styles[i % 2]) for i, (label, block) in enumerate(series)]
    dups = sorted({int(d) for _, b, *_ in blocks for d in b if str(d).lstrip("-").isdigit()})
    if not dups:
        return None
    fig, ax = _figure(6.0, 3.8)
    for label, block, colour, marker, style in blocks:
        xs, ys = [], []
        for d in dups:
            v = (block.get(str(d)) or block.get(d) or {}).get("replication_rate")
            if not _is_missing(v):
                xs.append(d)
                ys.append(100 * float(v))
        ax.plot(xs, ys, marker=marker, linestyle=style, color=colour, label=label, linewidth=2, markersize=6)
    if len(dups) > 1 and min(dups) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(dups, [f"{d:,}" for d in dups])
    ax.minorticks_off()
    ax.set_ylim(-4, 104)
    _percent_axis(ax.yaxis)
    ax.set(xlabel="copies of the image in the training set", ylabel="replication rate",
           title="Replication against duplication")
    ax.legend(loc="best", frameon=False)
    return _fig_uri(fig)


def _plot_sweep(rows: Sequence[Mapping[str, Any]]) -> tuple[str, int] | None:
    x_key = "fraction" if any(not _is_missing(r.get("fraction")) for r in rows) else "ratio"
    pts = sorted((r for r in rows if not _is_missing(r.get(x_key))), key=lambda r: float(r[x_key]))
    if not pts:
        return None
    xs = [(100 if x_key == "fraction" else 1) * float(r[x_key]) for r in pts]
    fig, ax = _figure(6.0, 3.8)
    handles = []
    for key, label, colour, marker in (("locate_replication", "replication, locate split", _BEFORE_COLOUR, "o"),
                                       ("heldout_replication", "replication, held-out split", _AFTER_COLOUR, "s")):
        xy = [(x, 100 * float(r[key])) for x, r in zip(xs, pts) if not _is_missing(r.get(key))]
        if xy:
            handles += ax.plot([p[0] for p in xy], [p[1] for p in xy], marker=marker, color=colour, label=label,
                               linewidth=2)
    ax.set_ylim(-4, 104)
    _percent_axis(ax.yaxis)
    ax.set_ylabel("replication rate")
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("share of weights changed (%)" if x_key == "fraction" else "mask ratio")
    drift = [(x, float(r["drift_similarity"])) for x, r in zip(xs, pts) if not _is_missing(r.get("drift_similarity"))]
    if drift:
        ax2 = ax.twinx()
        ax2.spines["top"].set_visible(False)
        handles += ax2.plot([p[0] for p in drift], [p[1] for p in drift], marker="^", linestyle=":",
                            color=_PALETTE[2], label="drift: similarity to unedited image", linewidth=2)
        ax2.set_ylim(-0.04, 1.04)
        ax2.set_ylabel("similarity to the unedited image")
    ax.set_title("Replication and drift against the size of the edit")
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False, fontsize=8)
    return _fig_uri(fig)


def _plot_roc(fpr: Sequence[float], tpr: Sequence[float], auc: Any) -> tuple[str, int] | None:
    x = np.asarray([np.nan if _is_missing(v) else float(v) for v in fpr], dtype=float)
    y = np.asarray([np.nan if _is_missing(v) else float(v) for v in tpr], dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return None
    fig, ax = _figure(4.6, 4.2)
    label = "detector" if _is_missing(auc) else f"detector (area {float(auc):.3f})"
    ax.plot(x[ok], y[ok], color=_AFTER_COLOUR, linewidth=2, label=label, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888888", label="chance")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel="false positive rate (non-memorized flagged)", ylabel="true positive rate (memorized flagged)",
           title="Detection ROC")
    ax.legend(loc="lower right", frameon=False)
    return _fig_uri(fig)


def _plot_scores(scores: Sequence[Mapping[str, Any]]) -> tuple[str, int] | None:
    pts = [(float(s["score"]), bool(s.get("memorized"))) for s in scores if not _is_missing(s.get("score"))]
    if not pts:
        return None
    rng = np.random.default_rng(0)
    fig, ax = _figure(4.6, 4.2)
    for y, (flag, label, colour) in enumerate(((False, "non-memorized", _PALETTE[2]),
                                                (True, "memorized", _BEFORE_COLOUR))):
        xs = [s for s, m in pts if m == flag]
        if xs:
            ax.scatter(xs, y + rng.uniform(-0.18, 0.18, len(xs)), s=22, color=colour, alpha=0.8, label=label)
    ax.set_yticks([0, 1], ["non-\nmemorized", "memorized"])
    ax.set_ylim(-0.5, 1.5)
    ax.set(xlabel="detection score\n(higher: more likely memorized)", ylabel="ground truth",
           title="Detection scores per prompt")
    fig.legend(loc="outside lower center", ncol=2, frameon=False, fontsize=8)
    return _fig_uri(fig)


def _plot_iou(per_layer: Mapping[str, Any], overall: Any, chance: Any) -> tuple[str, int] | None:
    items = [(str(k), float(v)) for k, v in per_layer.items() if not _is_missing(v)]
    if not items:
        return None
    labels = [short_layer_name(k) for k, _ in items]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = _figure(7.5, 1.4 + 0.3 * max(lines, len(items)))
    pos = np.arange(len(items))
    ax.barh(pos, [v for _, v in items], color=_AFTER_COLOUR, label="overlap per layer", height=0.65)
    top = max([v for _, v in items] + [float(x) for x in (overall, chance) if not _is_missing(x)])
    right = min(1.0, top * 1.25 + 0.02)
    for p, (_, v) in zip(pos, items):
        ax.text(v + right * 0.01, p, f"{v:.3f}", va="center", fontsize=8,
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_yticks(pos, labels, fontsize=8)
    ax.invert_yaxis()
    if not _is_missing(overall):
        ax.axvline(float(overall), color="#000000", linewidth=1.5, label=f"all layers ({float(overall):.3f})")
    if not _is_missing(chance):
        ax.axvline(float(chance), color=_BEFORE_COLOUR, linestyle="--", linewidth=1.5,
                   label=f"chance ({float(chance):.3f})")
    ax.set_xlim(0, right)
    ax.set(xlabel="overlap of the two masks (intersection over union)", ylabel="layer",
           title="Overlap of masks found from disjoint halves, per layer")
    fig.legend(loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    return _fig_uri(fig)


def _plot_reextract(reextract: Mapping[str, Any]) -> tuple[str, int] | None:
    fig, ax = _figure(6.6, 3.9)
    drawn = False
    for i, (name, block) in enumerate(reextract.items()):
        curve = (block or {}).get("curve") or {}
        colour = _PALETTE[i % len(_PALETTE)]
        for kind, style, marker in (("memorized", "-", "o"), ("control", "--", "s")):
            xs, ys = _series(curve.get(kind) or {})
            if xs:
                ax.plot(xs, [100 * y for y in ys], linestyle=style, marker=marker, markersize=4, color=colour,
                        linewidth=2, label=f"{_edit_label(name)}: {kind}")
                drawn = True
    if not drawn:
        return None
    ax.set_ylim(-4, 104)
    _percent_axis(ax.yaxis)
    ax.set(xlabel="optimisation steps of the attack", ylabel="images re-extracted",
           title="Re-extraction during the attack")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return _fig_uri(fig)


# ------------------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------------------


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """An ``H x W x 3`` uint8 array from a uint8 / float array (grey, RGB or RGBA) or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"gallery image of shape {arr.shape} is not an H x W x 3 image")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.nan_to_num(arr.astype(np.float64)) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0)
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _png_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gallery_image(image: Any) -> tuple[str, int, int, bool]:
    """PNG data URI and display size of a gallery image; small images are shown upscaled without smoothing."""
    from PIL import Image

    arr = _as_rgb_uint8(image)
    h, w = arr.shape[:2]
    side = max(h, w)
    if side > _MAX_EMBED:
        scale = _MAX_EMBED / side
        arr = np.asarray(Image.fromarray(arr).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                     Image.LANCZOS))
        h, w = arr.shape[:2]
    factor = max(1, _SMALL_DISPLAY // max(h, w))
    return _png_uri(arr), w * factor, h * factor, factor > 1


def _duplicates_text(dups: Any) -> str:
    try:
        n = int(dups)
    except (TypeError, ValueError, OverflowError):
        return ""
    return f"{n:,} copy in the training set" if n == 1 else f"{n:,} copies in the training set"


def _gallery_rows(section: Mapping[str, Any]) -> list[GalleryRow]:
    rows = []
    for row in section.get("rows") or []:
        details = []
        if row.get("split"):
            details.append(_GALLERY_SPLIT.get(str(row["split"]), _humanize(str(row["split"]))))
        if _duplicates_text(row.get("duplicates")):
            details.append(_duplicates_text(row.get("duplicates")))
        cells = []
        for cell in row.get("cells") or []:
            if cell.get("image") is None:
                raise ValueError(f"gallery cell {cell.get('label')!r} of prompt {row.get('prompt')!r} has no image")
            uri, w, h, pixelated = _gallery_image(cell["image"])
            score = cell.get("score")
            if "score" not in cell:  # e.g. the training image itself: nothing to compare with
                score_text = ""
            elif _is_missing(score):
                score_text = f"similarity {NOT_MEASURED}"
            else:
                score_text = f"similarity {float(score):.3f}"
            replicated = cell.get("replicated")
            cells.append(GalleryCell(_clean_text(str(cell.get("label") or "")), uri, w, h, pixelated, score_text,
                                     None if replicated is None else bool(replicated)))
        rows.append(GalleryRow(str(row.get("prompt", "")), " \u00b7 ".join(details), cells))
    return rows


# ------------------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------------------

_EDIT_COLUMNS = ("heldout_replication_prompt", "heldout_replication_attack", "control_rate", "drift_similarity",
                 "seed_similarity_before", "drift_within_spread", "parameters_changed", "fraction_changed",
                 "wall_time_s", "measure_time_s")


def _edit_definitions(present: Sequence[str], threshold: str) -> list[tuple[str, str]]:
    text = {
        "name": "The change made to the model. No edit is the unedited model, the baseline of every column.",
        "heldout_replication_prompt": (
            "Share of images generated from the plain prompts of held-out memorized training images (prompts "
            f"never used to find the edit) that are replications: their similarity to the training image is at "
            f"or above the scorer's threshold{threshold}. Lower is better."),
        "heldout_replication_attack": (
            "The same share for the held-out images when an attacker optimises the conditioning (the text "
            "embedding) to bring the training image back, as in Finding DoRI. An edit that only hides the image "
            "from its prompt scores low in the previous column and high here."),
        "control_rate": (
            "The same attack aimed at non-memorized training images. It measures how much the attack recovers "
            "without memorization; replication under attack near this level means the memory is gone."),
        "drift_similarity": (
            "For non-memorized prompts, the similarity between each edited image and the unedited image at the "
            "same seed. 1 means the edit left ordinary generations untouched."),
        "seed_similarity_before": (
            "The similarity between two seeds of the same prompt in the unedited model: how much images vary "
            "anyway. Drift similarity at or above it is smaller than changing the seed."),
        "drift_within_spread": "Share of non-memorized prompts whose drift similarity is at or above their "
                               "seed-to-seed similarity, i.e. whose change is within the natural spread.",
        "parameters_changed": "Number of weights the edit changed.",
        "fraction_changed": "Those weights as a share of the weights the edit could change (the targeted layers).",
        "wall_time_s": "Time taken to find the edit (statistics, choosing its strength, robust rounds).",
        "measure_time_s": "Time taken to measure this row (generations and the attack on the held-out and control "
                          "images).",
    }
    out = []
    for key in present:
        label = "Edit" if key == "name" else _HEADERS.get(key, _humanize(key))
        out.append((label, text.get(key, f"{_humanize(key)} as reported by the edit.")))
    return out


def _section_edits(report: Mapping[str, Any], threshold: str) -> Section | None:
    edits = [e for e in report.get("edits") or [] if isinstance(e, Mapping)]
    if not edits:
        return None
    keys = [k for k in _EDIT_COLUMNS if any(k in e for e in edits)]
    keys += sorted({k for e in edits for k in e if k not in keys and k != "name" and not str(k).startswith("_")})
    rows = []
    for e in edits:
        row = [Cell(_edit_label(e.get("name")))]
        row += [_num_cell(e.get(k), _guess_kind(k, e.get(k))) for k in keys]
        rows.append(row)
    table = Table(["Edit"] + [_HEADERS.get(k, _humanize(k)) for k in keys], rows, [False] + [True] * len(keys))
    return Section("edits", "Edits compared",
                   "One row per edit of the model: how often memorized training images still come back, from their "
                   "prompt and under attack, and how much the edit disturbs everything else.",
        [Block("table", table=table), Block("definitions", heading="What the columns mean",
                                            definitions=_edit_definitions(["name", *keys], threshold))])


def _split_table(split: str, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> Table:
    order = [k for k in _METRICS if (k in (before or {}) or k in (after or {})) and k not in _DRIFT_KEYS]
    extra = sorted({k for b in (before, after) if b for k in b if k not in _METRICS and not str(k).startswith("_")
                    and not isinstance(b[k], (Mapping, list))})
    columns = ["Quantity"]
    if before is not None:
        columns.append("Before")
    if after is not None:
        columns.append("After")
    both = before is not None and after is not None
    if both:
        columns.append("Change")
    rows = []
    for key in order + extra:
        vb = before.get(key) if before is not None else None
        va = after.get(key) if after is not None else None
        kind = _guess_kind(key, vb if vb is not None else va)
        row = [Cell(_humanize(key))]
        if before is not None:
            row.append(_num_cell(vb, kind))
        if after is not None:
            row.append(_num_cell(va, kind))
        if both:
            row.append(Cell(_fmt_change(vb, va, kind), numeric=True))
        rows.append(row)
    return Table(columns, rows, [False] + [True] * (len(columns) - 1), _split_label(split))


def _drift_table(splits: Sequence[str], block: Mapping[str, Any]) -> Table | None:
    """Drift per split: how far the edit moved each split's images from the unedited ones."""
    keys = [k for k in _DRIFT_KEYS if any(k in (block.get(s) or {}) for s in splits)]
    keys = [k for i, k in enumerate(keys) if _HEADERS.get(k) not in {_HEADERS.get(j) for j in keys[:i]}]
    rows = [[Cell(_SPLIT_SHORT.get(s, _humanize(s)).capitalize())]
            + [_num_cell((block.get(s) or {}).get(k), _METRICS[k][1]) for k in keys]
            for s in splits if any(k in (block.get(s) or {}) for k in keys)]
    if not rows:
        return None
    return Table(["Split"] + [_HEADERS.get(k, _humanize(k)) for k in keys], rows, [False] + [True] * len(keys),
                 "Drift: each image after the edit against the unedited image at the same seed")


def _section_splits(report: Mapping[str, Any], threshold: str) -> Section | None:
    before = report.get("before") if isinstance(report.get("before"), Mapping) else None
    after = report.get("after") if isinstance(report.get("after"), Mapping) else None
    if not before and not after:
        return None
    blocks: list[Block] = []
    splits = [s for s in _SPLITS if s in (before or {}) or s in (after or {})]
    splits += sorted({s for b in (before, after) if b for s in b
                      if s not in _SPLITS and s != "by_duplicates" and isinstance(b[s], Mapping)})
    tables = [_split_table(split, (before or {}).get(split) if before is not None else None,
                           (after or {}).get(split) if after is not None else None) for split in splits]
    drift = _drift_table(splits, after if after is not None else before or {})
    if drift is not None:
        tables.append(drift)
    blocks.append(Block("tables", tables=tables))
    dup_b = (before or {}).get("by_duplicates") or {}
    dup_a = (after or {}).get("by_duplicates") or {}
    if dup_b or dup_a:
        dups = sorted({str(d) for d in (*dup_b, *dup_a)}, key=lambda d: int(d) if d.lstrip("-").isdigit() else 0)
        columns = ["Copies in the training set", "Prompts"]
        if before is not None:
            columns.append("Replication before")
        if after is not None:
            columns.append("Replication after")
        rows = []
        for d in dups:
            b, a = dup_b.get(d) or {}, dup_a.get(d) or {}
            row = [_num_cell(int(d) if d.lstrip("-").isdigit() else d, "count"),
                   _num_cell(b.get("num_prompts", a.get("num_prompts")), "count")]
            if before is not None:
                row.append(_num_cell(b.get("replication_rate"), "rate"))
            if after is not None:
                row.append(_num_cell(a.get("replication_rate"), "rate"))
            rows.append(row)
        tables.append(Table(columns, rows, [True] * len(columns),
                            "Replication by number of copies in the training set"))
        series = [(label, block) for label, block in (("before the edit", dup_b), ("after the edit", dup_a)) if block]
        uri = _plot_duplication(series)
        if uri:
            blocks.append(Block("plots", plots=[Plot(*uri, "Replication rate against the number of training copies, "
                                                          "before and after the edit")]))
    intro = ("Each split before and after the edit. A replication is a generated image whose similarity to its "
             f"training image is at or above the scorer's threshold{threshold}. Drift compares each image after the "
             "edit with the unedited image at the same seed; it is within the seed spread when it is no larger than "
             "the difference between two seeds. Images copied more often in the training set are memorized more, "
             "so the last table and the plot break replication down by copies.")
    if after is None:
        intro = ("Each split of the unedited model. A replication is a generated image whose similarity to its "
                 f"training image is at or above the scorer's threshold{threshold}.")
    return Section("splits", "Before and after, by split", intro, blocks)


def _section_gallery(index: int, section: Mapping[str, Any], threshold: str) -> Section | None:
    rows = _gallery_rows(section)
    if not rows:
        return None
    title = _clean_text(str(section.get("title") or f"Images {index + 1}"))
    caption = _clean_text(str(section.get("caption") or ""))
    intro = caption or "Generated images with their similarity to the training image."
    intro += (" Each image is shown enlarged without smoothing. Under it: its similarity to the training image; a "
              f"red frame marks a replication, a similarity at or above the scorer's threshold{threshold}.")
    return Section(f"images-{index + 1}", title, intro, [Block("gallery", gallery=rows)])


def _section_sweep(report: Mapping[str, Any]) -> Section | None:
    rows = [r for r in report.get("sweep") or [] if isinstance(r, Mapping)]
    if not rows:
        return None
    rows = [{**r, "parameters_changed": r.get("parameters_changed", r.get("weights_zeroed"))} for r in rows]
    order = ["ratio", "fraction", "parameters_changed", "locate_replication", "heldout_replication",
             "drift_similarity"]
    keys = [k for k in order if any(k in r and (k != "parameters_changed" or r[k] is not None) for r in rows)]
    table = Table([_HEADERS.get(k, _humanize(k)) for k in keys],
                  [[_num_cell(r.get(k), _guess_kind(k, r.get(k))) for k in keys] for r in rows],
                  [True] * len(keys))
    blocks = [Block("table", table=table)]
    uri = _plot_sweep(rows)
    if uri:
        blocks.insert(0, Block("plots", plots=[Plot(*uri, "Replication and drift against the share of weights "
                                                         "changed")]))
    return Section("sweep", "How large an edit is needed",
                   "The edit repeated at several sizes: replication of memorized images (on the split used to find the "
                   "edit and, where measured, on held-out prompts) and drift of ordinary images, against the share of "
                   "weights changed. A good edit removes replication long before drift falls.", blocks)


def _section_reextract(data: Mapping[str, Any]) -> Section:
    rows = []
    for name, block in data.items():
        block = block if isinstance(block, Mapping) else {}
        steps = [x for kind in ("memorized", "control") for x in _series((block.get("curve") or {}).get(kind) or {})[0]]
        rows.append([Cell(_edit_label(name)), _num_cell(block.get("memorization_rate"), "rate"),
                     _num_cell(block.get("control_rate"), "rate"),
                     _num_cell(max(steps) if steps else None, "count")])
    blocks = []
    uri = _plot_reextract(data)
    if uri:
        blocks.append(Block("plots", plots=[Plot(*uri, "Re-extraction rate against optimisation steps")]))
    blocks.append(Block("table", table=Table(["Edit", "Memorized re-extraction", "Control re-extraction",
                                              "Optimisation steps"], rows, [False, True, True, True])))
    return Section("reextract", "Re-extraction attack",
                   "The attacker of Finding DoRI optimises the conditioning of each memorized training image until the "
                   "model generates it again (solid lines), and does the same for non-memorized training images as a "
                   "control (dashed lines). An edit has deleted the memory when the two reach the same level.", blocks)


def _section_attack(data: Mapping[str, Any]) -> Section:
    blocks: list[Block] = []
    phases = [(k, data[k]) for k in ("before", "after") if isinstance(data.get(k), Mapping)]
    if phases:
        keys = [k for k in _METRICS if any(k in p for _, p in phases)]
        keys += sorted({k for _, p in phases for k in p if k not in keys and not isinstance(p[k], (Mapping, list))})
        columns = ["Quantity"] + ["Before the edit" if k == "before" else "After the edit" for k, _ in phases]
        rows = [[Cell(_humanize(k))] + [_num_cell(p.get(k), _guess_kind(k, p.get(k))) for _, p in phases]
                for k in keys]
        blocks.append(Block("table", table=Table(columns, rows, [False] + [True] * len(phases))))
        rest = {k: v for k, v in data.items() if k not in ("before", "after")}
    else:
        rest = dict(data)
    note = rest.pop("note", None)
    items = _scalar_items(rest)
    if items:
        blocks.append(Block("table", table=_kv_table(items, caption="Settings of the attack" if phases else None)))
    if note:
        note = _clean_text(str(note))
        blocks.append(Block("note", text=note[:1].upper() + note[1:]))
    return Section("attack", "Extraction attack",
                   "The black-box attack of Carlini et al.: many images are generated per prompt, prompts whose images "
                   "form a tight cluster are flagged, and a flag is verified when a flagged image matches the training "
                   "image. Fewer verified prompts after the edit means less can be extracted.", blocks)


def _section_detection(det: Mapping[str, Any]) -> Section:
    scores = [s for s in det.get("scores") or [] if isinstance(s, Mapping)]
    items = [(_humanize("auc"), det.get("auc"), "similarity"),
             (_humanize("tpr_at_1pct_fpr"), det.get("tpr_at_1pct_fpr"), "rate")]
    if scores:
        n_mem = sum(1 for s in scores if s.get("memorized"))
        items += [("Memorized prompts scored", n_mem, "count"),
                  ("Non-memorized prompts scored", len(scores) - n_mem, "count")]
    blocks = [Block("table", table=_kv_table(items))]
    plots = []
    roc = det.get("roc") or {}
    if roc.get("fpr") is not None and roc.get("tpr") is not None:
        uri = _plot_roc(roc["fpr"], roc["tpr"], det.get("auc"))
        if uri:
            plots.append(Plot(*uri, "ROC curve of the detector"))
    uri = _plot_scores(scores) if scores else None
    if uri:
        plots.append(Plot(*uri, "Detection score of each prompt, memorized and not"))
    if plots:
        blocks.append(Block("plots", plots=plots))
    if scores:
        ranked = sorted((s for s in scores if not _is_missing(s.get("score"))), key=lambda s: -float(s["score"]))
        top = ranked[:10]
        rows = [[Cell(f"{i + 1:,}"), Cell(str(s.get("prompt", ""))), _num_cell(s.get("score"), "number"),
                 Cell("yes" if s.get("memorized") else "no")] for i, s in enumerate(top)]
        blocks.append(Block("table", table=Table(["Rank", "Prompt", "Score", "Memorized (ground truth)"], rows,
                                                 [False, False, True, False],
                                                 f"The {len(top)} highest-scoring prompts")))
    return Section("detection", "Detection without training data",
                   "How well memorized prompts are told apart from the others before any training image is looked at, "
                   "from the size of the text-conditional noise prediction (Wen et al.). An area of 1 separates them "
                   "perfectly, 0.5 is guessing.", blocks)


def _section_iou(data: Mapping[str, Any]) -> Section:
    items = [(_humanize(k), data.get(k), _METRICS[k][1]) for k in ("overall", "chance_overall", "subset_sizes",
                                                                  "weights") if k in data]
    blocks = [Block("table", table=_kv_table(items))]
    per_layer = data.get("per_layer")
    if isinstance(per_layer, Mapping) and per_layer:
        uri = _plot_iou(per_layer, data.get("overall"), data.get("chance_overall"))
        if uri:
            blocks.append(Block("plots", plots=[Plot(*uri, "Overlap of the two masks per layer", wide=True)]))
    return Section("iou", "Do different memorized images share weights?",
                   "The edit is found twice, from two disjoint halves of the memorized prompts, and the two sets of "
                   "weights are compared (intersection over union). Overlap well above chance means memorization lives "
                   "in a shared set of weights rather than in one place per image.", blocks)


def _section_locality(data: Mapping[str, Any]) -> Section | None:
    items = _scalar_items(data)
    if not items:
        return None
    return Section("locality", "Locality of the edit",
                   "Measurements of how narrowly the edit acts: what it changes beyond the memorized images.",
                   [Block("table", table=_kv_table(items))])


def _section_run(report: Mapping[str, Any]) -> Section | None:
    blocks: list[Block] = []
    if report.get("model"):
        blocks.append(Block("paragraph", text=f"Model: {report['model']}"))
    sampler = report.get("sampler")
    if isinstance(sampler, Mapping) and sampler:
        items = [(_SETTINGS.get(str(k), _humanize(str(k))), v, "setting") for k, v in sampler.items()
                 if not isinstance(v, Mapping)]
        blocks.append(Block("table", table=_kv_table(
            [(label, "default" if _is_missing(v) else v, kind) for label, v, kind in items],
            value_header="Value", key_header="Setting", caption="Sampler")))
    scorer = report.get("scorer")
    if isinstance(scorer, Mapping) and scorer:
        items = []
        for k, v in scorer.items():
            if isinstance(v, Mapping):
                continue
            kind = "similarity" if k in ("threshold", "report_thresholds") else "setting"
            if k == "name" and isinstance(v, str):
                v = v.upper() if v.lower() in ("ssim", "sscd", "clip", "ms-ssim") else v
            items.append((_SETTINGS.get(str(k), _humanize(str(k))), v, kind))
        table = _kv_table(items, value_header="Value", key_header="Setting", caption="Similarity scorer")
        for (label, _, _), row in zip(items, table.rows):
            if label in (_SETTINGS["source"], _SETTINGS["preprocessing"]):
                row[1].code = True  # verbatim technical text from the scorer
        blocks.append(Block("table", table=table))
        if scorer.get("random_weights"):
            blocks.append(Block("note", text="The scorer has random weights: its similarities mean nothing."))
    timings = report.get("timings_s")
    total = report.get("total_seconds")
    if (isinstance(timings, Mapping) and timings) or not _is_missing(total):
        items = [(_humanize(str(k)), v, "seconds") for k, v in (timings or {}).items()]
        if not _is_missing(total):
            items.append(("Total", total, "seconds"))
        blocks.append(Block("table", table=_kv_table(items, value_header="Time", caption="Time per phase",
                                                     key_header="Phase")))
    machine = report.get("machine")
    if isinstance(machine, Mapping) and machine:
        blocks.append(Block("table", table=_kv_table(_scalar_items(machine), caption="Machine")))
    elif machine and not _is_missing(machine):
        blocks.append(Block("paragraph", text=f"Machine: {_clean_text(str(machine))}"))
    if not blocks:
        return None
    return Section("run", "How this run was made",
                   "The model, the sampler settings and the similarity scorer behind every number above, and where "
                   "the time went.", blocks)


def _threshold_phrase(report: Mapping[str, Any]) -> str:
    scorer = report.get("scorer")
    if not isinstance(scorer, Mapping) or _is_missing(scorer.get("threshold")):
        return ""
    name = scorer.get("name")
    name = str(name).upper() if isinstance(name, str) and name.lower() in ("ssim", "sscd", "clip") else name
    try:
        value = f"{float(scorer['threshold']):.3f}"
    except (TypeError, ValueError):
        return ""
    return f" ({value} for {name})" if name else f" ({value})"


# Sections built from one non-empty mapping of the report, in page order: (report key, builder).
_BLOCK_SECTIONS: tuple[tuple[str, Callable[[Mapping[str, Any]], Section | None]], ...] = (
    ("reextract", _section_reextract), ("attack", _section_attack), ("detection", _section_detection),
    ("iou_subsets", _section_iou), ("locality", _section_locality))


def _sections(report: Mapping[str, Any], gallery: Sequence[Mapping[str, Any]] | None) -> list[Section]:
    thr = _threshold_phrase(report)
    sections = [_section_edits(report, thr), _section_splits(report, thr)]
    sections += [_section_gallery(i, g, thr) for i, g in enumerate(gallery or []) if isinstance(g, Mapping)]
    sections.append(_section_sweep(report))
    for key, build in _BLOCK_SECTIONS:
        block = report.get(key)
        if isinstance(block, Mapping) and block:
            sections.append(build(block))
    sections.append(_section_run(report))
    return [s for s in sections if s is not None]


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(report: Mapping[str, Any], gallery: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Render the report as one self-contained HTML page (pure: reads its arguments, writes nothing).

    Args:
        report: The report dictionary. Every section is optional:

            - ``title``, ``model``, ``headline_text`` (multi-line), ``sampler`` (settings), ``scorer`` (with
              ``name`` and ``threshold``), ``timings_s`` (phase -> seconds), ``total_seconds``, ``machine``;
            - ``edits``: rows with ``name``, ``heldout_replication_prompt``, ``heldout_replication_attack``,
              ``control_rate``, ``drift_similarity``, ``seed_similarity_before``, ``drift_within_spread``,
              ``parameters_changed``, ``fraction_changed``, ``wall_time_s``;
            - ``before`` / ``after``: ``{split: {num_prompts, replication_rate, ...}, "by_duplicates": {...}}``;
            - ``sweep``: rows with ``ratio``, ``fraction``, ``parameters_changed``, ``locate_replication`` and
              optionally ``heldout_replication`` and ``drift_similarity``;
            - ``detection``: ``auc``, ``tpr_at_1pct_fpr``, ``roc`` (``fpr``, ``tpr``), ``scores``
              (``prompt``, ``score``, ``memorized``);
            - ``iou_subsets``: ``overall``, ``chance_overall``, ``per_layer`` (layer -> IoU);
            - ``reextract``: ``{edit: {memorization_rate, control_rate, curve: {memorized|control: {step: rate}}}}``;
            - ``attack``: ``{before: {...}, after: {...}}`` extraction-attack summaries (or one flat summary);
            - ``locality``: free-form numbers.
        gallery: Image grids: ``[{title, caption, rows: [{prompt, split, duplicates, cells: [{label, image,
            score, replicated}]}]}]`` with ``image`` an ``H x W x 3`` uint8 array.

    Returns:
        The HTML document.
    """
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a mapping, not {type(report).__name__}")
    import matplotlib

    with matplotlib.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
                                "font.family": "DejaVu Sans"}):
        sections = _sections(report, gallery)
    headline = report.get("headline_text")
    headline = _clean_text(str(headline)).strip("\n") if headline and not _is_missing(headline) else ""
    title = _clean_text(str(report.get("title") or "diffmem report"))
    model = "" if _is_missing(report.get("model")) or not report.get("model") else str(report["model"])
    template = _environment().get_template(_TEMPLATE_NAME)
    return template.render(title=title, model=model, headline=headline, sections=sections)


def to_json_safe(obj: Any) -> Any:
    """A JSON-safe copy of ``obj``: NaN and infinities become ``None``, numpy scalars and 1-d arrays become
    Python values, paths become strings; keys starting with ``_`` and image data (arrays of 3 or more
    dimensions, 2-d uint8 arrays, PIL images, bytes) are dropped.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_json_safe(v) for k, v in obj.items() if not str(k).startswith("_") and not _is_image(v)}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json_safe(v) for v in obj if not _is_image(v)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if _is_missing(obj) else float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):
        return to_json_safe(obj.tolist())
    return str(obj)


def _is_image(obj: Any) -> bool:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return True
    if hasattr(obj, "convert") and hasattr(obj, "size") and hasattr(obj, "mode"):
        return True
    shape = getattr(obj, "shape", None)
    if shape is None or not hasattr(obj, "tolist"):
        return False
    return len(shape) >= 3 or (len(shape) == 2 and str(getattr(obj, "dtype", "")) in ("uint8", "torch.uint8"))


def _atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and ``os.replace``.

    The temporary file is created with mode 0o666, so the result gets the user's umask like any new file
    (``tempfile.mkstemp`` would leave it 0600).
    """
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                fd = os.open(tmp, flags, 0o666)
                break
            except FileExistsError:
                continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as err:
        raise ExportError(f"{path}: cannot write the report ({err.strerror or err})") from err
    return path


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike[str], *,
                 gallery: list[dict] | None = None) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``, each atomically.

    Args:
        report: The report dictionary (see :func:`render_html`).
        out_dir: Output folder; created if missing.
        gallery: Image grids shown in the HTML only (see :func:`render_html`); never stored in the JSON.

    Returns:
        The paths of ``report.json`` and ``report.html``.

    Raises:
        ExportError: A file could not be written.
    """
    out = Path(out_dir)
    text = json.dumps(to_json_safe(report), indent=2, sort_keys=True, allow_nan=False) + "\n"
    page = render_html(report, gallery)
    json_path = _atomic_write_text(out / "report.json", text)
    html_path = _atomic_write_text(out / "report.html", page)
    logger.info("wrote %s and %s (%.1f kB)", json_path, html_path, len(page) / 1024)
    return json_path, html_path
