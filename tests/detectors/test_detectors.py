"""The detector registry, Bright Ending and sharpness on tiny pipelines, masked similarity and mask overlays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from diffmem.config import SamplerConfig
from diffmem.detection import (
    DEFAULT_DETECTOR,
    DetectConfig,
    DetectorOutput,
    detect,
    detector_config,
    get_detector,
    list_detectors,
    noise_norm_scores,
    register_detector,
)
from diffmem.detectors import (
    BrightEndingConfig,
    SharpnessConfig,
    end_token_positions,
    mask_overlay,
    masked_similarity,
    save_mask_overlay,
)
from diffmem.detectors.bright_ending import EndTokenAttention
from diffmem.errors import ConfigError, DiffmemError
from diffmem.targets import get_denoiser

SETTINGS = dict(sampler=SamplerConfig(num_inference_steps=3, guidance_scale=5.0, height=16, width=16), batch_size=4)


# -- the registry ----------------------------------------------------------------------------------------------------


def test_registry_lists_the_built_in_detectors_default_first():
    names = list_detectors()
    assert names[0] == DEFAULT_DETECTOR == "wen"
    assert {"wen", "bright_ending", "sharpness"} <= set(names)
    assert get_detector("sharpness").config_cls is SharpnessConfig
    assert get_detector(BrightEndingConfig()).name == "bright_ending"
    assert get_detector(DetectConfig()).name == "wen"
    with pytest.raises(ValueError, match="detector 'nope' is unknown: choose one of wen, "):
        get_detector("nope")


def test_detector_config_keeps_the_fields_of_its_detector():
    cfg = detector_config("bright_ending", sampler=SamplerConfig(num_inference_steps=7), score_steps=3, num_seeds=2,
                          height=None)
    assert isinstance(cfg, BrightEndingConfig) and cfg.num_seeds == 2 and cfg.sampler.num_inference_steps == 7
    assert detector_config("wen", sampler=SamplerConfig(num_inference_steps=7), score_steps=3).score_steps == 3
    with pytest.raises(ConfigError, match="^hvp='exact' is invalid"):
        detector_config("sharpness", hvp="exact")
    with pytest.raises(ConfigError, match=r"^settings=\['num_inference_steps'\] is invalid: sampler settings travel"):
        detector_config("wen", num_inference_steps=7)
    d = SharpnessConfig().to_dict()
    assert d["hvp"] == "jvp" and d["score_steps"] == 1 and d["num_seeds"] == 4


@pytest.mark.parametrize("cls,field,value", [
    (SharpnessConfig, "score_steps", 0), (SharpnessConfig, "fd_eps", 0.0),
    (SharpnessConfig, "sampler", SamplerConfig(guidance_scale=1.0)),
    (BrightEndingConfig, "score", "max"), (BrightEndingConfig, "end_tokens", "last"),
    (BrightEndingConfig, "mask_threshold", 1.0), (BrightEndingConfig, "layers", "("),
    (BrightEndingConfig, "sampler", {"height": 16}), (BrightEndingConfig, "num_seeds", 0),
])
def test_configs_reject_bad_values(cls, field, value):
    with pytest.raises(ConfigError, match=f"^{field}[.=]") as err:
        cls(**{field: value})
    assert "\n" not in str(err.value)


@dataclass
class _LengthConfig:
    scale: float = 1.0

    def to_dict(self) -> dict:
        return {"scale": self.scale}


def _length_detector(pipe, prompts, config, progress=True, first_index=0):
    return np.array([config.scale * len(p) for p in prompts], dtype=np.float64)


def test_register_detector_adds_a_user_detector(tiny_pipe, prompts):
    spec = register_detector("prompt_length", _LengthConfig, _length_detector, "longer prompts score higher")
    try:
        assert "prompt_length" in list_detectors()
        assert register_detector("prompt_length", _LengthConfig, _length_detector,
                                 "longer prompts score higher") == spec  # same pair: no-op
        with pytest.raises(ValueError, match="already registered"):
            register_detector("prompt_length", _LengthConfig, lambda *a, **k: None)
        with pytest.raises(ValueError, match="already configures detector 'prompt_length'"):
            register_detector("other", _LengthConfig, _length_detector)
        with pytest.raises(ValueError, match="must be a dataclass"):
            register_detector("bad", dict, _length_detector)
        labels = [len(p) > 15 for p in prompts]
        res = detect(tiny_pipe, prompts, _LengthConfig(scale=2.0), labels=labels, progress=False)
        assert res.method == "prompt_length" and res.auc == 1.0
        np.testing.assert_array_equal(res.scores, [2.0 * len(p) for p in prompts])
        assert res.cost["denoiser_calls"] == 0 and res.cost["seconds"] >= 0
        assert detect(tiny_pipe, prompts[:2], "prompt_length", progress=False).scores[0] == len(prompts[0])
    finally:
        from diffmem import detection

        detection._DETECTORS.pop("prompt_length", None)


def test_wen_through_the_registry_is_the_noise_norm(tiny_pipe, prompts):
    cfg = DetectConfig(score_steps=2, num_seeds=2, **SETTINGS)
    res = detect(tiny_pipe, prompts, cfg, progress=False)
    np.testing.assert_array_equal(res.scores, noise_norm_scores(tiny_pipe, prompts, cfg, progress=False))
    assert res.method == "wen" and res.maps is None and res.masks is None
    # 2 [uncond; cond] evaluations of 2 prompts x 2 seeds... per batch of 4 prompts: 2 batches x 2 steps
    assert res.cost["denoiser_calls"] == 4 and res.cost["denoiser_rows"] == 2 * 2 * 2 * len(prompts)
    assert res.summary()["cost"] == res.cost and res.summary()["method"] == "wen"


# -- sharpness (Jeon et al.) -----------------------------------------------------------------------------------------


def test_sharpness_exact_product_matches_the_finite_difference(tiny_pipe, prompts):
    exact = detect(tiny_pipe, prompts, SharpnessConfig(num_seeds=2, **SETTINGS), progress=False)
    finite = detect(tiny_pipe, prompts, SharpnessConfig(num_seeds=2, hvp="finite", **SETTINGS), progress=False)
    assert exact.method == "sharpness" and np.all(exact.scores > 0)
    np.testing.assert_allclose(finite.scores, exact.scores, rtol=2e-2)
    assert len(np.unique(np.round(exact.scores, 7))) == len(prompts)
    # the finite difference adds one [uncond; cond] pass per scored step: 2 calls per batch of 4 prompts
    assert finite.cost["denoiser_calls"] == 2 * 2
    one = detect(tiny_pipe, prompts, SharpnessConfig(num_seeds=2, **{**SETTINGS, "batch_size": 1}), progress=False)
    np.testing.assert_allclose(one.scores, exact.scores, rtol=1e-4)  # batching does not change a score
    empty = detect(tiny_pipe, [""], SharpnessConfig(num_seeds=1, **SETTINGS), progress=False)
    assert empty.scores[0] == pytest.approx(0.0, abs=1e-6)  # no guidance direction: no sharpness difference


@pytest.mark.parametrize("fixture", ["tiny_pixart_pipe", "tiny_sd3_pipe"])
def test_sharpness_on_transformer_pipelines(fixture, prompts, request):
    pipe = request.getfixturevalue(fixture)
    cfg = SharpnessConfig(num_seeds=1, hvp="finite", **SETTINGS)
    scores = detect(pipe, prompts, cfg, progress=False).scores
    assert np.all(np.isfinite(scores)) and np.all(scores > 0)
    assert len(np.unique(np.round(scores, 7))) == len(prompts)
    exact = detect(pipe, prompts[:2], SharpnessConfig(num_seeds=1, **SETTINGS), progress=False).scores
    np.testing.assert_allclose(scores[:2], exact, rtol=2e-2)  # forward-mode AD runs through both transformers


# -- Bright Ending (Chen et al.) -------------------------------------------------------------------------------------


def test_end_token_positions(tiny_pipe):
    ids = tiny_pipe.tokenizer("a red cat").input_ids
    first = end_token_positions(tiny_pipe, ["a red cat", "the green tree"])
    assert first == [[len(ids) - 1], [len(tiny_pipe.tokenizer("the green tree").input_ids) - 1]]
    assert tiny_pipe.tokenizer.convert_ids_to_tokens(ids[first[0][0]]) == tiny_pipe.tokenizer.eos_token
    everything = end_token_positions(tiny_pipe, ["a red cat"], "all")[0]
    assert everything[0] == first[0][0] and everything[-1] == tiny_pipe.tokenizer.model_max_length - 1


@pytest.mark.parametrize("fixture", ["tiny_pipe", "tiny_pixart_pipe"])
def test_bright_ending_scores_maps_and_masks(fixture, prompts, request):
    pipe = request.getfixturevalue(fixture)
    processors = {n: m.processor for n, m in get_denoiser(pipe).named_modules() if hasattr(m, "processor")}
    res = detect(pipe, prompts, BrightEndingConfig(num_seeds=2, **SETTINGS), progress=False)
    assert res.method == "bright_ending" and np.all(np.isfinite(res.scores)) and np.all(res.scores > 0)
    assert res.maps.shape == (len(prompts), 16, 16) and res.maps.dtype == np.float32
    assert res.masks.shape == res.maps.shape and res.masks.dtype == bool
    assert res.maps.min() >= 0 and np.allclose(res.maps.max(axis=(1, 2)), 1.0, atol=1e-3)
    assert np.array_equal(res.masks, res.maps >= 0.5) and all(m.any() for m in res.masks)
    assert res.cost["denoiser_calls"] == 3 * 2  # the whole schedule, 2 batches
    assert "mask_fraction" in res.ranked()[0]
    # the processors are the original ones again
    assert {n: m.processor for n, m in get_denoiser(pipe).named_modules() if hasattr(m, "processor")} == processors
    for score in ("attention", "contrast", "mean"):
        other = detect(pipe, prompts[:2], BrightEndingConfig(score=score, num_seeds=2, **SETTINGS), progress=False)
        assert np.all(np.isfinite(other.scores))
        np.testing.assert_allclose(other.maps, res.maps[:2], atol=1e-5)  # the map does not depend on the score


def test_bright_ending_capture_leaves_the_output_unchanged_and_cleans_up(tiny_pipe):
    unet = get_denoiser(tiny_pipe)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    before = unet(sample, 10, encoder_hidden_states=text).sample
    capture = EndTokenAttention(unet)
    with capture:
        capture.active, capture.positions = True, [[5]]
        during = unet(sample, 10, encoder_hidden_states=text).sample
        assert set(capture.maps) == set(capture.modules)
        for m in capture.maps.values():
            assert m.shape[0] == 1 and torch.all((m >= 0) & (m <= 1))
    torch.testing.assert_close(during, before)
    assert all(not type(m.processor).__name__.startswith("_Wrapped") for m in capture.modules.values())
    with capture, pytest.raises(DiffmemError, match="already being captured"):
        with EndTokenAttention(unet):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with EndTokenAttention(unet) as again:
            raise RuntimeError("boom")
    assert all(not type(m.processor).__name__.startswith("_Wrapped") for m in again.modules.values())


def test_bright_ending_needs_cross_attention(tiny_sd3_pipe, prompts):
    with pytest.raises(DiffmemError, match="no cross-attention layers"):
        detect(tiny_sd3_pipe, prompts[:1], BrightEndingConfig(**SETTINGS), progress=False)


def test_detector_output_shape_is_checked(tiny_pipe, prompts):
    @dataclass
    class _Bad:
        n: int = 1

    register_detector("bad_shape", _Bad, lambda pipe, p, c, **k: DetectorOutput(np.zeros(len(p) + 1)))
    try:
        with pytest.raises(DiffmemError, match="scores of shape"):
            detect(tiny_pipe, prompts, _Bad(), progress=False)
    finally:
        from diffmem import detection

        detection._DETECTORS.pop("bad_shape", None)


# -- masked similarity and overlays ----------------------------------------------------------------------------------


def test_masked_similarity_looks_only_inside_the_mask():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gen = ref.copy()
    gen[:, 16:] = 255 - gen[:, 16:]  # the right half differs
    left = np.zeros((32, 32), bool)
    left[:, :16] = True
    assert masked_similarity(gen, ref, left, "mse") == pytest.approx(0.0)
    assert masked_similarity(gen, ref, left, "l2") == pytest.approx(1.0)
    assert masked_similarity(gen, ref, left, "psnr") == float("inf")
    assert masked_similarity(gen, ref, ~left, "mse") > 0.05
    inside, outside = masked_similarity(gen, ref, left, "ssim"), masked_similarity(gen, ref, ~left, "ssim")
    assert inside > 0.8 and outside < 0.2  # windows at the border see a little of the other half
    assert masked_similarity(ref, ref, np.ones((32, 32)), "ssim") == pytest.approx(1.0)
    small = np.zeros((8, 8), bool)
    small[:, :4] = True  # a mask at the latent's size is resized to the image
    assert masked_similarity(gen, ref, small, "mse") == pytest.approx(0.0)
    # soft weights: half weight on the differing half lies between the two
    soft = np.where(left, 1.0, 0.5)
    assert 0 < masked_similarity(gen, ref, soft, "mse") < masked_similarity(gen, ref, ~left, "mse")
    with pytest.raises(ConfigError, match="empty"):
        masked_similarity(gen, ref, np.zeros((32, 32), bool))
    with pytest.raises(ConfigError, match="metric='sscd' is invalid"):
        masked_similarity(gen, ref, left, "sscd")
    with pytest.raises(ConfigError, match="differ in shape"):
        masked_similarity(gen[:16], ref, left)


def test_mask_overlay_and_png(tmp_path):
    from PIL import Image

    img = np.full((8, 8, 3), 0.5, dtype=np.float32)
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    over = mask_overlay(img, mask, color=(255, 0, 0), alpha=1.0)
    assert over.dtype == np.uint8 and over.shape == (8, 8, 3)
    assert (over[:4] == [255, 0, 0]).all() and (over[4:] == 128).all()
    path = save_mask_overlay(tmp_path / "o" / "overlay.png", img, mask, scale=4, alpha=0.5)
    with Image.open(path) as im:
        assert im.size == (32, 32)
    with pytest.raises(ConfigError, match=r"\.png"):
        save_mask_overlay(tmp_path / "o.jpg", img, mask)
    with pytest.raises(ConfigError, match="alpha"):
        mask_overlay(img, mask, alpha=2.0)


@pytest.mark.parametrize("fixture", ["tiny_pipe", "tiny_pixart_pipe"])
def test_captured_probabilities_equal_diffusers_attention_probs(fixture, request):
    """The recomputed end-token probabilities are those of diffusers' own ``AttnProcessor`` (scale, heads, mask)."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = request.getfixturevalue(fixture)
    denoiser = get_denoiser(pipe)
    capture = EndTokenAttention(denoiser)
    name, module = next(iter(capture.modules.items()))
    seen = []
    original_processor, original_scores = module.processor, module.get_attention_scores

    def scores(query, key, attention_mask=None):
        probs = original_scores(query, key, attention_mask)
        seen.append(probs.detach().clone())
        return probs

    positions = [[3], [4]]
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, height=16, width=16, output_type="latent",
                  latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    if fixture == "tiny_pixart_pipe":
        kwargs["use_resolution_binning"] = False
    module.processor, module.get_attention_scores = AttnProcessor(), scores
    try:
        with capture:
            capture.active, capture.positions = True, positions
            pipe(prompt=["a red cat", "the green tree"], **kwargs)
            mine = capture.maps[name]
    finally:
        module.processor, module.get_attention_scores = original_processor, original_scores
    reference = seen[-1]  # [B * heads, N, S] of the last call, the batch [uncond; cond]
    heads = module.heads
    cond = reference.view(4, heads, *reference.shape[1:])[2:].mean(1)
    expected = torch.stack([cond[i][:, p].mean(-1) for i, p in enumerate(positions)])
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6)
