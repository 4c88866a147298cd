"""The sections of the page, each built from one part of the report dictionary (absent parts give none)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .gallery import _gallery_rows
from .labels import (_DRIFT_KEYS, _HEADERS, _METRICS, _SPLIT_SHORT, _SPLITS, _clean_text, _edit_label,
                     _fmt_change, _guess_kind, _humanize, _is_missing, _split_label)
from .rows import EditRow
from .mitigation import (_held_out_sampler_table, _kid_text, _mitigation, _section_given, _section_quality,
                         _section_result, _section_rounds)
from .page import Block, Cell, Plot, Section, Table, _kv_table, _num_cell, _scalar_items
from .plots import (_plot_duplication, _plot_iou, _plot_reextract, _plot_roc, _plot_scores, _plot_sweep,
                    _series)
from .settings import _has_given, _sampler_blocks, _scorer_blocks, _timings_table

_EDIT_COLUMNS = ("heldout_replication_prompt", "heldout_replication_attack", "heldout_rows_attacked",
                 "never_seen_rate", "attack_advantage", "control_rate", "drift_similarity", "seed_similarity_before",
                 "drift_within_spread", "drift_similarity_unseen", "drift_within_spread_unseen", "drift_unseen_rows",
                 "parameters_changed", "fraction_changed", "wall_time_s", "measure_time_s")


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
        "never_seen_rate": (
            "The same attack, with the same budget, aimed at images like the memorized ones that are in no training "
            "set. Whatever the attack recovers here it makes up without any memory."),
        "attack_advantage": (
            "Held-out replication under attack minus the never-seen rate, in percentage points: what the attack "
            "recovers thanks to memorization. This is the figure that counts; near zero means the memory is gone."),
        "control_rate": (
            "The same attack aimed at non-memorized training images (seen once in training). It measures how much "
            "the attack recovers from images the model saw without memorizing them."),
        "drift_similarity": (
            "For non-memorized prompts, the similarity between each edited image and the unedited image at the "
            "same seed. 1 means the edit left ordinary generations untouched."),
        "seed_similarity_before": (
            "The similarity between two seeds of the same prompt in the unedited model: how much images vary "
            "anyway. Drift similarity at or above it is smaller than changing the seed."),
        "drift_within_spread": "Share of non-memorized prompts whose drift similarity is at or above their "
                               "seed-to-seed similarity, i.e. whose change is within the natural spread.",
        "drift_similarity_unseen": (
            "Drift similarity on the non-memorized prompts that the repair did not fit on (the repair sees part of "
            "the nonmem rows; on those it fitted, drift is in-sample)."),
        "drift_within_spread_unseen": "Drift within seed spread on the non-memorized prompts the repair did not fit "
                                      "on.",
        "drift_unseen_rows": "Number of non-memorized prompts the repair did not fit on (those two columns' rows).",
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
    edits: list[EditRow] = [e for e in report.get("edits") or [] if isinstance(e, Mapping)]  # type: ignore[misc]
    if not edits:
        return None
    keys = [k for k in _EDIT_COLUMNS if any(k in e for e in edits)]
    keys += sorted({k for e in edits for k in e if k not in keys and k != "name" and not str(k).startswith("_")
                    and not isinstance(e[k], (Mapping, list))})
    rows = []
    for e in edits:
        row = [Cell(_edit_label(e.get("name")))]
        row += [_num_cell(e.get(k), _guess_kind(k, e.get(k))) for k in keys]
        rows.append(row)
    table = Table(["Edit"] + [_HEADERS.get(k, _humanize(k)) for k in keys], rows, [False] + [True] * len(keys))
    blocks = [Block("table", table=table)]
    by_sampler = _held_out_sampler_table(edits)
    if by_sampler is not None:
        blocks.append(Block("table", table=by_sampler))
    blocks.append(Block("definitions", heading="What the columns mean",
                        definitions=_edit_definitions(["name", *keys], threshold)))
    if by_sampler is not None:
        blocks.append(Block("paragraph", text=(
            "Sampler settings: the model's own; diffusers' defaults for the pipeline (typically 50 steps, guidance "
            "7.5, no rescale); and the model's own with twice the guidance. Under attack, a seed counts when any "
            "start of the attack replicates it; the last columns give each start on its own.")))
    if _has_given(report):
        return Section("edits", "Held-out results",
                       "The edit measured on the held-out memorized prompts, which mitigation never read: how often "
                       "their training images still come back, from the prompt and under attack, beside the same "
                       "attack on images in no training set.", blocks)
    return Section("edits", "Edits compared",
                   "One row per edit of the model: how often memorized training images still come back, from their "
                   "prompt and under attack, and how much the edit disturbs everything else.", blocks)


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
    scored = any(c.score for r in rows for c in r.cells)
    intro = caption or ("Generated images with their similarity to the training image." if scored else
                        "Generated images.")
    if any(c.pixelated for r in rows for c in r.cells):
        intro += " Each image is shown enlarged without smoothing."
    if scored:
        intro += (" Under an image: its similarity to the training image; a red frame marks a replication, a "
                  f"similarity at or above the scorer's threshold{threshold}.")
    return Section(f"images-{index + 1}", title, intro, [Block("gallery", gallery=rows)])


_SWEEP_COLUMNS = ("strength", "ratio", "fraction", "parameters_changed", "locate_replication",
                  "out_of_fold_replication", "heldout_replication", "drift_similarity", "seed_similarity_before",
                  "drift_within_spread")


_MARGIN_NOTE = {  # (chosen, the row's margin mark) -> the Chosen cell
    (False, "first acceptable"): "first to meet the target",
    (True, "first acceptable"): "chosen: first to meet the target",
    (True, "taken"): "chosen: a margin step past the first to meet the target",
    (False, "rejected: drift or plausibility"): "margin step refused: drift or plausibility",
}


def _section_sweep(report: Mapping[str, Any]) -> Section | None:
    rows = [r for r in report.get("sweep") or _mitigation(report).get("sweep") or [] if isinstance(r, Mapping)]
    if not rows:
        return None
    rows = [{**r, "parameters_changed": r.get("parameters_changed", r.get("weights_zeroed"))} for r in rows]
    keys = [k for k in _SWEEP_COLUMNS if any(k in r and (k != "parameters_changed" or r[k] is not None)
                                             for r in rows)]
    if "strength" in keys and "ratio" in keys and all(r.get("ratio") == r.get("strength") for r in rows):
        keys.remove("ratio")
    chosen = _mitigation(report).get("strength")
    mark = "strength" in keys and not _is_missing(chosen)
    kid = any(isinstance(r.get("memorized_becomes"), Mapping) for r in rows)
    judged = any(isinstance(r.get("plausible"), bool) for r in rows)
    table_rows = []
    for r in rows:
        cells = [_num_cell(r.get(k), "setting" if k == "strength" else _guess_kind(k, r.get(k))) for k in keys]
        becomes = r.get("memorized_becomes") if isinstance(r.get("memorized_becomes"), Mapping) else {}
        if kid:
            cells.append(Cell(_kid_text(becomes.get("kid_mean"), becomes.get("kid_std")), numeric=True))
        if judged:
            cells.append(Cell({True: "yes", False: "no"}.get(r.get("plausible"), "")))
        if mark:
            picked = not _is_missing(r.get("strength")) and float(r["strength"]) == float(chosen)
            cells.append(Cell(_MARGIN_NOTE.get((picked, str(r.get("margin") or "")), "chosen" if picked else "")))
        table_rows.append(cells)
    extra = ((["Memorized prompts' KID \u00d710\u00b3"] if kid else [])
             + (["Memorized prompts plausible"] if judged else []))
    columns = [_HEADERS.get(k, _humanize(k)) for k in keys] + extra + (["Chosen"] if mark else [])
    table = Table(columns, table_rows, [True] * (len(keys) + kid) + [False] * (judged + mark))
    blocks = [Block("table", table=table)]
    uri = _plot_sweep(rows, chosen)
    if uri:
        blocks.insert(0, Block("plots", plots=[Plot(*uri, "Replication and drift against the share of weights "
                                                         "changed")]))
    intro = ("The edit repeated at several sizes: replication of memorized images (on the prompts used to find the "
             "edit, out of fold where cross-fitted, and on held-out prompts where measured) and drift of ordinary "
             "images, against the share of weights changed. A good edit removes replication long before drift "
             "falls.")
    given = report.get("settings") if isinstance(report.get("settings"), Mapping) else {}
    if "strength" in keys:
        intro += " The strength is the mask ratio (the rank for the directions method)"
        intro += (": this run was given one." if not _is_missing(given.get("ratio")) else
                  "; the smallest strength whose replication (out of fold when measured) meets the target while "
                  "ordinary images stay within their seed spread and memorized prompts still render plausible "
                  "images is found first.")
        if kid:
            unedited = _mitigation(report).get("estimate") or {}
            band = unedited.get("memorized_kid_unedited") if isinstance(unedited, Mapping) else None
            intro += (" Plausible: the memorized prompts' generations are as close to the model's ordinary "
                      "generations (KID on SSCD features) as the unedited memorized images are"
                      + ("" if _is_missing(band) else f" ({_kid_text(band, None)} \u00d710\u207b\u00b3)")
                      + ", within two standard deviations of the edited figure.")
        if any(r.get("margin") for r in rows):
            intro += (" That first figure is the lowest of several noisy measurements, so it flatters the edit on "
                      "images that were not given: the choice then moves on by a margin step to the next strength "
                      "when it too keeps drift and plausibility.")
    return Section("sweep", "How large an edit is needed", intro, blocks)


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
    """Sampler, scorer (unless the ``given`` section shows them), time per phase and the machine."""
    blocks: list[Block] = []
    if not _has_given(report):
        blocks += _sampler_blocks(report.get("sampler")) + _scorer_blocks(report.get("scorer"))
    timings = _timings_table(report)
    if timings is not None:
        blocks.append(Block("table", table=timings))
    machine = report.get("machine")
    if isinstance(machine, Mapping) and machine:
        blocks.append(Block("table", table=_kv_table(_scalar_items(machine), caption="Machine")))
    elif machine and not _is_missing(machine):
        blocks.append(Block("paragraph", text=f"Machine: {_clean_text(str(machine))}"))
    if not blocks:
        return None
    intro = ("Where the time went, and the machine." if _has_given(report) else
             "The sampler settings and the similarity scorer behind every number above, and where the time went.")
    return Section("run", "How this run was made", intro, blocks)


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
    galleries = [_section_gallery(i, g, thr) for i, g in enumerate(gallery or []) if isinstance(g, Mapping)]
    if _has_given(report):  # a mitigation run: what was given, the result, then how it was reached
        sections = [_section_given(report), _section_result(report), _section_edits(report, thr),
                    _section_sweep(report), _section_rounds(report), *galleries, _section_quality(report)]
    else:
        sections = [_section_edits(report, thr), _section_result(report), _section_splits(report, thr),
                    *galleries, _section_sweep(report), _section_rounds(report), _section_quality(report)]
    for key, build in _BLOCK_SECTIONS:
        block = report.get(key)
        if isinstance(block, Mapping) and block:
            sections.append(build(block))
    sections.append(_section_run(report))
    out = [s for s in sections if s is not None]
    counts = Counter(s.title for s in out)
    seen: Counter[str] = Counter()
    for s in out:  # a title given twice (e.g. by two galleries) is numbered, so that each reads once
        if counts[s.title] > 1:
            seen[s.title] += 1
            s.title = f"{s.title} ({seen[s.title]})"
    return out

