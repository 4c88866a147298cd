"""Wen et al. noise-norm detection: its invariances on tiny pipelines, any CFG pipeline, and its AUC on a memorizer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from diffmem.config import SamplerConfig
from diffmem.detection import DETECT_PRESETS, DetectConfig, detect, flag_calibrated, noise_norm_scores
from diffmem.zoo import default_model_path

MODEL = default_model_path()
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="embedded checkpoint missing")


def _cfg(**kw) -> DetectConfig:
    sampler = SamplerConfig(num_inference_steps=3, guidance_scale=5.0, height=16, width=16)
    return DetectConfig(**{"sampler": sampler, "score_steps": 1, "num_seeds": 2, "batch_size": 4, **kw})


def test_scores_do_not_depend_on_batching(tiny_pipe, prompts):
    a = noise_norm_scores(tiny_pipe, prompts, _cfg(batch_size=1), progress=False)
    b = noise_norm_scores(tiny_pipe, prompts, _cfg(batch_size=4), progress=False)
    assert a.shape == (len(prompts),) and np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    # prompts are distinguished: the score is text-conditional
    assert len(np.unique(np.round(a, 6))) == len(prompts)


def test_more_steps_average_more_predictions(tiny_pipe, prompts):
    one = noise_norm_scores(tiny_pipe, prompts[:2], _cfg(score_steps=1), progress=False)
    two = noise_norm_scores(tiny_pipe, prompts[:2], _cfg(score_steps=2), progress=False)
    assert not np.allclose(one, two)


def test_empty_prompt_scores_zero(tiny_pipe):
    s = noise_norm_scores(tiny_pipe, [""], _cfg(), progress=False)
    assert s[0] == pytest.approx(0.0, abs=1e-6)


def test_per_prompt_seeds_follow_the_global_index(tiny_pipe, prompts):
    cfg = _cfg(per_prompt_seeds=True, batch_size=2)
    full = noise_norm_scores(tiny_pipe, prompts, cfg, progress=False)
    tail = noise_norm_scores(tiny_pipe, prompts[3:], cfg, progress=False, first_index=3)  # a shard of the prompts
    np.testing.assert_allclose(tail, full[3:], rtol=1e-5)
    shifted = noise_norm_scores(tiny_pipe, prompts[3:], cfg, progress=False)  # other seeds: other scores
    assert not np.allclose(shifted, full[3:])
    shared = noise_norm_scores(tiny_pipe, prompts, _cfg(batch_size=2), progress=False)  # seeds 0..n-1 for every prompt
    assert not np.allclose(shared, full)


def test_labels_give_auc_and_ranking(tiny_pipe, prompts):
    labels = [True, False, True, False, False, False]
    res = detect(tiny_pipe, prompts, _cfg(), labels=labels, calibration_prompts=prompts[3:], m=2.0, progress=False)
    assert 0.0 <= res.auc <= 1.0 and res.tpr_at_1fpr is not None
    ranked = res.ranked()
    assert [r["rank"] for r in ranked] == list(range(1, 7))
    assert all(ranked[i]["score"] >= ranked[i + 1]["score"] for i in range(5))
    assert res.flagged is not None and res.threshold is not None
    summary = res.summary()
    assert summary["num_prompts"] == 6 and summary["num_flagged"] == int(res.flagged.sum())
    with pytest.raises(ValueError, match="labels has 2 entries for 6 prompts"):
        detect(tiny_pipe, prompts, _cfg(), labels=[True, False], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        detect(tiny_pipe, prompts, _cfg(), calibration_prompts=prompts[:1], progress=False)


def test_calibrated_flags_hand_case():
    flags, thr = flag_calibrated(np.array([1.0, 5.0, 2.5]), np.array([1.0, 2.0, 3.0]), m=0.5)
    assert thr == pytest.approx(2.0 + 0.5 * 1.0)
    assert flags.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="at least 2"):
        flag_calibrated(np.array([1.0]), np.array([1.0]))


@pytest.mark.parametrize(
    "field,value",
    [("score_steps", 0), ("score_steps", 4), ("num_seeds", 0), ("space", "pixels"), ("batch_size", 0),
     ("sampler.guidance_scale", 1.0), ("guidance_rescale", 1.5), ("height", 12)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"^{field}=") as err:
        if field in ("score_steps", "num_seeds", "space", "batch_size"):
            _cfg(**{field: value})
        else:  # a sampler setting: SamplerConfig checks it, or the detector (guidance > 1)
            _cfg(sampler=SamplerConfig(num_inference_steps=3, **{field.removeprefix("sampler."): value}))
    assert "\n" not in str(err.value)


def test_wen2024_preset():
    cfg = DetectConfig.from_preset("wen2024")
    assert (cfg.score_steps, cfg.sampler.num_inference_steps, cfg.sampler.guidance_scale) == (50, 50, 7.5)
    assert cfg.per_prompt_seeds and cfg.num_seeds == 1 and cfg.preset == "wen2024"
    assert DETECT_PRESETS["wen2024"]["score_steps"] == "all"  # the preset itself is left as written
    model = SamplerConfig(num_inference_steps=25, guidance_scale=4.0, guidance_rescale=0.7, height=16, width=16)
    on_model = DetectConfig.preset_sampler("wen2024", model)  # the preset's steps and guidance, the model's size
    assert on_model == SamplerConfig(num_inference_steps=50, guidance_scale=7.5, guidance_rescale=0.0, height=16,
                                     width=16)
    shorter = DetectConfig.from_preset("wen2024", dataclasses.replace(on_model, num_inference_steps=20))
    assert shorter.score_steps == 20 and shorter.sampler.height == 16  # "all" follows the schedule's length
    assert DetectConfig.from_preset("wen2024", score_steps=1).score_steps == 1
    with pytest.raises(ValueError, match="preset='nope' is invalid"):
        DetectConfig.from_preset("nope")


# -- any classifier-free-guidance pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_pixart_pipe", "tiny_sd3_pipe"])
def test_transformer_pipelines(fixture, prompts, request):
    """PixArt (learned sigma: 8 output channels, of which 4 are the prediction) and SD3 (flow matching)."""
    pipe = request.getfixturevalue(fixture)
    cfg = _cfg(score_steps=2, batch_size=4)
    scores = noise_norm_scores(pipe, prompts, cfg, progress=False)
    assert scores.shape == (len(prompts),) and np.all(np.isfinite(scores)) and np.all(scores > 0)
    assert len(np.unique(np.round(scores, 6))) == len(prompts)  # the prompts are told apart
    again = detect(pipe, prompts, cfg, progress=False).scores
    np.testing.assert_array_equal(again, scores)  # a repeat gives the very same scores
    np.testing.assert_allclose(noise_norm_scores(pipe, prompts, _cfg(score_steps=2, batch_size=1), progress=False),
                               scores, rtol=1e-4)
    assert noise_norm_scores(pipe, [""], cfg, progress=False)[0] == pytest.approx(0.0, abs=1e-6)


# -- the embedded memorizer ----------------------------------------------------------------------------------------


@needs_model
def test_auc_on_the_embedded_memorizer():
    """The cheap mode (one denoiser call per prompt and seed) separates memorized from ordinary prompts.

    At the checkpoint's sampler settings with 4 seeds the AUC is 0.885 (32 memorized, 24 ordinary prompts); 0.8 is
    far above chance and leaves room for numerical noise across machines.
    """
    from diffmem.data import read_manifest
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(str(MODEL))
    pipe.set_progress_bar_config(disable=True)
    d = sampling_defaults(MODEL)
    entries = [e for e in read_manifest(MODEL / "memorization.jsonl") if e.split != "never_seen"]  # training prompts
    labels = [e.memorized for e in entries]
    assert sum(labels) >= 24 and len(labels) - sum(labels) >= 24
    cfg = DetectConfig(sampler=SamplerConfig(**d), score_steps=1, num_seeds=4, batch_size=16)
    res = detect(pipe, [e.prompt for e in entries], cfg, labels=labels, progress=False)
    assert res.auc >= 0.8, res.auc
    assert res.tpr_at_1fpr >= 0.3, res.tpr_at_1fpr  # 0.5625: the 18 top scores are all memorized prompts
