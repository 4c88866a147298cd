"""Tables of a run's settings, shared by the sections: sampler, scorer, mitigation settings and time per phase."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .labels import _SETTINGS, _humanize, _is_missing, _phase_label
from .page import Block, Table, _kv_table

_SCORER_NAMES = ("ssim", "sscd", "clip", "ms-ssim")


def _has_given(report: Mapping[str, Any]) -> bool:
    """Whether the report lists what the user gave (``given``): that section then shows the model and settings."""
    given = report.get("given")
    return isinstance(given, Mapping) and bool(given)


def _sampler_blocks(sampler: Any) -> list[Block]:
    if not isinstance(sampler, Mapping) or not sampler:
        return []
    items = []
    in_use = sampler.get("scheduler_in_use")
    for k, v in sampler.items():
        if isinstance(v, Mapping) or k == "scheduler_in_use":
            continue
        if k == "scheduler" and _is_missing(v):
            v = f"{in_use} (the model's own)" if in_use and not _is_missing(in_use) else "the model's own"
        elif _is_missing(v):
            v = "default"
        items.append((_SETTINGS.get(str(k), _humanize(str(k))), v, "setting"))
    if "scheduler" not in sampler and in_use and not _is_missing(in_use):
        items.append((_SETTINGS["scheduler"], in_use, "setting"))
    return [Block("table", table=_kv_table(items, value_header="Value", key_header="Setting", caption="Sampler"))]


def _scorer_blocks(scorer: Any) -> list[Block]:
    if not isinstance(scorer, Mapping) or not scorer:
        return []
    items = []
    for k, v in scorer.items():
        if isinstance(v, Mapping):
            continue
        kind = "similarity" if k in ("threshold", "report_thresholds") else "setting"
        if k == "name" and isinstance(v, str):
            v = v.upper() if v.lower() in _SCORER_NAMES else v
        items.append((_SETTINGS.get(str(k), _humanize(str(k))), v, kind))
    table = _kv_table(items, value_header="Value", key_header="Setting", caption="Similarity scorer")
    for (label, _, _), row in zip(items, table.rows):
        if label in (_SETTINGS["source"], _SETTINGS["preprocessing"]):
            row[1].code = True  # verbatim technical text from the scorer
    blocks = [Block("table", table=table)]
    if scorer.get("random_weights"):
        blocks.append(Block("note", text="The scorer has random weights: its similarities mean nothing."))
    return blocks


def _timings_table(report: Mapping[str, Any]) -> Table | None:
    timings = report.get("timings_s")
    total = report.get("total_seconds")
    if not (isinstance(timings, Mapping) and timings) and _is_missing(total):
        return None
    items = [(_phase_label(str(k)), v, "seconds") for k, v in (timings or {}).items() if not isinstance(v, Mapping)]
    if not _is_missing(total):
        items.append(("Total", total, "seconds"))
    return _kv_table(items, value_header="Time", caption="Time per phase", key_header="Phase")
