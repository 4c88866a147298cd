"""``report.json`` and a single self-contained ``report.html`` (images and plots embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["write_report", "image_grid", "png_data_uri"]


def png_data_uri(img: np.ndarray, scale: int = 1) -> str:
    """A uint8 RGB image as a ``data:image/png;base64,...`` URI (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    pil = Image.fromarray(img)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_grid(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tile equally sized uint8 images into one image, row by row, with white gaps."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = img[:h, :w]
    return grid


def _fig_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    mask = report.get("mask")
    if mask and mask.get("per_layer"):
        names = list(mask["per_layer"])
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
        ax.barh(range(len(names)), [mask["per_layer"][n] for n in names], color="#c0392b")
        ax.set_yticks(range(len(names)), [n.replace(".transformer_blocks", ".tb") for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("weights zeroed")
        ax.set_title("Pruned weights per FFN layer")
        out["layers"] = _fig_uri(fig)
    roc = (report.get("detection") or {}).get("roc")
    if roc:
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.plot(roc["fpr"], roc["tpr"], color="#2c3e50")
        ax.plot([0, 1], [0, 1], ls="--", color="#aaa")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"Detection ROC (AUC {report['detection'].get('auc', float('nan')):.3f})")
        out["roc"] = _fig_uri(fig)
    by_dup = (report.get("before") or {}).get("by_duplicates")
    if by_dup:
        dups = sorted(by_dup, key=int)
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        for block, colour in (("before", "#c0392b"), ("after", "#27ae60")):
            bd = (report.get(block) or {}).get("by_duplicates") or {}
            ys = [(bd.get(d) or {}).get("replication_rate") for d in dups]
            ys = [np.nan if y is None else y for y in ys]
            ax.plot([int(d) for d in dups], ys, marker="o", color=colour, label=block)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("duplicates in training set")
        ax.set_ylabel("replication rate")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
        ax.set_title("Replication vs duplication")
        out["dup"] = _fig_uri(fig)
    dirs = report.get("directions") or {}
    curves = dirs.get("explained_variance")
    if curves:
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        for name, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), ys, label=name.split(".transformer_blocks")[0], lw=1)
        ax.set_xlabel("directions k")
        ax.set_ylabel("share of memorized-vs-base energy")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6)
        ax.set_title("Explained variance per layer")
        out["ev"] = _fig_uri(fig)
    return out


def _table(rows: list[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4g}"
        return html.escape(str(v))

    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows) + "</table>"


def _split_table(report: dict) -> str:
    keys = ("replication_rate", "replication_rate_strict", "max_similarity", "mean_similarity", "diversity_similarity",
            "drift_similarity")
    head = "<tr><th>run</th><th>split</th><th>prompts</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    body = []
    for block in ("before", "after"):
        for split in ("locate", "heldout", "nonmem"):
            s = (report.get(block) or {}).get(split)
            if not s:
                continue
            cells = "".join(
                f"<td>{'' if s.get(k) is None else f'{s[k]:.3f}'}</td>" for k in keys
            )
            body.append(f"<tr><td>{block}</td><td>{split}</td><td>{s.get('num_prompts')}</td>{cells}</tr>")
    return "<table>" + head + "".join(body) + "</table>"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f4f4f4}img.plot{margin:4px;vertical-align:top}.grid img{image-rendering:pixelated}
.note{color:#666;font-size:13px}
"""


def _grids(report: dict, before, after, entries) -> str:
    if before is None or before.images is None:
        return ""
    from diffmem.evaluate import load_reference

    parts = []
    for split in ("heldout", "locate", "nonmem"):
        idx = [i for i, r in enumerate(before.rows) if r["split"] == split][:12]
        if not idx:
            continue
        rows = []
        for i in idx:
            gens_b = list(before.images[i][:4])
            h, w = gens_b[0].shape[:2]
            ref = entries[i].reference if entries is not None else None
            ref_img = load_reference(ref, (h, w)) if ref is not None else np.full((h, w, 3), 255, np.uint8)
            blank = np.full((h, w, 3), 255, np.uint8)
            row = [ref_img, blank] + gens_b
            if after is not None and after.images is not None:
                row += [blank] + list(after.images[i][:4])
            rows.append(row)
        scale = max(1, 96 // rows[0][0].shape[0])
        caption = "reference | before (4 seeds)" + (" | after (4 seeds)" if after is not None else "")
        parts.append(f"<h3>{split}: {caption}</h3><div class='grid'><img src='{png_data_uri(image_grid(rows), scale)}'></div>")
    return "".join(parts)


def write_report(report: dict, out: str | Path, *, before=None, after=None, entries=None) -> tuple[Path, Path]:
    """Write ``report.json`` (sorted keys) and ``report.html`` into ``out``.

    Args:
        report: The report dictionary (``before``/``after`` summaries, ``mask``, ``detection``, ...).
        out: Output folder.
        before: The unedited :class:`~diffmem.evaluate.EvalResult` (for image grids).
        after: The edited result.
        entries: Manifest entries in the same order (for reference images).

    Returns:
        Paths of the JSON and HTML files.
    """
    out = Path(out)
    json_path = atomic_write_text(out / "report.json", json.dumps(_clean(report), indent=2, sort_keys=True) + "\n")
    plots = _plots(report)
    h = report.get("headline") or {}
    sections = [f"<h1>diffmem report</h1><p class='note'>model: {html.escape(str(report.get('model')))}</p>"]
    if h:
        sections.append("<h2>Headline</h2>" + _table(list(h.items())))
    sc = report.get("scorer")
    if sc:
        note = " (random weights: these numbers mean nothing)" if sc.get("random_weights") else ""
        sections.append(f"<p class='note'>similarity scorer: {html.escape(json.dumps(sc, sort_keys=True))}{note}</p>")
    if report.get("before"):
        sections.append("<h2>Replication by split</h2>" + _split_table(report))
    if report.get("drift"):
        sections.append("<h3>Non-memorized drift</h3>" + _table(list(report["drift"].items())))
    if report.get("attack"):
        a = report["attack"]
        rows = []
        for k in ("before", "after"):
            if isinstance(a.get(k), dict):
                rows += [(f"{k}: {kk}", vv) for kk, vv in a[k].items()]
        if not rows:
            rows = [(k, v) for k, v in a.items() if not isinstance(v, (dict, list))]
        sections.append("<h2>Extraction attack</h2>" + _table(rows))
    if report.get("iou_subsets"):
        i = report["iou_subsets"]
        sections.append("<h2>Shared subspace: masks from disjoint prompt subsets</h2>" + _table(
            [("IoU overall", i["overall"]), ("IoU at chance", i.get("chance_overall")),
             ("subset sizes", i.get("subset_sizes"))] + [(f"IoU {k}", v) for k, v in i["per_layer"].items()]))
    if report.get("mask", {}).get("sweep"):
        sw = report["mask"]["sweep"]
        sections.append("<h3>Ratio sweep (locate split only)</h3><table><tr><th>ratio</th><th>weights</th>"
                        "<th>locate replication</th></tr>" + "".join(
                            f"<tr><td>{r['ratio']}</td><td>{r['weights_zeroed']}</td><td>{r['locate_replication']:.3f}</td></tr>"
                            for r in sw) + "</table>")
    if report.get("directions"):
        d = report["directions"]
        rows = [(k, v) for k, v in (d.get("comparison") or {}).items()]
        sections.append("<h2>Sparse mask vs low-rank projection</h2>" + _table(rows))
    if plots:
        sections.append("<h2>Plots</h2>" + "".join(f"<img class='plot' src='{u}'>" for u in plots.values()))
    sections.append("<h2>Images</h2>" + _grids(report, before, after, entries))
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>diffmem report</title><style>{_CSS}</style>"
           f"</head><body>{''.join(sections)}</body></html>")
    html_path = atomic_write_text(out / "report.html", doc)
    logger.info("wrote %s and %s", json_path, html_path)
    return json_path, html_path


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python, private keys dropped."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
