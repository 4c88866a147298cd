"""Plots drawn with matplotlib (outside pyplot) and embedded as PNG data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .labels import _edit_label, _is_missing, _sampler_label, short_layer_name

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies); the unedited model is always
# orange and the (first) edit blue.
_BEFORE_COLOUR, _AFTER_COLOUR = "#D55E00", "#0072B2"
_PALETTE = (_BEFORE_COLOUR, _AFTER_COLOUR, "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")




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


def _plot_sweep(rows: Sequence[Mapping[str, Any]], chosen: Any = None) -> tuple[str, int] | None:
    x_key = "fraction" if any(not _is_missing(r.get("fraction")) for r in rows) else "ratio"
    pts = sorted((r for r in rows if not _is_missing(r.get(x_key))), key=lambda r: float(r[x_key]))
    if not pts:
        return None
    xs = [(100 if x_key == "fraction" else 1) * float(r[x_key]) for r in pts]
    fig, ax = _figure(6.0, 3.8)
    handles = []
    series = (("locate_replication", "replication, memorized prompts given", _BEFORE_COLOUR, "o"),
              ("out_of_fold_replication", "replication, out of fold", _PALETTE[3], "D"),
              ("heldout_replication", "replication, held-out split", _AFTER_COLOUR, "s"))
    for key, label, colour, marker in series:
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
    if not _is_missing(chosen):
        at = [x for x, r in zip(xs, pts) if not _is_missing(r.get("strength")) and float(r["strength"]) == float(chosen)]
        if at:
            handles.append(ax.axvline(at[0], color="#000000", linestyle="--", linewidth=1, label="chosen strength"))
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



def _plot_rounds(rounds: Sequence[Mapping[str, Any]], samplers: Sequence[str], target: Any) -> tuple[str, int] | None:
    """Attack rate on the given memorized prompts at each robust round, one line per sampler setting."""
    fig, ax = _figure(6.0, 3.6)
    drawn = False
    for i, name in enumerate(samplers):
        xy = [(float(r.get("round", k)), 100 * float(r["attack_rate_by_sampler"][name])) for k, r in enumerate(rounds)
              if isinstance(r.get("attack_rate_by_sampler"), Mapping)
              and not _is_missing(r["attack_rate_by_sampler"].get(name))]
        if xy:
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="os^D"[i % 4], color=_PALETTE[(i + 1) % len(_PALETTE)],
                    linewidth=2, label=f"attack, {_sampler_label(name)}")
            drawn = True
    if not drawn:
        return None
    if not _is_missing(target):
        ax.axhline(100 * float(target), color="#000000", linestyle="--", linewidth=1,
                   label=f"target ({100 * float(target):.1f}%)")
    xs = sorted({float(r.get("round", k)) for k, r in enumerate(rounds)})
    ax.set_xticks(xs, [f"{int(x)}" for x in xs])
    ax.set_ylim(-4, 104)
    _percent_axis(ax.yaxis)
    ax.set(xlabel="robust round", ylabel="replication under attack", title="Attack rate per robust round")
    ax.legend(loc="best", frameon=False, fontsize=8)
    return _fig_uri(fig)
