"""Cross-fitting folds, sampler variants, per-row measurement and the shared-saliency aggregation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.config import SamplerConfig
from diffmem.crossfit import SAMPLER_NAMES, make_folds, measure_rows, sampler_variants, summarise_rows
from diffmem.data import ManifestEntry
from diffmem.errors import ConfigError
from diffmem.mitigation import MitigateConfig
from diffmem.mitigation.robust import _SharedSaliency
from diffmem.reextraction import ReextractConfig
from diffmem.sampling import generate_images
from diffmem.score import get_scorer


def _rows(dups: list[int], folder: Path | None = None) -> list[ManifestEntry]:
    return [ManifestEntry(prompt=f"p{i}", memorized=True, duplicates=d, reference=None, split="locate")
            for i, d in enumerate(dups)]


def test_folds_partition_the_rows_and_are_stratified_by_duplication():
    rows = _rows([4] * 6 + [32] * 6 + [128] * 3)
    folds = make_folds(rows, 3, seed=0)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(len(rows)))  # every row in exactly one fold
    for dup in (4, 32):  # 6 rows of a level over 3 folds: 2 each
        assert [sum(rows[i].duplicates == dup for i in f) for f in folds] == [2, 2, 2]
    assert make_folds(rows, 3, seed=0) == folds  # deterministic
    assert make_folds(rows, 3, seed=1) != folds  # and the seed matters


@pytest.mark.parametrize("k", [1, 0, 16])
def test_folds_out_of_range(k):
    with pytest.raises(ValueError, match="folds"):
        make_folds(_rows([4] * 15), k, seed=0)


def test_sampler_variants_from_the_model_and_the_pipeline(tiny_pipe):
    model = SamplerConfig(num_inference_steps=25, guidance_scale=4.0, guidance_rescale=0.7, height=16, width=16)
    v = sampler_variants(model, pipe=tiny_pipe)
    assert list(v) == list(SAMPLER_NAMES)
    assert v["model"] == model
    # diffusers' own defaults of StableDiffusionPipeline.__call__, at the model's size, without rescale
    assert v["diffusers-default"] == SamplerConfig(num_inference_steps=50, guidance_scale=7.5, height=16, width=16)
    assert v["high-guidance"].guidance_scale == 8.0 and v["high-guidance"].num_inference_steps == 25
    with pytest.raises(ValueError, match="unknown"):
        sampler_variants(model, ("model", "fast"))


def test_summarise_rows_means_and_fold_spread():
    rows = [{"prompt_rate": {"model": r}, "attack_worst": {"model": a}, "attack_rate": {"prompt": {"model": a}}}
            for r, a in [(0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0)]]
    out = summarise_rows(rows, groups=[[0, 1], [2, 3]])
    assert out["rows"] == 4 and out["prompt"]["model"] == 0.5 and out["attack"]["model"] == 0.5
    # group means: prompt 0.5 and 0.5 -> spread 0; attack 0.5 and 0.5 -> 0
    assert out["spread"]["prompt"]["model"] == 0.0
    out = summarise_rows(rows, groups=[[0, 2], [1, 3]])
    assert out["spread"]["prompt"]["model"] == pytest.approx(0.25)  # group means 0.25 and 0.75
    assert [g["rows"] for g in out["spread"]["groups"]] == [2, 2]


@pytest.fixture
def own_rows(tiny_pipe, tmp_path):
    """Two rows whose references are the tiny pipeline's own seed-0 generations at the model's sampler."""
    sampler = SamplerConfig(num_inference_steps=3, guidance_scale=3.0, height=16, width=16)
    prompts = ["a red cat", "a blue dog on the sky"]
    images = generate_images(tiny_pipe, prompts, num_seeds=1, seed=0, sampler=sampler)
    rows = []
    for i, p in enumerate(prompts):
        path = tmp_path / f"ref{i}.png"
        Image.fromarray(images[i, 0]).save(path)
        rows.append(ManifestEntry(prompt=p, memorized=True, duplicates=8, reference=path, split="heldout"))
    return rows, sampler


def test_measure_rows_prompt_replication_is_exact_on_own_generations(tiny_pipe, own_rows):
    rows, sampler = own_rows
    out = measure_rows(tiny_pipe, None, rows, get_scorer("ssim"), {"model": sampler}, attack=None, num_seeds=1,
                       seed=0)
    assert [o["prompt_rate"]["model"] for o in out] == [1.0, 1.0]  # the same seed gives the same image
    assert all(o["attack_rate"] == {} for o in out)


def test_measure_rows_attack_worst_case_is_any_start(tiny_pipe, own_rows):
    rows, sampler = own_rows
    samplers = {"model": sampler, "other": dataclasses.replace(sampler, guidance_scale=6.0)}
    summaries: dict = {}
    out = measure_rows(tiny_pipe, None, rows, get_scorer("ssim"), samplers,
                       attack=ReextractConfig(opt_steps=2, checkpoints=(0,), sample_seed=0),
                       inits=("prompt", "random"), num_seeds=2, seed=0, summaries=summaries)
    assert set(summaries) == {"prompt", "random"} and 0 in summaries["prompt"]["curve"]["memorized"]
    for o in out:
        for name in samplers:
            rates = [o["attack_rate"][init][name] for init in ("prompt", "random")]
            assert all(0.0 <= r <= 1.0 for r in rates)
            # a seed replicates under the worst case when any start replicates it
            assert max(rates) <= o["attack_worst"][name] <= min(1.0, sum(rates))


def test_measure_rows_can_skip_the_prompt_and_measure_the_attack_only(tiny_pipe, own_rows):
    rows, sampler = own_rows
    out = measure_rows(tiny_pipe, None, rows, get_scorer("ssim"), {"model": sampler},
                       attack=ReextractConfig(opt_steps=1, checkpoints=(), sample_seed=0), inits=("prompt",),
                       num_seeds=1, seed=0, prompt=False)
    assert all(o["prompt_rate"] == {} and set(o["attack_worst"]) == {"model"} for o in out)


def test_shared_saliency_keeps_only_weights_most_terms_agree_on():
    w = {"a": torch.tensor([[1.0, 1.0, 1.0, 1.0]])}
    shared = _SharedSaliency(w)
    # zeroing weight 0 raises every term's loss (gradient negative); weight 1 only one term's; weight 3 none
    for g in ([-1.0, -4.0, 1.0, 1.0], [-1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]):
        shared({"a": torch.tensor([g])})
    score = shared.score("a", share=0.5)[0]
    assert torch.isfinite(score[0]) and score[0] > 0
    assert score[1] == float("-inf") and score[3] == float("-inf")  # 1 of 3 and 0 of 3 agree
    assert torch.isfinite(shared.score("a", share=0.3)[0][1])  # 1 of 3 is enough at share 0.3
    assert shared.scale > 0


@pytest.mark.parametrize("field,value", [("folds", 1), ("robust_aggregate", "mean"), ("robust_share", 0.0),
                                         ("attack_inits", ("prompt", "other")), ("robust_samplers", ("fast",)),
                                         ("estimate_num_seeds", 0), ("margin_steps", -1), ("min_rounds", 4),
                                         ("min_rounds", -1)])
def test_mitigate_config_checks_the_new_settings(field, value):
    with pytest.raises(ConfigError, match=field):
        MitigateConfig(**{field: value})


def test_mitigate_config_round_trips_to_a_dict():
    d = MitigateConfig(attack_inits=("random",), robust_samplers=("model", "high-guidance"), folds=0).to_dict()
    assert d["attack_inits"] == ["random"] and d["robust_samplers"] == ["model", "high-guidance"] and d["folds"] == 0
    assert np.isfinite(d["robust_share"])
