"""Steps are sampler steps, not denoiser calls: multistep, second-order and stochastic schedulers, classifier-free
guidance run as two denoiser calls, and image-to-image pipelines that start part-way through the schedule.

Every recording is checked against a reference computed here with plain forward hooks (no diffmem code): the
inputs of one FFN layer at each denoiser call, assigned to sampler steps by ``scheduler.order`` and to CFG halves
by the ``[uncond; cond]`` batch layout of diffusers' pipelines.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from torch import Tensor, nn

from diffmem.config import RecordConfig, SamplerConfig
from diffmem.errors import DiffmemError
from diffmem.recording import ActivationRecorder, record
from diffmem.sampling import initial_latents
from diffmem.stats import ActivationStats

MID = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
TOKENS = 16  # latent tokens per generation at every target layer of the tiny UNet at 16 px
ROWS = 2  # generations per recording: two prompts, one seed
FP32_EPS = 2.0**-24

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "sde-dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
}


def small_config(num_inference_steps: int = 4, **overrides) -> RecordConfig:
    sampler = SamplerConfig(num_inference_steps=num_inference_steps, guidance_scale=7.5, height=16, width=16)
    return RecordConfig(**{"sampler": sampler, "record_steps": 2, "batch_size": 8, "seed": 0, **overrides})


def with_scheduler(pipe, name: str, pipeline_class=StableDiffusionPipeline):
    """A pipeline sharing ``pipe``'s models, with a fresh scheduler of kind ``name``."""
    cls, extra = SCHEDULERS[name]
    scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipeline_class(**{**pipe.components, "scheduler": scheduler}, requires_safety_checker=False)


def generators(seed: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(ROWS)]


class CallCounter:
    """Counts completed forward calls of a module while the ``with`` block is active."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.calls = 0

    def __enter__(self) -> CallCounter:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output) -> None:
        self.calls += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class LayerTrace:
    """Plain forward pre-hook storing one layer's input (in fp64) at every denoiser call."""

    def __init__(self, unet: nn.Module, layer: str = MID) -> None:
        self.layer = unet.get_submodule(layer)
        self.inputs: list[Tensor] = []

    def __enter__(self) -> LayerTrace:
        self.handle = self.layer.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].double()))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def reference(self, steps: int, calls_per_step: int, rows: int) -> dict[str, dict[str, Tensor]]:
        """fp64 count, sum, sum of squares, normalised sum of squares per half and step, and the sums of the terms'
        magnitudes that bound the fp32 rounding error of each."""
        out: dict[str, dict[str, Tensor]] = {}
        for h, half in enumerate(("uncond", "cond")):
            acc = {k: [] for k in ("count", "sum", "sumsq", "normsq", "abs")}
            for step in range(steps):
                x = torch.cat([self.inputs[c][h * rows : (h + 1) * rows] for c in range(step * calls_per_step,
                                                                                        (step + 1) * calls_per_step)])
                x = x.reshape(-1, x.shape[-1])
                sq = x * x
                acc["count"].append(torch.tensor(x.shape[0]))
                acc["sum"].append(x.sum(0))
                acc["sumsq"].append(sq.sum(0))
                acc["normsq"].append((sq / sq.sum(1, keepdim=True)).sum(0))
                acc["abs"].append(x.abs().sum(0))
            out[half] = {k: torch.stack(v) for k, v in acc.items()}
        return out


def assert_matches_reference(stats: ActivationStats, ref: dict[str, dict[str, Tensor]], layer: str = MID) -> None:
    """Counts equal; each fp32 sum within the rounding bound ``(n + N + 4) * eps * sum|terms|`` of its n terms."""
    for half, r in ref.items():
        s = stats.halves[half][layer]
        assert s.count.tolist() == r["count"].tolist(), half
        n_terms = int(r["count"].max()) + s.sum.shape[1] + 4
        magnitudes = {"sum": r["abs"], "sumsq": r["sumsq"], "normsq": r["normsq"]}
        for field, magnitude in magnitudes.items():
            error = (getattr(s, field).double() - r[field]).abs()
            bound = n_terms * FP32_EPS * magnitude + 1e-30
            assert bool((error <= bound).all()), (half, field, float((error / bound).max()))


def assert_stats_close(a: ActivationStats, b: ActivationStats, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Equal counts; sums equal up to fp32 summation order (``atol`` is relative to each tensor's scale)."""
    assert list(a.halves) == list(b.halves)
    for half in a.halves:
        assert_halves_close(a, half, b, half, rtol, atol)


def assert_halves_close(a, half_a: str, b, half_b: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for name in a.layers:
        x, y = a.halves[half_a][name], b.halves[half_b][name]
        assert torch.equal(x.count, y.count), (half_a, half_b, name)
        for field in ("sum", "sumsq", "normsq"):
            u, v = getattr(x, field), getattr(y, field)
            torch.testing.assert_close(u, v, rtol=rtol, atol=atol * float(v.abs().max()))


def assert_no_recorder_left(pipe) -> None:
    assert "step" not in vars(pipe.scheduler)
    assert len(pipe.unet._forward_pre_hooks) == 0 and len(pipe.unet._forward_hooks) == 0
    assert len(pipe.unet.get_submodule(MID)._forward_pre_hooks) == 0


# -- one test per scheduler ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sampler_steps_and_halves_match_a_plain_hook_reference(tiny_pipe, prompts, name):
    pipe = with_scheduler(tiny_pipe, name)
    order = pipe.scheduler.order  # denoiser calls per sampler step: 2 for Heun, 1 for the others
    config = small_config()
    tau = config.record_steps
    with CallCounter(pipe.unet) as counter:
        stats = record(pipe, prompts[:ROWS], config, progress=False, pipe_kwargs={"generator": generators()})
    assert counter.calls == order * tau  # the second Heun call of step tau - 1 ran; no call of step tau did
    assert_no_recorder_left(pipe)
    for half in ("uncond", "cond"):
        for layer in stats.layers:
            assert stats.halves[half][layer].count.tolist() == [order * ROWS * TOKENS] * tau, (half, layer)

    latents = initial_latents(pipe, [config.seed] * ROWS, 16, 16)
    with LayerTrace(pipe.unet) as trace:
        pipe(prompts[:ROWS], num_inference_steps=4, guidance_scale=7.5, height=16, width=16, latents=latents,
             generator=generators(), output_type="latent")
    assert len(trace.inputs) == order * 4 - (order - 1)  # the whole schedule: Heun's last step has one call
    assert_matches_reference(stats, trace.reference(tau, order, ROWS))
    assert not torch.allclose(stats.halves["cond"][MID].sum[0], stats.halves["cond"][MID].sum[1])


@pytest.mark.parametrize("name", ["euler-a", "sde-dpmpp-2m"])
def test_stochastic_sampler_noise_is_seeded_per_generation(tiny_pipe, prompts, name):
    pipe = with_scheduler(tiny_pipe, name)
    config = small_config(num_seeds=2, batch_size=1)
    torch.manual_seed(1)
    one = record(pipe, prompts[:2], config, progress=False)
    torch.manual_seed(2)  # the global RNG plays no part
    two = record(pipe, prompts[:2], dataclasses.replace(config, batch_size=2), progress=False)
    assert_stats_close(one, two)
    other = record(pipe, prompts[:2], dataclasses.replace(config, seed=5), progress=False)
    assert not torch.allclose(other.halves["cond"][MID].sum, one.halves["cond"][MID].sum)


# -- classifier-free guidance as two denoiser calls ----------------------------------------------------------------


class SeparateCFGPipeline(StableDiffusionPipeline):
    """A text-to-image loop that runs the CFG halves as two UNet calls of B rows per scheduler step.

    ``cond_first`` swaps the two calls; ``extra_call`` adds a third (unconditional) call, an ambiguous layout.
    """

    cond_first = False
    extra_call = False

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        num_inference_steps: int = 4,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        latents: Tensor | None = None,
        generator=None,
        output_type: str = "latent",
        negative_prompt=None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
    ) -> StableDiffusionPipelineOutput:
        device = self._execution_device
        cond, uncond = self.encode_prompt(
            prompt, device, num_images_per_prompt, True, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        extra = self.prepare_extra_step_kwargs(generator, 0.0)
        calls = [("cond", cond), ("uncond", uncond)] if self.cond_first else [("uncond", uncond), ("cond", cond)]
        if self.extra_call:
            calls.append(("uncond", uncond))
        for t in self.scheduler.timesteps:
            x = self.scheduler.scale_model_input(latents, t)
            eps = {half: self.unet(x, t, encoder_hidden_states=emb).sample for half, emb in calls}
            guided = eps["uncond"] + guidance_scale * (eps["cond"] - eps["uncond"])
            latents = self.scheduler.step(guided, t, latents, **extra).prev_sample
        return StableDiffusionPipelineOutput(images=latents, nsfw_content_detected=None)


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_separate_cfg_calls_are_recorded_as_the_batched_halves(tiny_pipe, prompts, name):
    config = small_config()
    batched = record(with_scheduler(tiny_pipe, name), prompts[:ROWS], config, progress=False)
    separate = with_scheduler(tiny_pipe, name, SeparateCFGPipeline)
    order = separate.scheduler.order
    with CallCounter(separate.unet) as counter:
        stats = record(separate, prompts[:ROWS], config, progress=False)
    assert counter.calls == 2 * order * config.record_steps
    assert_no_recorder_left(separate)
    assert list(stats.halves) == ["uncond", "cond"]
    assert_stats_close(stats, batched)

    # the call order is a convention, stated explicitly: cond-first calls need cfg_call_order
    separate.cond_first = True
    swapped = record(separate, prompts[:ROWS], config, progress=False, cfg_call_order=("cond", "uncond"))
    assert_stats_close(swapped, batched)
    mislabelled = record(separate, prompts[:ROWS], config, progress=False)
    assert_halves_close(mislabelled, "cond", batched, "uncond")
    assert_halves_close(mislabelled, "uncond", batched, "cond")


def test_ambiguous_cfg_layout_is_a_one_line_error(tiny_pipe, prompts):
    pipe = with_scheduler(tiny_pipe, "ddim", SeparateCFGPipeline)
    pipe.extra_call = True  # three calls of B rows in one scheduler step
    with pytest.raises(DiffmemError, match=r"ambiguous classifier-free-guidance layout in sampler step 0") as info:
        record(pipe, prompts[:ROWS], small_config(), progress=False)
    assert "\n" not in str(info.value)
    assert_no_recorder_left(pipe)

    # without start_batch the recorder cannot tell two halves of B rows from anything else
    pipe.extra_call = False
    latents = initial_latents(pipe, [0] * ROWS, 16, 16)
    with pytest.raises(DiffmemError, match=r"call start_batch\(rows\)"):
        with ActivationRecorder(pipe, small_config()):
            pipe(prompts[:ROWS], num_inference_steps=4, latents=latents)
    assert_no_recorder_left(pipe)


def test_declared_cfg_with_a_single_uncond_sized_call_is_an_error(tiny_pipe, prompts):
    pipe = with_scheduler(tiny_pipe, "ddim")
    latents = initial_latents(pipe, [0] * ROWS, 16, 16)
    recorder = ActivationRecorder(pipe, small_config(), stop_generation=False)
    with pytest.raises(DiffmemError, match="cfg=True but sampler step 0 ran a single denoiser call of 2 rows"):
        with recorder:
            recorder.start_batch(ROWS, cfg=True)
            pipe(prompts[:ROWS], num_inference_steps=4, guidance_scale=1.0, latents=latents, output_type="latent")
    assert_no_recorder_left(pipe)


def test_calls_at_two_timesteps_without_a_scheduler_step_are_an_error(tiny_pipe):
    pipe = with_scheduler(tiny_pipe, "ddim")
    x = torch.randn(1, 4, 8, 8)
    emb = torch.randn(1, 77, 32)
    recorder = ActivationRecorder(pipe, small_config(), stop_generation=False)
    with pytest.raises(DiffmemError, match="timesteps 901 and 601 without a scheduler.step"):
        with torch.no_grad(), recorder:
            recorder.start_batch(1)
            pipe.unet(x, torch.tensor(901), encoder_hidden_states=emb)
            pipe.unet(x, torch.tensor(601), encoder_hidden_states=emb)
    assert_no_recorder_left(pipe)


def test_recorder_follows_a_replaced_scheduler_and_restores_both(tiny_pipe, prompts):
    pipe = with_scheduler(tiny_pipe, "ddim")
    first = pipe.scheduler
    config = small_config()
    latents = initial_latents(pipe, [0], 16, 16)
    recorder = ActivationRecorder(pipe, config, num_prompts=1, stop_generation=False)
    with recorder:
        assert recorder.counts_sampler_steps and "step" in vars(first)
        pipe.scheduler = HeunDiscreteScheduler.from_config(first.config)
        recorder.start_batch(1)
        with CallCounter(pipe.unet) as counter:
            pipe(prompts[0], num_inference_steps=4, height=16, width=16, latents=latents, output_type="latent")
        assert counter.calls == 2 * 4 - 1  # Heun's whole schedule ran; only its first two steps were recorded
        assert "step" not in vars(first) and "step" in vars(pipe.scheduler)
    assert_no_recorder_left(pipe)
    assert recorder.stats.halves["cond"][MID].count.tolist() == [2 * TOKENS] * 2


def test_bare_denoiser_with_a_scheduler_counts_sampler_steps(tiny_pipe):
    scheduler = HeunDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    emb = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    recorder = ActivationRecorder(tiny_pipe.unet, small_config(), scheduler=scheduler, stop_generation=False)
    with torch.no_grad(), recorder:
        recorder.start_batch(1)
        for t in scheduler.timesteps:  # 7 denoiser calls for 4 Heun steps
            eps = tiny_pipe.unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=emb).sample
            x = scheduler.step(eps, t, x).prev_sample
        assert recorder.calls == 4 and recorder.steps_recorded == 2
    assert "step" not in vars(scheduler)
    assert recorder.stats.halves["cond"][MID].count.tolist() == [2 * TOKENS] * 2


# -- image-to-image --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,tau,calls_run", [("ddim", 2, 2), ("heun", 1, 3)])
def test_img2img_steps_count_from_the_first_step_run(tiny_pipe, prompts, name, tau, calls_run):
    pipe = with_scheduler(tiny_pipe, name, StableDiffusionImg2ImgPipeline)
    order = pipe.scheduler.order
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    config = small_config(num_inference_steps=4, record_steps=tau)
    i2i = {"image": image, "strength": 0.5}  # 4 * 0.5 = 2 sampler steps run, from the middle of the schedule
    with CallCounter(pipe.unet) as counter:
        stats = record(pipe, prompts[:ROWS], config, progress=False, pipe_kwargs={**i2i, "generator": generators()})
    assert counter.calls == order * tau
    assert_no_recorder_left(pipe)

    with LayerTrace(pipe.unet) as trace:
        pipe(prompts[:ROWS], num_inference_steps=4, guidance_scale=7.5, generator=generators(), output_type="latent",
             **i2i)
    assert len(trace.inputs) == calls_run
    assert_matches_reference(stats, trace.reference(tau, order, ROWS))

    # record's own per-generation generators make the result independent of batching
    one = record(pipe, prompts[:ROWS], dataclasses.replace(config, batch_size=1), progress=False, pipe_kwargs=i2i)
    two = record(pipe, prompts[:ROWS], config, progress=False, pipe_kwargs=i2i)
    assert_stats_close(one, two)
    with pytest.raises(DiffmemError, match=r"ran 2 sampler steps, fewer than record_steps=3 \(strength=0.5"):
        record(pipe, prompts[:1], dataclasses.replace(config, record_steps=3), progress=False, pipe_kwargs=i2i)
    assert_no_recorder_left(pipe)
