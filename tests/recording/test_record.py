"""Recording FFN activation statistics: hooks, CFG halves, early stop, batching, signatures, prompt embeddings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from diffmem.config import RecordConfig, SamplerConfig
from diffmem.errors import DiffmemError
from diffmem.recording import ActivationRecorder, record
from diffmem.targets import find_targets

MID = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
TINY_DOWN = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"


def small_config(num_inference_steps: int = 4, guidance_scale: float = 7.5, **overrides) -> RecordConfig:
    sampler = SamplerConfig(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=16, width=16)
    return RecordConfig(**{"sampler": sampler, "record_steps": 2, "batch_size": 8, "seed": 0, **overrides})


def assert_stats_close(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Equal counts; sums equal up to fp32 summation order (``atol`` is relative to each tensor's scale)."""
    assert list(a.layers.items()) == list(b.layers.items())
    assert a.steps == b.steps and list(a.halves) == list(b.halves)
    for half in a.halves:
        for name in a.layers:
            x, y = a.halves[half][name], b.halves[half][name]
            assert torch.equal(x.count, y.count), (half, name)
            for field in ("sum", "sumsq", "normsq"):
                u, v = getattr(x, field), getattr(y, field)
                torch.testing.assert_close(u, v, rtol=rtol, atol=atol * float(v.abs().max()))


def hook_counts(module: nn.Module) -> tuple[int, int]:
    return len(module._forward_pre_hooks), len(module._forward_hooks)


class CallCounter:
    """Counts completed forward calls of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1


def test_record_shapes_and_dtypes(tiny_pipe, prompts):
    stats = record(tiny_pipe, prompts[:3], small_config(), progress=False)
    assert stats.steps == 2
    assert list(stats.halves) == ["uncond", "cond"]
    targets = find_targets(tiny_pipe.unet)
    assert list(stats.layers) == list(targets)
    for name, linear in targets.items():
        assert stats.layers[name] == tuple(linear.weight.shape)
        s = stats.halves["cond"][name]
        assert s.count.dtype == torch.int64 and s.sum.dtype == torch.float32
        assert s.sum.shape == (2, linear.in_features)
    # 3 prompts x (8x8 latent tokens at the top level, 4x4 below) at every step
    tokens = {"down_blocks.1": 16, "mid_block": 16, "up_blocks.0": 16}
    for name in stats.layers:
        per_row = next(v for k, v in tokens.items() if name.startswith(k))
        assert stats.halves["cond"][name].count.tolist() == [3 * per_row] * 2
    assert stats.meta["num_prompts"] == 3 and len(stats.meta["prompts_sha256"]) == 64
    assert stats.meta["record_config"]["record_steps"] == 2
    assert (stats.act_norm(MID) > 0).all()


def test_hooks_removed_after_exception_in_forward(fresh_tiny_pipe, prompts):
    unet = fresh_tiny_pipe.unet
    modules = [unet, *find_targets(unet).values()]

    class Boom(RuntimeError):
        pass

    def explode(module, args):
        raise Boom("inside the forward")

    # a later layer raises, after the recorder's hooks have already run on the earlier ones
    layer = unet.get_submodule("up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2")
    handle = layer.register_forward_pre_hook(explode)
    before = [hook_counts(m) for m in modules]
    recorder = ActivationRecorder(fresh_tiny_pipe, small_config(), num_prompts=1)
    with pytest.raises(Boom):
        with recorder:
            recorder.start_batch(1)
            fresh_tiny_pipe(prompts[0], num_inference_steps=4, height=16, width=16, output_type="latent")
    assert [hook_counts(m) for m in modules] == before
    assert recorder.stats.halves["cond"][TINY_DOWN].count[0] > 0  # it did record before the failure
    handle.remove()
    # the model is free again for a new recorder
    stats = record(fresh_tiny_pipe, prompts[:1], small_config(), progress=False)
    assert stats.halves["cond"][MID].count.sum() > 0


def test_second_recorder_on_same_model_is_an_error(tiny_pipe):
    config = small_config()
    outer = ActivationRecorder(tiny_pipe, config)
    with outer:
        with pytest.raises(DiffmemError, match="already registered"):
            with ActivationRecorder(tiny_pipe.unet, config):
                pass
        with pytest.raises(DiffmemError, match="already registered"):
            outer.__enter__()
    # after exiting, a new recorder registers fine
    with ActivationRecorder(tiny_pipe, config):
        pass


def test_cfg_halves_are_kept_apart(tiny_pipe, prompts):
    config = small_config(record_steps=1, num_inference_steps=2)
    with_cfg = record(tiny_pipe, prompts[:2], config, progress=False)
    cond, uncond = with_cfg.halves["cond"][MID], with_cfg.halves["uncond"][MID]
    assert torch.equal(cond.count, uncond.count)
    assert not torch.allclose(cond.sum, uncond.sum, rtol=1e-3)

    # step 0 sees the same latents with or without CFG: each half must equal a plain run of its own prompt
    plain = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, guidance_scale=1.0))
    no_cfg = record(tiny_pipe, prompts[:2], plain, progress=False)
    assert list(no_cfg.halves) == ["cond"]
    empty = record(tiny_pipe, ["", ""], plain, progress=False)
    for name in with_cfg.layers:
        torch.testing.assert_close(with_cfg.halves["cond"][name].sum, no_cfg.halves["cond"][name].sum)
        torch.testing.assert_close(with_cfg.halves["uncond"][name].sum, empty.halves["cond"][name].sum)
    with pytest.raises(DiffmemError, match="no 'uncond' half"):
        no_cfg.mean(MID, "uncond")


def test_early_stop_calls_denoiser_record_steps_times(fresh_tiny_pipe, prompts):
    counter = CallCounter(fresh_tiny_pipe.unet)
    config = small_config(num_inference_steps=5, record_steps=3, batch_size=2)
    stats = record(fresh_tiny_pipe, prompts[:3], config, progress=False)  # 2 batches
    counter.handle.remove()
    assert counter.calls == 3 * 2
    assert (stats.halves["cond"][MID].count > 0).all()


def test_record_all_steps_without_stop(fresh_tiny_pipe, prompts):
    counter = CallCounter(fresh_tiny_pipe.unet)
    config = small_config(num_inference_steps=2, record_steps=2, guidance_scale=1.0)
    stats = record(fresh_tiny_pipe, prompts[:2], config, progress=False)
    counter.handle.remove()
    assert counter.calls == 2
    assert (stats.halves["cond"][MID].count == 2 * 16).all()


def test_batch_size_does_not_change_stats_or_signatures(tiny_pipe, prompts):
    config = small_config(batch_size=1, num_seeds=2, signatures=True)
    one = record(tiny_pipe, prompts, config, progress=False)
    eight = record(tiny_pipe, prompts, dataclasses.replace(config, batch_size=8), progress=False)
    assert_stats_close(one, eight)
    for name in one.layers:
        assert one.signatures[name].shape == (len(prompts), one.layers[name][1])
        torch.testing.assert_close(one.signatures[name], eight.signatures[name], rtol=1e-4, atol=1e-6)


def test_signatures_average_over_seeds_and_separate_prompts(tiny_pipe, prompts):
    config = small_config(guidance_scale=1.0, signatures=True)
    both = record(tiny_pipe, prompts[:3], dataclasses.replace(config, num_seeds=2), progress=False)
    seed0 = record(tiny_pipe, prompts[:3], config, progress=False)
    seed1 = record(tiny_pipe, prompts[:3], dataclasses.replace(config, seed=1), progress=False)
    for name in both.layers:
        torch.testing.assert_close(both.signatures[name], (seed0.signatures[name] + seed1.signatures[name]) / 2)
        sig = seed0.signatures[name]
        assert not torch.allclose(sig[0], sig[1])
        # the mean of the per-prompt signatures is the pooled mean over steps (equal token counts)
        torch.testing.assert_close(sig.mean(0), seed0.mean(name).mean(0), rtol=1e-4, atol=1e-6)


def test_non_finite_activation_names_layer_and_step(fresh_tiny_pipe, prompts):
    unet = fresh_tiny_pipe.unet
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:  # the second denoiser step
            return torch.full_like(output, float("nan"))
        return output

    unet.get_submodule(MID.replace("net.2", "net.1")).register_forward_hook(poison)
    with pytest.raises(DiffmemError, match=rf"non-finite.*{MID.replace('.', '[.]')} at step 1") as info:
        record(fresh_tiny_pipe, prompts[:1], small_config(), progress=False)
    assert "\n" not in str(info.value)
    assert len(find_targets(unet)[MID]._forward_pre_hooks) == 0


def test_pattern_override_records_only_matching_layers(tiny_pipe, prompts):
    config = small_config(target="attn2.to_q", record_steps=1, num_inference_steps=1)
    stats = record(tiny_pipe, prompts[:1], config, progress=False)
    assert len(stats.layers) == 4 and all(n.endswith("attn2.to_q") for n in stats.layers)


def test_fewer_denoiser_calls_than_record_steps_is_an_error(tiny_pipe, prompts):
    config = small_config(num_inference_steps=4, record_steps=3)
    with pytest.raises(DiffmemError, match="fewer than record_steps=3"):
        record(tiny_pipe, prompts[:1], config, progress=False, pipe_kwargs={"num_inference_steps": 2})


# -- recording a bare transformer denoiser ------------------------------------------------------------------------


def pixart_inputs(rows: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(rows, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(rows, 5, 32, generator=g),
        timestep=torch.full((rows,), 10),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def test_record_pixart_transformer_directly(tiny_pixart):
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, guidance_scale=1.0), record_steps=2)
    recorder = ActivationRecorder(tiny_pixart, config)
    with torch.no_grad(), recorder:
        recorder.start_batch(2)
        for _ in range(2):
            tiny_pixart(**pixart_inputs(2))
    stats = recorder.stats
    assert list(stats.halves) == ["cond"]
    for name in stats.layers:
        assert stats.halves["cond"][name].count.tolist() == [2 * 16, 2 * 16]  # (8 / patch 2)^2 tokens
        assert stats.halves["cond"][name].sumsq.gt(0).all()


def test_record_pixart_with_cfg_and_manual_steps(tiny_pixart):
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=3, guidance_scale=4.0), record_steps=3)
    recorder = ActivationRecorder(tiny_pixart, config, stop_generation=False)
    with torch.no_grad(), recorder:
        recorder.start_batch(2, cfg=True)
        recorder.set_step(2)
        tiny_pixart(**pixart_inputs(4))
        tiny_pixart(**pixart_inputs(4))  # past the last recorded step: ignored
        with pytest.raises(DiffmemError, match="batch of 2 rows, expected 4"):
            recorder.set_step(0)
            tiny_pixart(**pixart_inputs(2))
    stats = recorder.stats
    name = next(iter(stats.layers))
    for half in ("uncond", "cond"):
        assert stats.halves[half][name].count.tolist() == [0, 0, 32]


def test_record_bfloat16_accumulates_in_fp32(tiny_pixart):
    model = tiny_pixart.to(torch.bfloat16)
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=1, guidance_scale=1.0), record_steps=1)
    recorder = ActivationRecorder(model, config)
    inputs = pixart_inputs(2)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad(), recorder:
        recorder.start_batch(2)
        model(**inputs)
    s = recorder.stats.halves["cond"][next(iter(recorder.stats.layers))]
    assert s.sum.dtype == torch.float32 and torch.isfinite(s.normsq).all() and s.normsq.sum() > 0


def test_record_sd3_transformer_directly(tiny_sd3):
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, guidance_scale=1.0), record_steps=1,
                          signatures=True)
    recorder = ActivationRecorder(tiny_sd3, config, num_prompts=2)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        pooled_projections=torch.randn(2, 24, generator=g),
        timestep=torch.full((2,), 10),
    )
    with torch.no_grad(), recorder:
        recorder.start_batch(2, prompt_index=[1, 0])
        tiny_sd3(**inputs)
    stats = recorder.stats
    assert stats.halves["cond"]["transformer_blocks.0.ff.net.2"].count.tolist() == [2 * 64]
    assert stats.halves["cond"]["transformer_blocks.0.ff_context.net.2"].count.tolist() == [2 * 5]
    assert stats.signatures["transformer_blocks.0.ff.net.2"].shape == (2, 64)


# -- precomputed conditionings --------------------------------------------------------------------------------------


def encode(pipe, prompts: list[str]) -> torch.Tensor:
    """``[P, L, D]`` text-encoder outputs of the prompts, as the pipeline computes them."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, "cpu", 1, False)[0]


def test_prompt_embeds_record_like_the_prompts_that_made_them(tiny_pipe, prompts):
    config = small_config(batch_size=2, num_seeds=2, signatures=True)
    embeds = encode(tiny_pipe, prompts[:3])
    from_prompts = record(tiny_pipe, prompts[:3], config, progress=False)
    from_embeds = record(tiny_pipe, config=config, prompt_embeds=embeds, progress=False)
    assert_stats_close(from_embeds, from_prompts)
    for name in from_prompts.layers:
        torch.testing.assert_close(from_embeds.signatures[name], from_prompts.signatures[name], rtol=1e-4, atol=1e-6)
    assert "step" not in vars(tiny_pipe.scheduler)

    meta = from_embeds.meta
    assert meta["conditioning"] == "prompt_embeds" and meta["num_prompts"] == 3
    assert len(meta["prompts_sha256"]) == 64 and meta["prompts_sha256"] != from_prompts.meta["prompts_sha256"]
    # the hash is the tensor's, and batching changes nothing
    again = record(tiny_pipe, None, dataclasses.replace(config, batch_size=8), prompt_embeds=embeds.clone(),
                   progress=False)
    assert again.meta["prompts_sha256"] == meta["prompts_sha256"]
    assert_stats_close(again, from_embeds)
    nudged = embeds.clone()
    nudged[0, 0, 0] += 1e-3
    assert record(tiny_pipe, config=small_config(record_steps=1), prompt_embeds=nudged, progress=False).meta[
        "prompts_sha256"
    ] != meta["prompts_sha256"]


def test_negative_prompt_embeds_replace_the_negative_prompt(tiny_pipe, prompts):
    config = small_config()
    expected = record(tiny_pipe, prompts[:2], dataclasses.replace(config, negative_prompt="a blue dog"), progress=False)
    embeds, negative = encode(tiny_pipe, prompts[:2]), encode(tiny_pipe, ["a blue dog"])
    shared = record(tiny_pipe, config=config, prompt_embeds=embeds, negative_prompt_embeds=negative, progress=False)
    per_prompt = record(tiny_pipe, config=dataclasses.replace(config, batch_size=1), prompt_embeds=embeds,
                        negative_prompt_embeds=negative.expand(2, -1, -1), progress=False)
    assert_stats_close(shared, expected)
    assert_stats_close(per_prompt, expected)
    assert len(shared.meta["negative_prompt_embeds_sha256"]) == 64


def test_conditioning_arguments_are_checked(tiny_pipe, prompts):
    config = small_config()
    embeds = encode(tiny_pipe, prompts[:3])
    with pytest.raises(ValueError, match="exactly one of prompts or prompt_embeds"):
        record(tiny_pipe, prompts[:3], config, prompt_embeds=embeds, progress=False)
    with pytest.raises(ValueError, match="exactly one of prompts or prompt_embeds"):
        record(tiny_pipe, config=config, progress=False)
    with pytest.raises(ValueError, match=r"\[P, L, D\] tensor with P >= 1, got \(77, 32\)"):
        record(tiny_pipe, config=config, prompt_embeds=embeds[0], progress=False)
    with pytest.raises(ValueError, match="not both"):
        record(tiny_pipe, config=dataclasses.replace(config, negative_prompt="a cat"), prompt_embeds=embeds,
               negative_prompt_embeds=embeds, progress=False)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must be a \[1 or 3, L, D\] tensor"):
        record(tiny_pipe, config=config, prompt_embeds=embeds, negative_prompt_embeds=embeds[:2], progress=False)
    with pytest.raises(TypeError, match="needs a RecordConfig"):
        record(tiny_pipe, prompts[:1])
