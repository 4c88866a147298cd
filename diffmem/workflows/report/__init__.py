"""Write a run's results as ``report.json`` and one self-contained, readable ``report.html``.

The report is a plain dictionary; every section is optional and a section that is absent is left out of the page.
The HTML embeds everything it shows (images as PNG data URIs, plots drawn with matplotlib), so the file can be
mailed or archived on its own. Every metric is shown with a human label and a fixed precision: rates as
percentages with one decimal, similarities with three decimals, counts as integers with thousands separators,
and ``not measured`` where a value is missing.

Sections read from the report dictionary (see :func:`render_html` for their shapes): ``given`` and ``mitigation``
(a mitigation run: what was given, the result with its out-of-fold estimate, robust rounds), ``edits`` (the main
table), ``before`` / ``after``, ``sweep``, ``quality``, ``reextract``, ``attack``, ``detection``, ``iou_subsets``,
``locality`` and the run details (``title``, ``model``, ``headline_text``, ``sampler``, ``scorer``, ``timings_s``,
``total_seconds``, ``machine``). Image grids are passed separately as ``gallery`` and never stored in the JSON.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any


from diffmem.errors import ExportError
from diffmem.files import atomic_write_text, jsonable

from .labels import _clean_text, _is_missing, short_layer_name
from .sections import _sections
from .settings import _has_given

logger = logging.getLogger(__name__)

__all__ = ["write_report", "render_html", "to_json_safe", "short_layer_name"]

_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_TEMPLATE_NAME = "report.html.j2"


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(report: Mapping[str, Any], gallery: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Render the report as one self-contained HTML page (pure: reads its arguments, writes nothing).

    Args:
        report: The report dictionary. Every section is optional:

            - ``title``, ``model``, ``headline_text`` (multi-line; not shown on a mitigation page, whose result
              section says the same), ``sampler`` (settings, optionally ``scheduler_in_use``), ``scorer`` (with
              ``name`` and ``threshold``), ``timings_s`` (phase -> seconds), ``total_seconds``, ``machine``;
            - ``given``: rows of the manifest by split (``locate``, ``nonmem``, ``heldout``, ...). Its presence
              makes the page a mitigation page: what was given (with the model and the ``settings``), the result,
              the held-out results, the sweep, the robust rounds, the images, quality and time;
            - ``mitigation``: :meth:`diffmem.mitigation.MitigationResult.summary` (``estimate`` with ``in_sample``,
              ``out_of_fold`` and ``folds``; ``strength``, ``sweep``, ``rounds``, ...);
            - ``edits``: rows with ``name``, ``heldout_replication_prompt``, ``heldout_replication_attack``,
              ``never_seen_rate``, ``attack_advantage``, ``control_rate``, ``heldout_prompt_by_sampler``,
              ``heldout_attack_by_sampler``, ``heldout_attack_by_start``, ``drift_similarity``,
              ``seed_similarity_before``, ``drift_within_spread``, ``parameters_changed``, ``fraction_changed``,
              ``wall_time_s``;
            - ``before`` / ``after``: ``{split: {num_prompts, replication_rate, ...}, "by_duplicates": {...}}``;
            - ``sweep`` (else ``mitigation["sweep"]``): rows with ``strength`` or ``ratio``, ``fraction``,
              ``parameters_changed``, ``locate_replication`` and optionally ``out_of_fold_replication``,
              ``heldout_replication``, ``drift_similarity``, ``seed_similarity_before``, ``drift_within_spread``;
            - ``quality``: ``ordinary`` (:func:`diffmem.quality.quality_report`), ``memorized``
              (:func:`diffmem.quality.memorized_becomes`), optionally ``memorized_before`` (the same prompts and
              seeds before the edit: the page's plausibility verdict compares the two) and
              ``memorized_vs_edited``, and / or a one-line ``note``;
            - ``detection``: ``auc``, ``tpr_at_1pct_fpr``, ``roc`` (``fpr``, ``tpr``), ``scores``
              (``prompt``, ``score``, ``memorized``);
            - ``iou_subsets``: ``overall``, ``chance_overall``, ``per_layer`` (layer -> IoU);
            - ``reextract``: ``{edit: {memorization_rate, control_rate, curve: {memorized|control: {step: rate}}}}``;
            - ``attack``: ``{before: {...}, after: {...}}`` extraction-attack summaries (or one flat summary);
            - ``locality``: free-form numbers.
        gallery: Image grids: ``[{title, caption, rows: [{prompt, split, duplicates, note, cells: [{label, image,
            score, replicated, detail}]}]}]`` with ``image`` an ``H x W x 3`` uint8 array; ``note`` (per row) and
            ``detail`` (per image) are optional lines of text.

    Returns:
        The HTML document.
    """
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a mapping, not {type(report).__name__}")
    import matplotlib

    with matplotlib.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
                                "font.family": "DejaVu Sans"}):
        sections = _sections(report, gallery)
    title = _clean_text(str(report.get("title") or "diffmem report"))
    model = "" if _is_missing(report.get("model")) or not report.get("model") else str(report["model"])
    headline = _headline(report, model)
    if _has_given(report):  # the "what was given" section names the model
        model = ""
    template = _environment().get_template(_TEMPLATE_NAME)
    return template.render(title=title, model=model, headline=headline, sections=sections)


def _headline(report: Mapping[str, Any], model: str) -> str:
    """The terminal summary shown under the title: none on a mitigation page (its result section says it all), and
    without a first line that names the model (the page names it once)."""
    text = report.get("headline_text")
    if not text or _is_missing(text) or _has_given(report):
        return ""
    lines = _clean_text(str(text)).strip("\n").split("\n")
    if model and lines and model in lines[0]:
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def to_json_safe(obj: Any) -> Any:
    """A JSON-safe copy of ``obj`` for report.json: keys starting with ``_`` and image data (arrays of 3 or more
    dimensions, 2-d uint8 arrays, PIL images, bytes) are dropped, then :func:`diffmem.files.jsonable` (NaN and
    infinities become ``None``, numpy values Python ones, paths strings); anything else becomes its string.
    """
    return jsonable(_without_images(obj), default=str)


def _without_images(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _without_images(v) for k, v in obj.items() if not str(k).startswith("_") and not _is_image(v)}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_without_images(v) for v in obj if not _is_image(v)]
    return obj


def _is_image(obj: Any) -> bool:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return True
    if hasattr(obj, "convert") and hasattr(obj, "size") and hasattr(obj, "mode"):
        return True
    shape = getattr(obj, "shape", None)
    if shape is None or not hasattr(obj, "tolist"):
        return False
    return len(shape) >= 3 or (len(shape) == 2 and str(getattr(obj, "dtype", "")) in ("uint8", "torch.uint8"))


def _write_text(path: Path, text: str) -> Path:
    """Write one report file atomically (:func:`diffmem.files.atomic_write_text`); a failure is an ExportError."""
    try:
        return atomic_write_text(path, text)
    except OSError as err:
        raise ExportError(f"{path}: cannot write the report ({err.strerror or err})") from err


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
    json_path = _write_text(out / "report.json", text)
    html_path = _write_text(out / "report.html", page)
    logger.info("wrote %s and %s (%.1f kB)", json_path, html_path, len(page) / 1024)
    return json_path, html_path
