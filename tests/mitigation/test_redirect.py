"""The redirect (:func:`diffmem.mitigation.redirect.fit_redirect`) on the tiny UNet and DiT pipelines, and inside
``mitigate``."""

from __future__ import annotations

import pytest
import torch

from diffmem.config import SamplerConfig
from diffmem.edits import WeightDelta, apply_edit
from diffmem.errors import ConfigError, DiffmemError
from diffmem.mitigation import MitigateConfig, mitigate
from diffmem.mitigation.redirect import cross_attention_layers, fit_redirect, token_pairs
from diffmem.score import get_scorer
from diffmem.targets import get_denoiser

MEMORIZED = ["a red cat", "a blue dog on the sky"]
ORDINARY = ["a green bird", "a red dog", "a blue cat", "the sky", "a cat", "a green dog on the sky"]
SAMPLER = SamplerConfig(num_inference_steps=3, guidance_scale=3.0, height=16, width=16)


def _zeroing_edit(pipe) -> WeightDelta:
    """An edit that zeroes a few entries of the first cross-attention layer's keys (they must stay zero)."""
    denoiser = get_denoiser(pipe)
    name = next(iter(cross_attention_layers(denoiser))) + ".to_k.weight"
    params = dict(denoiser.named_parameters())
    before = {name: params[name].detach().clone()}
    with torch.no_grad():
        params[name][:2, :3] = 0.0
    delta = WeightDelta.between(before, pipe)
    with torch.no_grad():
        params[name].copy_(before[name])
    return delta


def _objective(pipe, edit, preserve: float) -> tuple[float, float]:
    """The redirect's two terms under ``edit``, summed over layers and both projections: the memorized tokens'
    distance to their anchors' keys and values, and the kept tokens' distance to their unedited ones."""
    layers = cross_attention_layers(get_denoiser(pipe))
    with torch.no_grad():
        pairs = token_pairs(pipe, layers, MEMORIZED, ORDINARY[:2], ORDINARY)
        plain = {n: (m.to_k.weight.double().clone(), m.to_v.weight.double().clone()) for n, m in layers.items()}
        with apply_edit(pipe, edit):
            now = {n: (m.to_k.weight.double().clone(), m.to_v.weight.double().clone()) for n, m in layers.items()}
    edit_term = keep_term = 0.0
    for n, (xe, ae, xp) in pairs.items():
        for w0, w1 in zip(plain[n], now[n]):
            edit_term += float(((xe @ w1.T - ae @ w0.T) ** 2).sum(-1).mean())
            keep_term += preserve * float(((xp @ w1.T - xp @ w0.T) ** 2).sum(-1).mean())
    return edit_term, keep_term


@pytest.mark.parametrize("which", ["tiny_pipe", "tiny_pixart_pipe"])
def test_redirect_moves_memorized_prompts_toward_their_anchors_and_leaves_the_rest(which, request):
    pipe = request.getfixturevalue(which)
    denoiser = get_denoiser(pipe)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    edit = _zeroing_edit(pipe)
    delta = fit_redirect(pipe, edit, MEMORIZED, ORDINARY[:2], keep=ORDINARY, preserve=1.0)
    assert all(torch.equal(p, before[n]) for n, p in denoiser.named_parameters())  # the pipeline is restored
    layers = cross_attention_layers(denoiser)
    allowed = {f"{n}.{proj}.weight" for n in layers for proj in ("to_k", "to_v")}
    assert set(delta.deltas) <= allowed and len(delta.deltas) == 2 * len(layers)  # keys and values, nothing else
    assert delta.meta["method"] == "redirect" and delta.meta["base_edit"] == edit.kind
    name = next(iter(edit.deltas))
    with apply_edit(pipe, delta):
        assert torch.count_nonzero(dict(denoiser.named_parameters())[name][:2, :3]) == 0  # the edit's zeros stay
    # without a base edit the map is the exact minimiser of the objective (the ridge only adds a non-negative
    # term): the total cannot rise above the identity's (keep term 0) beyond the fp32 rounding of the new weights
    plain = fit_redirect(pipe, None, MEMORIZED, ORDINARY[:2], keep=ORDINARY, preserve=1.0)
    start_edit, start_keep = _objective(pipe, None, 1.0)
    end_edit, end_keep = _objective(pipe, plain, 1.0)
    assert start_keep == 0.0
    assert end_edit + end_keep <= start_edit * (1 + 1e-4)
    assert end_edit < 0.5 * start_edit  # the memorized prompts' keys and values moved most of the way


def test_redirect_refuses_what_it_cannot_fit(tiny_pipe):
    with pytest.raises(DiffmemError, match="anchor"):
        fit_redirect(tiny_pipe, None, MEMORIZED, [], keep=ORDINARY)
    with pytest.raises(DiffmemError, match="preserve"):
        fit_redirect(tiny_pipe, None, MEMORIZED, ORDINARY, keep=ORDINARY, preserve=0.0)
    with pytest.raises(ConfigError, match="redirect"):
        MitigateConfig(redirect=-1.0)


@pytest.fixture
def manifest(self_referenced_manifest):
    """Four ``locate`` rows (references: the pipeline's own generations) and two ``nonmem`` rows."""
    return self_referenced_manifest(MEMORIZED + ORDINARY[:2], ORDINARY[2:4], SAMPLER)


def test_mitigate_with_redirect_returns_the_deletion_and_the_redirect_as_one_edit(tiny_pipe, manifest):
    cfg = MitigateConfig(ratio=0.02, folds=0, sweep_num_seeds=1, estimate_num_seeds=1, record_steps=2,
                         sampler=SAMPLER, redirect=1.0)
    res = mitigate(tiny_pipe, manifest, cfg, get_scorer("ssim"), progress=False)
    mask = res.plain_edit
    assert isinstance(res.edit, WeightDelta) and res.edit.meta["method"] == "redirect"
    assert res.edit.meta["base_edit"] == mask.kind and "redirect" in res.timings_s
    denoiser = get_denoiser(tiny_pipe)
    with apply_edit(tiny_pipe, mask):
        zeroed = {n: p.detach() == 0 for n, p in denoiser.named_parameters()}
    with apply_edit(tiny_pipe, res.edit):
        for n, p in denoiser.named_parameters():
            assert torch.count_nonzero(p.detach()[zeroed[n]]) == 0, n  # every weight the mask zeroed stays zero
    layers = cross_attention_layers(denoiser)
    assert {f"{n}.to_v.weight" for n in layers} <= set(res.edit.deltas)
    assert res.edit.num_params_changed() > mask.num_params_changed()
