"""Tests of the generate-and-filter extraction attack (diffmem.extraction)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from diffmem.config import SamplerConfig
from diffmem.errors import DiffmemError
from diffmem.extraction import (
    EXTRACTIONS_DIR,
    EXTRACTIONS_INDEX,
    ExtractionConfig,
    clique_strength,
    extraction_attack,
    extraction_attack_images,
    find_clique,
)
from diffmem.metrics import threshold_at_false_flag_rate
from diffmem.score import get_scorer

PLANTED = [1, 4, 7, 10, 13]


def planted_matrix(n: int = 16, members: list[int] = PLANTED, seed: int = 0) -> tuple[np.ndarray, float]:
    """Random similarities < 0.5 with a planted clique of sims in [0.9, 0.95]; returns (sim, planted min edge)."""
    rng = np.random.default_rng(seed)
    sim = rng.uniform(0.0, 0.49, size=(n, n))
    idx = np.ix_(members, members)
    sim[idx] = rng.uniform(0.9, 0.95, size=(len(members), len(members)))
    sim = np.minimum(sim, sim.T)
    np.fill_diagonal(sim, 1.0)
    block = sim[idx][np.triu_indices(len(members), k=1)]
    return sim.astype(np.float32), float(np.float32(block.min()))


# ----------------------------------------------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize("m", [2, 3, 5])
def test_clique_strength_is_planted_min_edge(m):
    sim, min_edge = planted_matrix()
    strength = clique_strength(sim, m)
    if m == 5:
        assert strength == min_edge
    else:
        assert 0.9 <= strength <= 0.95  # the best m-subset of the planted clique
    assert find_clique(sim, strength, m) is not None
    assert find_clique(sim, float(np.nextafter(strength, np.inf)), m) is None


def test_clique_strength_without_clique():
    sim, _ = planted_matrix()
    assert clique_strength(sim, 6) < 0.5  # no 6 nodes share sims >= 0.5
    assert clique_strength(sim[:3, :3], 4) == -math.inf


def test_clique_strength_uses_the_smaller_direction():
    sim, _ = planted_matrix()
    sim = sim.astype(np.float64)
    sim[1, 4] = 0.2  # one direction of one planted edge drops
    assert clique_strength(sim, 5) < 0.5
    assert find_clique(sim, 0.9, 5) is None
    assert find_clique(sim, 0.9, 4) in ([1, 7, 10, 13], [4, 7, 10, 13])


def test_find_clique_exact():
    sim, _ = planted_matrix()
    assert find_clique(sim, 0.8, 5) == PLANTED
    assert find_clique(sim, 0.8, 3) == PLANTED  # the largest clique, not just m members
    assert find_clique(sim, 0.8, 6) is None
    assert find_clique(sim, 0.99, 2) is None


def test_calibration_is_the_false_flag_rate_threshold_of_the_strengths(ssim):
    # The hand-counted cases of the threshold itself are in test_metrics.py; here the attack must use it on the
    # clique strengths of the calibration prompts.
    rng = np.random.default_rng(2)
    calibration = rng.integers(0, 256, size=(5, 4, 16, 16, 3), dtype=np.uint8)
    config = ExtractionConfig(num_generations=4, clique_size=3, false_flag_rate=0.2)
    result = extraction_attack_images(calibration[:1], ["A"], config, ssim, calibration_images=calibration,
                                      progress=False)
    strengths = [clique_strength(ssim.similarity(list(imgs), list(imgs)).numpy(), 3) for imgs in calibration]
    threshold, achieved = threshold_at_false_flag_rate(strengths, 0.2)
    assert result.threshold == threshold and result.calibration["false_flag_rate_achieved"] == achieved == 0.2
    assert result.calibration["strengths"] == pytest.approx(strengths)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"clique_size": 1}, "clique_size"),
        ({"num_generations": 4, "clique_size": 5}, "clique_size"),
        ({"false_flag_rate": 1.0}, "false_flag_rate"),
        ({"false_flag_rate": -0.1}, "false_flag_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"threshold": float("nan")}, "threshold"),
    ],
)
def test_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        ExtractionConfig(**kwargs)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# The attack on synthetic images


def synthetic_attack_images(n: int = 16, copies: int = 5, size: int = 32, seed: int = 0):
    """Prompt A: ``copies`` noisy copies of a reference among random images; prompt B: random images."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    images = rng.integers(0, 256, size=(2, n, size, size, 3), dtype=np.uint8)
    copy_idx = list(range(1, n, n // copies))[:copies]  # spread over the generations
    for j in copy_idx:
        noisy = reference.astype(np.float64) + rng.normal(0, 4, size=reference.shape)
        images[0, j] = np.clip(noisy, 0, 255).round().astype(np.uint8)
    return images, Image.fromarray(reference), copy_idx


@pytest.fixture(scope="module")
def ssim():
    return get_scorer("ssim")


def test_attack_on_synthetic_images(tmp_path, ssim):
    images, reference, copy_idx = synthetic_attack_images()
    config = ExtractionConfig(num_generations=16, clique_size=4, threshold=0.5)
    result = extraction_attack_images(
        images, ["prompt A", "prompt B"], config, ssim, references=[reference, reference], out_dir=tmp_path,
        progress=False,
    )
    a, b = result.rows
    assert a.flagged and a.clique == copy_idx and a.verified == copy_idx
    assert a.max_reference_similarity >= ssim.threshold
    assert not b.flagged and b.clique == [] and b.verified == []
    assert b.max_reference_similarity < ssim.threshold
    summary = result.summary()
    assert summary == {
        "num_prompts": 2,
        "num_flagged": 1,
        "num_verified_prompts": 1,
        "num_verified_generations": 5,
        "extraction_rate": 0.5,
        "threshold": 0.5,
        "false_flag_rate_target": config.false_flag_rate,
        "false_flag_rate_achieved": None,
    }

    folder = tmp_path / EXTRACTIONS_DIR
    entries = [json.loads(line) for line in (folder / EXTRACTIONS_INDEX).read_text().splitlines()]
    assert [e["generation_index"] for e in entries] == copy_idx
    for e in entries:
        assert e["prompt_index"] == 0 and e["seed"] == config.seed + e["generation_index"]
        saved = np.asarray(Image.open(folder / e["image"]))
        assert np.array_equal(saved, images[0, e["generation_index"]])
        assert np.array_equal(np.asarray(Image.open(folder / e["reference"])), np.asarray(reference))
        assert e["similarity"] >= ssim.threshold
    assert len(list(folder.glob("*.png"))) == 5 + 1
    saved_result = json.loads((tmp_path / "attack.json").read_text())
    assert saved_result["summary"] == summary
    assert saved_result["scorer"]["name"] == "ssim"


def test_attack_calibrated_on_synthetic_images(ssim):
    images, reference, copy_idx = synthetic_attack_images(n=8, copies=4, size=16)
    rng = np.random.default_rng(1)
    calibration = rng.integers(0, 256, size=(4, 8, 16, 16, 3), dtype=np.uint8)
    config = ExtractionConfig(num_generations=8, clique_size=3, false_flag_rate=0.0)
    result = extraction_attack_images(
        iter(list(images)), ["A", "B"], config, ssim, references=[reference, None], calibration_images=calibration,
        progress=False,
    )
    strengths = result.calibration["strengths"]
    assert len(strengths) == 4 and result.calibration["num_prompts"] == 4
    assert result.threshold == np.nextafter(max(strengths), np.inf)
    assert result.summary()["false_flag_rate_achieved"] == 0.0
    assert result.rows[0].flagged and result.rows[0].verified == copy_idx
    assert not result.rows[1].has_reference and result.rows[1].max_reference_similarity is None


def test_attack_input_errors(ssim):
    images, reference, _ = synthetic_attack_images(n=4, copies=2, size=16)
    with pytest.raises(DiffmemError, match="threshold"):
        extraction_attack_images(images, ["A", "B"], ExtractionConfig(num_generations=4, clique_size=2), ssim)
    config = ExtractionConfig(num_generations=4, clique_size=2, threshold=0.5)
    with pytest.raises(ValueError, match="references"):
        extraction_attack_images(images, ["A", "B"], config, ssim, references=[reference], progress=False)
    with pytest.raises(ValueError, match="num_generations=8"):
        extraction_attack_images(images, ["A", "B"], ExtractionConfig(num_generations=8, threshold=0.5), ssim,
                                 progress=False)
    with pytest.raises(ValueError, match="prompts"):
        extraction_attack_images(images, ["A", "B", "C"], config, ssim, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# End to end on the tiny pipeline


def test_extraction_attack_tiny_pipeline(tiny_pipe, tmp_path, ssim):
    config = ExtractionConfig(num_generations=4, clique_size=2, false_flag_rate=0.0, batch_size=8,
                              sampler=SamplerConfig(num_inference_steps=2, guidance_scale=1.0))
    reference = np.zeros((16, 16, 3), dtype=np.uint8)
    prompts = ["a red cat", "the green tree", "a blue dog"]
    with pytest.raises(DiffmemError, match="calibration"):
        extraction_attack(tiny_pipe, prompts, config, ssim)
    result = extraction_attack(
        tiny_pipe,
        prompts,
        config,
        ssim,
        references=[reference, None, reference],
        calibration_prompts=["a photo of a yellow star", "an orange circle"],
        out_dir=tmp_path,
        progress=False,
    )
    summary = result.summary()
    assert summary["num_prompts"] == 3 and len(result.rows) == 3
    assert math.isfinite(result.threshold)
    assert result.calibration["num_prompts"] == 2 and len(result.calibration["strengths"]) == 2
    assert summary["false_flag_rate_achieved"] == 0.0
    assert 0 <= summary["num_verified_prompts"] <= summary["num_flagged"] <= 3
    for row in result.rows:
        assert row.flagged == (row.strength >= result.threshold)
        assert (len(row.clique) >= 2) == row.flagged
        assert set(row.verified) <= set(row.clique) <= set(range(4))
    assert [r.has_reference for r in result.rows] == [True, False, True]
    lines = (tmp_path / EXTRACTIONS_DIR / EXTRACTIONS_INDEX).read_text().splitlines()
    assert len(lines) == summary["num_verified_generations"]
    assert json.loads((tmp_path / "attack.json").read_text())["config"]["num_generations"] == 4
