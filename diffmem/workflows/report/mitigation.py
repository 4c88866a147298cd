"""Sections of a mitigation: what was given, the result with its out-of-fold estimate, robust rounds and quality.

They read ``given`` (counts by split), ``settings``, ``mitigation``
(:meth:`diffmem.mitigation.MitigationResult.summary`),
``edits`` (held-out rows, when measured) and ``quality`` of the report.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .labels import (NOT_MEASURED, _SAMPLERS, _edit_label, _fmt, _humanize, _init_label, _is_missing,
                     _sampler_label, _signed)
from .page import Block, Cell, Plot, Section, Table, _kv_table, _num_cell
from .plots import _plot_rounds
from .rows import EditRow
from .settings import _sampler_blocks, _scorer_blocks

# Rows of the "what was given" table: (key of ``given``, label).
_GIVEN = (("locate", "Memorized prompts given (locate rows), with their training images"),
          ("nonmem", "Ordinary prompts given (nonmem rows)"),
          ("heldout", "Held-out memorized prompts (heldout rows), measured after the edit and never used to fit it"),
          ("heldout_without_reference", "Held-out rows without a training image (not measured)"),
          ("never_seen", "Never-seen images, the control of the held-out measurement"))
# Settings of ``diffmem mitigate`` worth showing beside the inputs: (key of ``settings``, label).
_MITIGATE_SETTINGS = (("method", "Method that locates the edit"), ("ratio", "Strength"),
                      ("robust", "Hardening against the attack"), ("target", "Target replication rate"),
                      ("max_rounds", "Robust rounds at most"),
                      ("robust_gate", "Robust rounds held to the quality vetoes"),
                      ("redirect", "Memorized prompts redirected to ordinary captions"),
                      ("repair", "Ordinary prompts repaired (distillation steps)"),
                      ("folds", "Cross-fitting folds"), ("opt_steps", "Optimisation steps of the attack"),
                      ("eval_num_seeds", "Seeds per held-out prompt"))
_ROBUST = {"none": "not hardened", "prune": "robust pruning rounds", "finetune": "adversarial fine-tuning rounds"}


def _mitigation(report: Mapping[str, Any]) -> Mapping[str, Any]:
    m = report.get("mitigation")
    return m if isinstance(m, Mapping) else {}


def _ordered_samplers(*blocks: Any) -> list[str]:
    """Sampler names present in any of ``blocks`` ({sampler: value} mappings), the known ones first."""
    names = {str(k) for b in blocks if isinstance(b, Mapping) for k in b}
    return [n for n in _SAMPLERS if n in names] + sorted(names - set(_SAMPLERS))


def _rate_pm(value: Any, spread: Any = None) -> Cell:
    """A rate with its spread over folds: ``12.5% ± 4.2 pp``."""
    if _is_missing(value):
        return Cell(NOT_MEASURED, css="missing")
    text = _fmt(value, "rate")
    if not _is_missing(spread):
        text += f" \u00b1 {100 * float(spread):.1f} pp"
    return Cell(text, numeric=True)


def _section_given(report: Mapping[str, Any]) -> Section | None:
    given = report.get("given")
    if not isinstance(given, Mapping) or not given:
        return None
    rows: list[list[Cell]] = []
    if report.get("model") and not _is_missing(report.get("model")):
        rows.append([Cell("Model"), Cell(str(report["model"]), code=True)])
    known = {k for k, _ in _GIVEN}
    for key, label in _GIVEN:
        if key in given:
            rows.append([Cell(label), _num_cell(given[key], "count")])
    for key, value in given.items():
        if key not in known and not isinstance(value, (Mapping, list)):
            rows.append([Cell(_humanize(str(key))), _num_cell(value, "count")])
    for row in rows:
        row[1].numeric = False
    blocks = [Block("table", table=Table(["Input", "Given"], rows, [False, False], "Model and prompts"))]
    settings = report.get("settings") if isinstance(report.get("settings"), Mapping) else {}
    items = []
    for key, label in _MITIGATE_SETTINGS:
        if key not in settings:
            continue
        value = settings[key]
        if key == "ratio" and _is_missing(value):
            value = "chosen automatically"
        elif key == "robust":
            value = _ROBUST.get(str(value), value)
        elif key == "robust_gate":
            value = "yes" if value else "no"
        elif key == "redirect":
            value = ("no" if _is_missing(value)
                     else f"yes (\u03bb = {float(value):g}, weight on keeping ordinary prompts)")
        elif key == "repair":
            share = (settings.get("mitigation") or {}).get("repair_share", 0.5)
            value = "no" if not value else f"yes ({int(value)} steps on {100 * float(share):.0f}% of the nonmem rows)"
        items.append((label, value, "rate" if key == "target" else "setting"))
    if items:
        blocks.append(Block("table", table=_kv_table(items, key_header="Setting", caption="Mitigation")))
    blocks += _sampler_blocks(report.get("sampler")) + _scorer_blocks(report.get("scorer"))
    if not given.get("heldout"):
        blocks.append(Block("note", text=(
            "No held-out memorized prompts were given, so nothing was measured on memorized images kept apart. "
            "The figure for memorized images not given is the cross-fitted estimate in the next section.")))
    return Section("given", "What was given",
                   "The inputs of this run: the model, the prompts by role, and the settings every figure below was "
                   "measured with.", blocks)


def _estimate_definitions(folds: int, has_attack: bool) -> list[tuple[str, str]]:
    out = [
        ("In-sample", "Measured on the memorized prompts given, the very rows the edit was fitted on. It shows "
                      "that the edit works where it was fitted, and is optimistic about anything else."),
        ("Out-of-fold", f"The given memorized prompts are dealt into {folds} folds; the whole fit (strength, robust "
                        "rounds) is repeated without each fold and measured on the fold left out. The mean over all "
                        "rows is what to expect on memorized images that were not given. \u00b1 is the standard "
                        "deviation over the folds, in percentage points." if folds else
                        "Measured on rows the edit was not fitted on (cross-fitting)."),
        ("With the prompt", "Share of generations from the plain prompt that replicate the training image."),
    ]
    if has_attack:
        out.append(("Under attack", "Share of seeds that replicate when the re-extraction attack optimises the "
                                    "conditioning, counting a seed when any start of the attack (from the prompt, "
                                    "from a random start) replicates it."))
    return out


def _section_result(report: Mapping[str, Any]) -> Section | None:
    m = _mitigation(report)
    est = m.get("estimate") if isinstance(m.get("estimate"), Mapping) else {}
    given = est.get("in_sample") if isinstance(est.get("in_sample"), Mapping) else {}
    oof = est.get("out_of_fold") if isinstance(est.get("out_of_fold"), Mapping) else {}
    if not given and not oof:
        return None
    folds = len(est.get("folds") or [])
    spread = oof.get("spread") if isinstance(oof.get("spread"), Mapping) else {}
    blocks: list[Block] = []
    edit_items = [(label, m.get(key), kind) for key, label, kind in (
        ("kind", "Edit", "setting"), ("strength", "Strength", "setting"),
        ("parameters_changed", "Parameters changed", "count"), ("fraction_changed", "Share of weights changed",
                                                                "share")) if key in m]

    def at(block: Mapping[str, Any], key: str, sampler: str = "model") -> Any:
        part = block.get(key)
        return part.get(sampler) if isinstance(part, Mapping) else None

    rows = []
    if given:
        rows.append([Cell(f"The {_fmt(given.get('rows'), 'count')} memorized prompts given (in-sample)"),
                     Cell("yes"), _rate_pm(at(given, "prompt")), _rate_pm(at(given, "attack"))])
    if oof:
        rows.append([Cell(f"Expected on memorized images not given (out-of-fold, {folds}-fold cross-fit over "
                          f"{_fmt(oof.get('rows'), 'count')} prompts)"), Cell("no"),
                     _rate_pm(at(oof, "prompt"), at(spread, "prompt")),
                     _rate_pm(at(oof, "attack"), at(spread, "attack"))])
    for e in report.get("edits") or []:
        if isinstance(e, Mapping):
            rows.append([Cell("Held-out memorized prompts (measured after the edit)"), Cell("no"),
                         _rate_pm(e.get("heldout_replication_prompt")),
                         _rate_pm(e.get("heldout_replication_attack"))])
    blocks.append(Block("table", table=Table(
        ["Rows measured", "Edit fitted on them", "Replication with the prompt", "Replication under attack"], rows,
        [False, False, True, True], "Replication at the model's own sampler settings")))
    if edit_items:
        blocks.append(Block("table", table=_kv_table(edit_items, caption="The edit")))

    samplers = _ordered_samplers(given.get("prompt"), oof.get("prompt"), given.get("attack"), oof.get("attack"))
    has_attack = any(isinstance(b.get("attack"), Mapping) and b["attack"] for b in (given, oof))
    if len(samplers) > 1:
        cols = [("In-sample, with the prompt", given, "prompt", False), ("Out-of-fold, with the prompt", oof,
                                                                         "prompt", True)]
        if has_attack:
            cols += [("In-sample, under attack", given, "attack", False),
                     ("Out-of-fold, under attack", oof, "attack", True)]
        cols = [c for c in cols if c[1]]
        table_rows = [[Cell(_sampler_label(s).capitalize())]
                      + [_rate_pm(at(block, key, s), at(spread, key, s) if with_spread else None)
                         for _, block, key, with_spread in cols] for s in samplers]
        blocks.append(Block("table", table=Table(["Sampler"] + [c[0] for c in cols], table_rows,
                                                 [False] + [True] * len(cols), "At each sampler setting")))
    by_init = oof.get("attack_by_init") if isinstance(oof.get("attack_by_init"), Mapping) else {}
    if by_init:
        init_samplers = _ordered_samplers(*by_init.values())
        table_rows = [[Cell(f"Attack {_init_label(init)}")]
                      + [_rate_pm((rates or {}).get(s)) for s in init_samplers] for init, rates in by_init.items()]
        blocks.append(Block("table", table=Table(
            ["Start of the attack"] + [_sampler_label(s).capitalize() for s in init_samplers], table_rows,
            [False] + [True] * len(init_samplers), "Out-of-fold replication under attack, by start")))
    groups = [g for g in (spread.get("groups") or []) if isinstance(g, Mapping)]
    if groups:
        table_rows = [[Cell(f"Fold {k + 1}"), _num_cell(g.get("rows"), "count"), _rate_pm(at(g, "prompt"))]
                      + ([_rate_pm(at(g, "attack"))] if has_attack else []) for k, g in enumerate(groups)]
        blocks.append(Block("table", table=Table(
            ["Fold left out", "Prompts", "With the prompt"] + (["Under attack"] if has_attack else []), table_rows,
            [False, True, True] + ([True] if has_attack else []), "Each fold, measured under the edit fitted "
                                                                  "without it (model's settings)")))
    blocks.append(Block("definitions", heading="What the figures mean",
                        definitions=_estimate_definitions(folds, has_attack)))
    if not oof:
        blocks.append(Block("note", text=(
            "No out-of-fold estimate: cross-fitting needs at least as many memorized prompts as folds. The "
            "in-sample figure is optimistic about memorized images that were not given.")))
    if not has_attack:
        blocks.append(Block("note", text=(
            "Replication under attack is measured when the edit is hardened against the attack (robust rounds); "
            "this run has none.")))
    return Section("result", "Result: what the edit does to memorized images",
                   "How often memorized training images still come back after the edit, from their prompt and under "
                   "the re-extraction attack. The figure to rely on is the one for memorized images not given: it is "
                   "measured on rows the edit was not fitted on.", blocks)


def _section_rounds(report: Mapping[str, Any]) -> Section | None:
    rounds = [r for r in _mitigation(report).get("rounds") or [] if isinstance(r, Mapping)]
    if not rounds:
        return None
    samplers = _ordered_samplers(*(r.get("attack_rate_by_sampler") for r in rounds))
    gated = any(isinstance(r.get("quality"), Mapping) for r in rounds)
    rows = []
    for i, r in enumerate(rounds):
        by = r.get("attack_rate_by_sampler") if isinstance(r.get("attack_rate_by_sampler"), Mapping) else {}
        after = r.get("parameters_changed_after")
        last = i == len(rounds) - 1 and _is_missing(after)
        change = ""
        if not _is_missing(after) and not _is_missing(r.get("parameters_changed")):
            delta = int(after) - int(r["parameters_changed"])
            change = _signed(f"{abs(delta):,}", delta)
        added = Cell("last check only", css="missing") if last else Cell(change, numeric=True)
        row = ([Cell(_fmt(r.get("round", i), "count")), _num_cell(r.get("attack_rate_before_round"), "rate")]
               + [_num_cell(by.get(s), "rate") for s in samplers]
               + [_num_cell(r.get("parameters_changed"), "count"), added])
        if gated:
            q = r.get("quality") if isinstance(r.get("quality"), Mapping) else {}
            share = ("" if _is_missing(r.get("fraction_added"))
                     else f", adding {100 * float(r['fraction_added']):.3g} % of the weights")
            verdict = ("" if not q else f"passed{share}" if r.get("gate") == "passed"
                       else f"failed at every size; the smallest kept{share}")
            row += [Cell(_kid_text(q.get("memorized_kid"), q.get("memorized_kid_std")) if q else "",
                         numeric=True), _num_cell(q.get("drift_within_spread"), "rate"), Cell(verdict)]
        rows.append(row)
    columns = (["Round", "Attack rate, worst sampler"] + [f"Attack rate, {_sampler_label(s)}" for s in samplers]
               + ["Parameters changed", "Weights added by the round"])
    if gated:
        columns += ["Memorized prompts' KID \u00d710\u00b3 after the round", "Ordinary prompts within seed spread",
                    "Quality gate"]
    blocks = [Block("table", table=Table(columns, rows, [False] + [True] * (len(columns) - 1)))]
    target = (report.get("settings") or {}).get("target") if isinstance(report.get("settings"), Mapping) else None
    uri = _plot_rounds(rounds, samplers, target)
    if uri:
        blocks.insert(0, Block("plots", plots=[Plot(*uri, "Attack rate on the given memorized prompts per round")]))
    return Section("robust", "Robust rounds against the re-extraction attack",
                   "Each round attacks the given memorized prompts on the current edit (the re-extraction attack, "
                   "from the prompt and from random starts, sampled at each sampler setting) and, while the attack "
                   "still succeeds more often than the target, adds the weights the recovered images rely on. The "
                   "last round only measures. With the quality gate, a round's edit must keep the memorized prompts "
                   "rendering plausibly (their KID to ordinary generations within the unedited model's band) and the "
                   "ordinary prompts within the seed-to-seed spread; a round that breaks this is halved (up to "
                   "twice), and when every size breaks it the smallest is kept.", blocks)


def _kid_text(mean: Any, std: Any) -> str:
    if _is_missing(mean):
        return NOT_MEASURED
    text = f"{1000 * float(mean):.3f}".replace("-", "\u2212")
    if not _is_missing(std):
        text += f" \u00b1 {1000 * float(std):.3f}"
    return text


def _metric_name(name: Any, features: Any) -> str:
    """``KID_sscd`` -> ``KID on SSCD features``; FID and KID on Inception features keep their names."""
    text = str(name or "")
    if "_" not in text:
        return text
    base, feats = text.split("_", 1)
    return f"{base} on {_feature_words(str(features or feats))} features"


def _feature_words(features: str) -> str:
    return features.upper() if features.lower() in ("sscd", "clip") else features.replace("sscd", "SSCD").replace(
        "clip", "CLIP")


def _quality_note(note: str, block: Mapping[str, Any]) -> str:
    """A note of :mod:`diffmem.quality` in the page's words (metric names spelled out, no call syntax)."""
    if note.startswith("CLIP score not computed: no CLIP weights"):
        return "CLIP score not computed: this run was given no CLIP weights."
    for key in ("fd_name", "kid_name"):
        if block.get(key):
            note = note.replace(str(block[key]), _metric_name(block[key], block.get("features")))
    feats = str(block.get("features") or "")
    if feats:
        note = note.replace(f"{feats} features", f"{_feature_words(feats)} features")
    note = re.sub(r"'([^'\s]+)'", r"\1", note)
    return note[:1].upper() + note[1:] + ("" if note.endswith(".") else ".")


def plausibility_verdict(after: Mapping[str, Any], before: Mapping[str, Any] | None) -> str | None:
    """One sentence comparing the memorized prompts' KID after the edit with the same prompts' before it (same seeds,
    same ordinary images), the strength choice's test: at most the figure before plus two standard deviations of the
    figure after (its estimate's noise over the KID subsets), or not; ``None`` when either is missing."""
    if not before:
        return None
    a, sd, b = after.get("kid_mean"), after.get("kid_std"), before.get("kid_mean")
    if _is_missing(a) or _is_missing(b) or _is_missing(sd):
        return None
    a, sd, b = float(a), float(sd), float(b)
    figures = f"{_kid_text(a, sd)} against {_kid_text(b, None)} \u00d710\u207b\u00b3"
    if a <= b + 2.0 * sd:
        return ("Plausible: after the edit the memorized prompts render no further from ordinary images than they "
                f"did before it ({figures}, within two standard deviations).")
    return ("Less plausible than before: after the edit the memorized prompts render further from ordinary images "
            f"than they did before it ({figures}, beyond two standard deviations).")


def _section_quality(report: Mapping[str, Any]) -> Section | None:
    q = report.get("quality")
    if not isinstance(q, Mapping) or not q:
        return None
    blocks: list[Block] = []
    notes: list[str] = []
    ordinary = q.get("ordinary") if isinstance(q.get("ordinary"), Mapping) else None
    becomes = q.get("memorized") if isinstance(q.get("memorized"), Mapping) else None
    if ordinary:
        kid = _metric_name(ordinary.get("kid_name"), ordinary.get("features"))
        fd = _metric_name(ordinary.get("fd_name"), ordinary.get("features"))
        rows = [[Cell(f"{kid} \u00d710\u00b3, mean \u00b1 std over {_fmt(ordinary.get('kid_subsets'), 'count')} "
                      f"subsets of {_fmt(ordinary.get('kid_subset_size'), 'count')}"),
                 Cell(_kid_text(ordinary.get("kid_mean"), ordinary.get("kid_std")), numeric=True)],
                [Cell(fd), _num_cell(ordinary.get("fd"), "similarity")],
                [Cell("Images compared (before, after)"),
                 Cell(f"{_fmt(ordinary.get('n_before'), 'count')}, {_fmt(ordinary.get('n_after'), 'count')}",
                      numeric=True)]]
        for key, label in (("clip_score_before", "CLIP score before"), ("clip_score_after", "CLIP score after")):
            score = (ordinary.get(key) or {}).get("clip_score") if isinstance(ordinary.get(key), Mapping) else None
            if not _is_missing(score):
                rows.append([Cell(label), _num_cell(score, "number")])
        blocks.append(Block("table", table=Table(["Quantity", "Value"], rows, [False, True],
                                                 "Ordinary prompts: images after the edit against before")))
        notes += [_quality_note(str(n), ordinary) for n in ordinary.get("notes") or []]
    if becomes:
        kid = _metric_name(becomes.get("kid_name"), becomes.get("features"))
        fd = _metric_name(becomes.get("fd_name"), becomes.get("features"))
        rows = [[Cell(f"{kid} \u00d710\u00b3 between memorized prompts after the edit and ordinary images"),
                 Cell(_kid_text(becomes.get("kid_mean"), becomes.get("kid_std")), numeric=True)]]
        was = q.get("memorized_before") if isinstance(q.get("memorized_before"), Mapping) else None
        if was:
            rows.append([Cell(f"The same prompts and seeds before the edit: {kid} \u00d710\u00b3 to the same "
                              "ordinary images"), Cell(_kid_text(was.get("kid_mean"), was.get("kid_std")),
                                                        numeric=True)])
        own = q.get("memorized_vs_edited") if isinstance(q.get("memorized_vs_edited"), Mapping) else None
        if own:
            rows.append([Cell(f"{kid} \u00d710\u00b3 between memorized prompts after the edit and the edited "
                              "model's own ordinary images"), Cell(_kid_text(own.get("kid_mean"), own.get("kid_std")),
                                                                    numeric=True)])
        rows += [[Cell(f"Yardstick: {kid} \u00d710\u00b3 between two halves of the ordinary images"),
                 Cell(_kid_text(becomes.get("baseline_kid_mean"), becomes.get("baseline_kid_std")), numeric=True)],
                [Cell(fd), _num_cell(becomes.get("fd"), "similarity")],
                [Cell("Images compared (memorized, ordinary)"),
                 Cell(f"{_fmt(becomes.get('n_memorized'), 'count')}, {_fmt(becomes.get('n_ordinary'), 'count')}",
                      numeric=True)]]
        blocks.append(Block("table", table=Table(["Quantity", "Value"], rows, [False, True],
                                                 "What a memorized prompt becomes")))
        verdict = plausibility_verdict(becomes, was)
        if verdict:
            blocks.append(Block("note", text=verdict))
        notes += [_quality_note(str(n), becomes) for n in becomes.get("notes") or []]
    if q.get("note"):
        notes.insert(0, _quality_note(str(q["note"]), {}))
    for note in dict.fromkeys(notes):
        blocks.append(Block("note", text=note))
    if not blocks:
        return None
    return Section("quality", "Quality after the edit",
                   "Distances between sets of images on image features. For ordinary prompts, the edited model's "
                   "images against the unedited model's at the same seeds: near zero means ordinary images are as "
                   "before. For memorized prompts, what they render after the edit against the unedited model's "
                   "ordinary images: near the yardstick means plausible new images, far above it means something "
                   "unlike them, such as dark noise; the same prompts before the edit, measured the same way, say "
                   "whether the edit made them less plausible.", blocks)


def _held_out_sampler_table(edits: Sequence[EditRow]) -> Table | None:
    """Held-out replication of each edit at every sampler setting, with the prompt and under attack, and by start."""
    prompt = [e.get("heldout_prompt_by_sampler") for e in edits]
    attack = [e.get("heldout_attack_by_sampler") for e in edits]
    by_start = [e.get("heldout_attack_by_start") for e in edits]
    p_samplers = _ordered_samplers(*prompt)
    a_samplers = _ordered_samplers(*attack)
    inits = [str(k) for k in dict.fromkeys(k for b in by_start if isinstance(b, Mapping) for k in b)]
    if not p_samplers and not a_samplers:
        return None
    columns = (["Edit"] + [f"With the prompt, {_sampler_label(s)}" for s in p_samplers]
               + [f"Under attack, {_sampler_label(s)}" for s in a_samplers]
               + [f"Attack {_init_label(i)}, model's settings" for i in inits])
    rows = []
    for e, p, a, b in zip(edits, prompt, attack, by_start):
        p, a, b = (x if isinstance(x, Mapping) else {} for x in (p, a, b))
        rows.append([Cell(_edit_label(e.get("name")))] + [_num_cell(p.get(s), "rate") for s in p_samplers]
                    + [_num_cell(a.get(s), "rate") for s in a_samplers]
                    + [_num_cell((b.get(i) or {}).get("model") if isinstance(b.get(i), Mapping) else None, "rate")
                       for i in inits])
    return Table(columns, rows, [False] + [True] * (len(columns) - 1),
                 "Held-out replication at each sampler setting and attack start")
