"""Replication on the memorized region only: Bright Ending masks of the scored generations, in ``evaluate`` and the
report's overlays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffmem.config import SamplerConfig
from diffmem.data import ManifestEntry
from diffmem.detection import detect
from diffmem.detectors import BrightEndingConfig, masked_similarity
from diffmem.detectors.region import generate_with_end_token_maps, is_regional_copy, region_similarities
from diffmem.errors import ConfigError, DiffmemError
from diffmem.evaluation import EvalConfig, evaluate
from diffmem.sampling import generate_images
from diffmem.score import get_scorer
from diffmem.zoo import default_model_path

SAMPLER = SamplerConfig(num_inference_steps=3, guidance_scale=5.0, height=16, width=16)
MODEL = default_model_path()
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="embedded checkpoint missing")


def _entries(tmp_path, prompts):
    rng = np.random.default_rng(0)
    out = []
    for i, p in enumerate(prompts):
        ref = tmp_path / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref)
        out.append(ManifestEntry(p, i % 2 == 0, 4 if i % 2 == 0 else 1, "locate" if i % 2 == 0 else "nonmem",
                                 ref if i < 2 else None))
    return out


@pytest.mark.parametrize("fixture", ["tiny_pipe", "tiny_pixart_pipe"])
def test_maps_come_with_the_very_images_of_generate_images(fixture, prompts, request):
    pipe = request.getfixturevalue(fixture)
    images, maps = generate_with_end_token_maps(pipe, prompts[:3], num_seeds=2, seed=5, batch_size=3,
                                                progress=False, sampler=SAMPLER)
    plain = generate_images(pipe, prompts[:3], num_seeds=2, seed=5, batch_size=4, progress=False, sampler=SAMPLER)
    np.testing.assert_array_equal(images, plain)  # the capture changes nothing, whatever the batching
    assert maps.shape == (3, 2, 16, 16) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(2, 3)), 1.0)  # normalised per generation
    # with one seed, the map is the Bright Ending detector's map of the same generation
    _, one = generate_with_end_token_maps(pipe, prompts[:3], num_seeds=1, seed=0, progress=False, sampler=SAMPLER)
    be = detect(pipe, prompts[:3], BrightEndingConfig(num_seeds=1, batch_size=2, sampler=SAMPLER), progress=False)
    np.testing.assert_allclose(one[:, 0], be.maps, atol=1e-5)


def test_maps_need_cross_attention(tiny_sd3_pipe, prompts):
    with pytest.raises(DiffmemError, match="has no cross-attention layers"):
        generate_with_end_token_maps(tiny_sd3_pipe, prompts[:1], progress=False, sampler=SAMPLER)


def test_region_similarities_and_the_copy_rule():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    half = ref.copy()
    half[:, 8:] = 255 - half[:, 8:]  # a copy of the left half only
    left = np.zeros((16, 16), bool)
    left[:, :8] = True
    s = region_similarities([half, half], ref, [left, ~left], "mse")
    assert s[0] == 0.0 and s[1] > 0.1
    assert s[0] == masked_similarity(half, ref, left, "mse")
    np.testing.assert_array_equal(is_regional_copy(s, 0.01, "mse"), [True, False])
    np.testing.assert_array_equal(is_regional_copy(np.array([0.9, 0.2]), 0.6, "ssim"), [True, False])
    with pytest.raises(ConfigError, match="one mask per generation"):
        region_similarities([half], ref, [left, left])
    with pytest.raises(ConfigError, match="^metric='cosine' is invalid"):
        is_regional_copy(s, 0.5, "cosine")


@pytest.mark.parametrize("settings,field", [
    ({"region": "mask"}, "region"), ({"region": "bright-ending", "mask_threshold": 1.0}, "mask_threshold"),
    ({"end_tokens": "last"}, "end_tokens"), ({"region_metric": "lpips"}, "region_metric"),
    ({"region": "bright-ending", "region_metric": "psnr"}, "region_threshold"),
])
def test_eval_config_checks_the_region_settings(settings, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        EvalConfig(**settings)


def test_region_defaults():
    assert EvalConfig().region == "full" and EvalConfig().region_threshold is None
    cfg = EvalConfig(region="bright-ending")
    assert cfg.region_threshold == 0.6 and cfg.to_dict()["region"] == "bright-ending"
    assert EvalConfig(region="bright-ending", region_metric="psnr", region_threshold=20.0).region_threshold == 20.0


def test_evaluate_on_the_bright_ending_region(tiny_pipe, prompts, tmp_path):
    entries = _entries(tmp_path, prompts[:3])
    scorer = get_scorer("ssim")
    full = evaluate(tiny_pipe, entries, EvalConfig(num_seeds=2, sampler=SAMPLER), scorer, progress=False)
    cfg = EvalConfig(num_seeds=2, sampler=SAMPLER, region="bright-ending", region_threshold=-1.0)
    local = evaluate(tiny_pipe, entries, cfg, scorer, progress=False)
    np.testing.assert_array_equal(local.images, full.images)
    assert full.masks is None and "region" not in full.rows[0]
    assert local.masks.shape == (3, 2, 16, 16) and local.masks.dtype == bool
    for i, (row, base) in enumerate(zip(local.rows, full.rows)):
        assert row["region"] == "bright-ending"
        assert row["mask_fraction"] == pytest.approx(local.masks[i].mean()) and 0 < row["mask_fraction"] <= 1
        assert {k: row[k] for k in base} == base  # the whole-image figures are unchanged
    ref = np.asarray(Image.open(entries[0].reference).convert("RGB"))
    by_hand = [masked_similarity(img, ref, m) for img, m in zip(local.images[0], local.masks[0])]
    assert local.rows[0]["region_max_similarity"] == pytest.approx(max(by_hand))
    assert local.rows[0]["region_mean_similarity"] == pytest.approx(np.mean(by_hand))
    assert local.rows[0]["region_replication_rate"] == 1.0  # threshold -1: every generation counts
    assert "region_mean_similarity" not in local.rows[2]  # no reference: only the mask fraction
    assert local.summary()["locate"]["mask_fraction"] == pytest.approx(
        np.mean([local.rows[0]["mask_fraction"], local.rows[2]["mask_fraction"]]))


@needs_model
def test_memorized_regions_are_closer_to_their_training_images():
    """On the embedded memorizer (its sampler, 2 seeds): the masked SSIM of memorized prompts is above that of
    ordinary prompts, whose masks also cover less of the image."""
    from diffmem.data import read_manifest
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(str(MODEL))
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(**sampling_defaults(MODEL))
    entries = read_manifest(MODEL / "memorization.jsonl")
    rows = [e for e in entries if e.split == "locate"][:3] + [e for e in entries if e.split == "nonmem"][:3]
    res = evaluate(pipe, rows, EvalConfig(num_seeds=2, sampler=sampler, region="bright-ending"),
                   get_scorer("ssim"), progress=False)
    mem = [r for r in res.rows if r["memorized"]]
    other = [r for r in res.rows if not r["memorized"]]
    assert min(r["region_mean_similarity"] for r in mem) > max(r["region_mean_similarity"] for r in other)
    assert np.mean([r["mask_fraction"] for r in mem]) > np.mean([r["mask_fraction"] for r in other])


def test_report_images_show_each_generation_with_its_region(tiny_pipe, prompts, tmp_path):
    from diffmem.detectors import mask_overlay
    from diffmem.workflows.mitigate import report_images
    from diffmem.workflows.report import render_html

    entries = _entries(tmp_path, prompts[:2])  # one locate row with its training image, one nonmem row
    scorer = get_scorer("ssim")
    kwargs = dict(opt_steps=1, seed=0, rows=2, attacked=0, num_seeds=2)
    gallery, kept = report_images(tiny_pipe, None, entries, scorer, SAMPLER, region="bright-ending", **kwargs)
    cells = gallery[0]["rows"][0]["cells"]
    regions = [c for c in cells if c["label"].endswith("memorized region")]
    assert [c["label"] for c in regions] == [f"{s}, seed {j}: memorized region" for s in ("before", "after")
                                             for j in range(2)]
    plain = [c for c in cells if c["label"] == "before, seed 0"][0]["image"]
    assert regions[0]["image"].shape == plain.shape and not np.array_equal(regions[0]["image"], plain)
    assert regions[0]["detail"].startswith("covers ") and "% of the image, SSIM on it " in regions[0]["detail"]
    assert isinstance(regions[0]["replicated"], bool)
    assert "memorized region in red" in gallery[0]["caption"]
    summary = kept["summary"]
    assert summary["region"] == "bright-ending" and 0 < summary["locate_mask_fraction_before"] <= 1
    assert summary["locate_region_replication_before"] == summary["locate_region_replication_after"]  # no edit
    # the overlay is the mask of that very generation painted over it
    _, maps = generate_with_end_token_maps(tiny_pipe, [entries[0].prompt], num_seeds=2, seed=0, progress=False,
                                           sampler=SAMPLER)
    np.testing.assert_array_equal(regions[0]["image"], mask_overlay(plain, maps[0, 0] >= 0.5))
    page = render_html({"title": "region"}, gallery)
    assert page.count(": memorized region") >= 4 and "SSIM on it" in page
    full, _ = report_images(tiny_pipe, None, entries, scorer, SAMPLER, **kwargs)
    assert not any("memorized region" in c["label"] for c in full[0]["rows"][0]["cells"])


def test_demo_grid_shows_the_region_of_memorized_rows_only(tiny_pipe, prompts, tmp_path):
    from diffmem.workflows.demo import DemoConfig, _gallery

    with pytest.raises(ConfigError, match="^region='mask' is invalid"):
        DemoConfig(region="mask")
    assert DemoConfig(region="bright-ending").to_dict()["region"] == "bright-ending"
    entries = _entries(tmp_path, prompts[:2])
    cfg = EvalConfig(num_seeds=2, sampler=SAMPLER, region="bright-ending")
    before = evaluate(tiny_pipe, entries, cfg, get_scorer("ssim"), progress=False)
    grid = _gallery(entries, before, None, get_scorer("ssim"), (16, 16), cfg)[0]
    labels = [[c["label"] for c in row["cells"]] for row in grid["rows"]]
    assert labels[0][-2:] == ["before, seed 0: memorized region", "before, seed 1: memorized region"]
    assert not any("region" in label for label in labels[1])  # the ordinary prompt: no region shown
    assert "memorized region in red" in grid["caption"]


@needs_model
def test_cli_evaluate_region_bright_ending(tmp_path, capsys):
    import json
    import shutil

    from diffmem.cli import main
    from diffmem.detectors.region import REGIONS

    rows = [json.loads(line) for line in (MODEL / "memorization.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "locate"][:1] + [r for r in rows if r["split"] == "nonmem"][:1]
    for r in rows:  # the training images beside the manifest
        (tmp_path / r["reference"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODEL / r["reference"], tmp_path / r["reference"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "e.json"
    assert main(["evaluate", str(MODEL), "--prompts", str(manifest), "--out", str(out), "--seeds", "1",
                 "--scorer", "ssim", "--steps", "4", "--region", "bright-ending"]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["region"] == "bright-ending"
    assert all(r["region"] == "bright-ending" and 0 < r["mask_fraction"] <= 1 for r in report["rows_before"])
    assert "region_replication_rate" in report["rows_before"][0]
    with pytest.raises(SystemExit):
        main(["evaluate", str(MODEL), "--prompts", str(manifest), "--region", "face"])
    assert "invalid choice: 'face'" in capsys.readouterr().err
    assert REGIONS == ("full", "bright-ending")  # the CLI spells the choices out
