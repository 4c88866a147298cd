"""The anisotropy detector (Asthana & Belagiannis, ICLR 2026): its two terms against a direct computation, on tiny
pipelines and on the embedded memorizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffmem.config import SamplerConfig
from diffmem.detection import DetectConfig, detect, detector_config, get_detector, list_detectors, noise_norm_scores
from diffmem.detectors import AnisotropyConfig, anisotropy_scores
from diffmem.errors import ConfigError
from diffmem.sampling import initial_latents
from diffmem.zoo import default_model_path

SETTINGS = dict(sampler=SamplerConfig(num_inference_steps=10, guidance_scale=5.0, height=16, width=16), batch_size=4)
MODEL = default_model_path()
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="embedded checkpoint missing")


def test_anisotropy_is_registered_with_its_config():
    assert "anisotropy" in list_detectors()
    assert get_detector("anisotropy").config_cls is AnisotropyConfig
    assert get_detector(AnisotropyConfig()).name == "anisotropy"
    cfg = detector_config("anisotropy", sampler=SamplerConfig(num_inference_steps=25, guidance_rescale=0.7),
                          score_steps=5, num_seeds=3)
    assert isinstance(cfg, AnisotropyConfig) and cfg.num_seeds == 3 and cfg.sampler.num_inference_steps == 25
    d = AnisotropyConfig().to_dict()  # the released code's SD-1 setting
    assert (d["norm_weight"], d["cosine_weight"], d["low_noise_index"], d["alignment"]) == (1.0, 2.0, -3,
                                                                                             "uncond-guidance")


@pytest.mark.parametrize("field,value", [
    ("score", "angle"), ("alignment", "cond-uncond"), ("low_noise_index", 50), ("low_noise_index", -51),
    ("norm_weight", -1.0), ("cosine_weight", float("nan")), ("sampler", SamplerConfig(guidance_scale=1.0)),
    ("num_seeds", 0), ("sampler", {"height": 16}),
])
def test_anisotropy_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"^{field}[.=]"):
        AnisotropyConfig(**{field: value})
    with pytest.raises(ConfigError, match="^cosine_weight=0.0 is invalid: and norm_weight cannot both be 0"):
        AnisotropyConfig(norm_weight=0.0, cosine_weight=0.0)


def _direct_cosine(pipe, prompt: str, t_index: int, steps: int, alignment: str) -> float:
    """The low-noise alignment computed by hand: the denoiser on seed 0's noise at ``timesteps[t_index]``."""
    pipe.scheduler.set_timesteps(steps)
    t = pipe.scheduler.timesteps[t_index]
    x = initial_latents(pipe, [0], 16, 16)
    cond, uncond = pipe.encode_prompt([prompt], "cpu", 1, True)
    with torch.no_grad():
        pred = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = pred.chunk(2)
    a, b = {"uncond-guidance": (u, c - u), "uncond-cond": (u, c), "cond-guidance": (c, c - u)}[alignment]
    return float(F.cosine_similarity(a, b, dim=1).mean())


@pytest.mark.parametrize("alignment", ["uncond-guidance", "uncond-cond", "cond-guidance"])
def test_cosine_term_is_the_low_noise_alignment_on_pure_noise(tiny_pipe, prompts, alignment):
    cfg = AnisotropyConfig(num_seeds=1, score="cosine", alignment=alignment, **SETTINGS)
    scores = anisotropy_scores(tiny_pipe, prompts[:3], cfg, progress=False)
    direct = [_direct_cosine(tiny_pipe, p, -3, 10, alignment) for p in prompts[:3]]
    np.testing.assert_allclose(scores, direct, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(scores) <= 1)
    # another timestep of the schedule gives another value: the index is used
    other = anisotropy_scores(tiny_pipe, prompts[:1], AnisotropyConfig(num_seeds=1, score="cosine",
                                                                       alignment=alignment, low_noise_index=-1,
                                                                       **SETTINGS), progress=False)
    assert other[0] == pytest.approx(_direct_cosine(tiny_pipe, prompts[0], -1, 10, alignment), rel=1e-4, abs=1e-5)
    assert abs(other[0] - scores[0]) > 1e-5


def test_norm_term_is_wen_at_the_first_step_and_the_score_adds_the_terms(tiny_pipe, prompts):
    norm = detect(tiny_pipe, prompts, AnisotropyConfig(num_seeds=2, score="norm", **SETTINGS), progress=False)
    wen = noise_norm_scores(tiny_pipe, prompts, DetectConfig(score_steps=1, num_seeds=2, **SETTINGS), progress=False)
    np.testing.assert_allclose(norm.scores, wen, rtol=1e-6)
    cos = anisotropy_scores(tiny_pipe, prompts, AnisotropyConfig(num_seeds=2, score="cosine", **SETTINGS),
                            progress=False)
    both = detect(tiny_pipe, prompts, AnisotropyConfig(num_seeds=2, norm_weight=0.5, cosine_weight=3.0, **SETTINGS),
                  progress=False)
    np.testing.assert_allclose(both.scores, 0.5 * wen + 3.0 * cos, rtol=1e-6)
    assert both.method == "anisotropy" and both.maps is None
    # two [uncond; cond] passes per batch, whatever the schedule's length: 2 batches of 4 prompts x 2 seeds
    assert both.cost["denoiser_calls"] == 2 * 2 and both.cost["denoiser_rows"] == 2 * 2 * 2 * len(prompts)
    one = anisotropy_scores(tiny_pipe, prompts, AnisotropyConfig(num_seeds=2, norm_weight=0.5, cosine_weight=3.0,
                                                                 **{**SETTINGS, "batch_size": 1}), progress=False)
    np.testing.assert_allclose(one, both.scores, rtol=1e-4)  # batching does not change a score


@pytest.mark.parametrize("fixture", ["tiny_pixart_pipe", "tiny_sd3_pipe"])
def test_anisotropy_on_transformer_pipelines(fixture, prompts, request):
    pipe = request.getfixturevalue(fixture)
    res = detect(pipe, prompts, AnisotropyConfig(num_seeds=1, **SETTINGS), progress=False)
    assert np.all(np.isfinite(res.scores)) and len(np.unique(np.round(res.scores, 7))) == len(prompts)
    cos = anisotropy_scores(pipe, prompts, AnisotropyConfig(num_seeds=1, score="cosine", **SETTINGS), progress=False)
    assert np.all(np.abs(cos) <= 1) and res.cost["denoiser_calls"] == 2 * 2


@needs_model
def test_anisotropy_scores_memorized_prompts_higher():
    """On the embedded memorizer at its sampler, 4 noises: AUC 0.94 (docs/faithfulness.md), from 2 denoiser passes
    per prompt and noise against Wen's 5."""
    from diffmem.data import read_manifest
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(str(MODEL))
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(**sampling_defaults(MODEL))
    entries = [e for e in read_manifest(MODEL / "memorization.jsonl") if e.split != "never_seen"]  # training prompts
    labels = np.array([e.memorized for e in entries])
    cfg = detector_config("anisotropy", sampler=sampler, batch_size=16, num_seeds=4)
    res = detect(pipe, [e.prompt for e in entries], cfg, labels=labels, progress=False)
    assert res.scores[labels].mean() > res.scores[~labels].mean()
    assert res.auc >= 0.9, res.auc
    assert res.cost["denoiser_calls"] == 2 * -(-len(entries) // 16)
