"""Re-extraction attack: config checks, the training objective, frozen weights, and real runs on the memorizer."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffmem.config import SamplerConfig
from diffmem.errors import DiffmemError
from diffmem.objective import DiffusionObjective, conditioning_loss, encode_conditioning
from diffmem.reextraction import ReextractConfig, ReextractItem, optimize_conditioning, reextract
from diffmem.sampling import generate_images
from diffmem.score import get_scorer

MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd-memorizer"
GENERIC = "a blue circle on white"  # a generic caption of the memorizer, used as a foreign starting point


@pytest.fixture(scope="module")
def memorizer():
    from diffmem.pipelines import load_pipeline

    pipe = load_pipeline(str(MODEL))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def defaults() -> SamplerConfig:
    return SamplerConfig(**json.loads((MODEL / "diffmem_defaults.json").read_text()))


def manifest_item(prompt: str) -> ReextractItem:
    from PIL import Image

    for index, line in enumerate((MODEL / "memorization.jsonl").read_text().splitlines()):
        row = json.loads(line)
        if row["prompt"] == prompt:
            ref = np.asarray(Image.open(MODEL / row["reference"]).convert("RGB"))
            return ReextractItem(prompt, ref, "memorized" if row["memorized"] else "control", index)
    raise KeyError(prompt)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


def tiny_sd3_pipeline(transformer):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=16, shift_factor=0.06, scaling_factor=1.5,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Config and inputs


def test_objective_and_result_names_are_re_exported():
    import diffmem.objective
    import diffmem.reextraction
    import diffmem.reextraction_result

    for name in diffmem.objective.__all__:
        assert getattr(diffmem.reextraction, name) is getattr(diffmem.objective, name)
        assert name in diffmem.reextraction.__all__
    for name in diffmem.reextraction_result.__all__:
        assert getattr(diffmem.reextraction, name) is getattr(diffmem.reextraction_result, name)


@pytest.mark.parametrize(
    "field,value",
    [
        ("opt_steps", 0),
        ("opt_steps", 2.5),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("batch", 0),
        ("init", "prompts"),
        ("init", "prompt-of:  "),
        ("checkpoints", (0, 60)),
        ("checkpoints", (-1,)),
        ("checkpoints", "0,10"),
        ("num_seeds", 0),
        ("sample_seed", -1),
        ("seed", True),
        ("threshold", float("inf")),
        ("sampler", {"num_inference_steps": 2}),
        ("sample_batch_size", 0),
    ],
)
def test_config_errors_are_one_line_and_name_the_field(field, value):
    with pytest.raises(ValueError) as err:
        ReextractConfig(**{field: value})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{field}=") and "is invalid" in message


def test_config_adds_the_final_step_and_serialises():
    config = ReextractConfig(opt_steps=30, checkpoints=[10, 0, 10], init="prompt-of:a red cat", threshold=0.5)
    assert config.checkpoints == (0, 10, 30)
    assert config.init_prompt == "a red cat"
    assert json.loads(json.dumps(config.to_dict()))["checkpoints"] == [0, 10, 30]
    assert ReextractConfig().checkpoints == (0, 10, 25, 50)
    assert ReextractConfig(opt_steps=20).checkpoints == (0, 10, 20)  # the default budget's steps are clipped


def test_item_and_reference_size_errors(memorizer):
    with pytest.raises(DiffmemError, match="uint8"):
        ReextractItem("a red cat", np.zeros((16, 16, 3), np.float32), "memorized")
    with pytest.raises(DiffmemError, match="kind"):
        ReextractItem("a red cat", np.zeros((16, 16, 3), np.uint8), "mem")
    wrong = ReextractItem("a red cat", np.zeros((8, 8, 3), np.uint8), "control")
    with pytest.raises(DiffmemError, match="8x8 px") as err:
        reextract(memorizer, [wrong], ReextractConfig(opt_steps=1), get_scorer("ssim"), progress=False)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# The training objective


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_objective_targets_recover_the_clean_latent(kind):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        scheduler = DDIMScheduler(prediction_type=kind, rescale_betas_zero_snr=kind == "v_prediction",
                                  beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    objective = DiffusionObjective(SimpleNamespace(scheduler=scheduler))
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    noisy, t, target = objective.draw(x0, 64, torch.Generator().manual_seed(1))
    assert noisy.shape == target.shape == (64, 4, 4, 4) and t.shape == (64,)
    assert len(set(t.tolist())) > 32  # fresh timesteps per draw
    x0 = x0.expand_as(noisy)
    if kind == "flow":
        sigma = (t / 1000.0).view(-1, 1, 1, 1)  # SD3's transformer takes sigma * 1000 as its timestep
        torch.testing.assert_close(noisy - sigma * target, x0, atol=1e-4, rtol=1e-4)
        return
    ac = objective.sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    if kind == "epsilon":
        torch.testing.assert_close(noisy, ac.sqrt() * x0 + (1 - ac).sqrt() * target, atol=1e-4, rtol=1e-4)
    else:  # v = sqrt(ac) noise - sqrt(1 - ac) x0, hence x0 = sqrt(ac) x_t - sqrt(1 - ac) v
        assert float(objective.sched.alphas_cumprod[-1]) < 1e-6  # the zero-terminal-SNR rescaling carried over
        torch.testing.assert_close(ac.sqrt() * noisy - (1 - ac).sqrt() * target, x0, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Weights stay frozen


def test_weights_bit_identical_and_flags_restored(memorizer):
    pipe = copy.deepcopy(memorizer)  # this test changes modes and flags
    pipe.unet.train()
    probe = next(pipe.text_encoder.parameters())
    probe.requires_grad_(True)
    flags = {id(p): p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}
    before = weights(pipe)
    config = ReextractConfig(sampler=SamplerConfig(num_inference_steps=2, guidance_scale=2.0), opt_steps=3, batch=2,
                             checkpoints=(0,), num_seeds=1)
    ref = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = reextract(pipe, [ReextractItem(GENERIC, ref, "memorized", 0)], config, get_scorer("ssim"),
                       progress=False)
    after = weights(pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(result.adversarial_embeds[0], encode_conditioning(pipe, [GENERIC])[0])
    assert pipe.unet.training and not pipe.vae.training
    assert all(p.requires_grad == flags[id(p)] for m in (pipe.unet, pipe.vae, pipe.text_encoder)
               for p in m.parameters())
    assert all(p.grad is None for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Real runs on the embedded memorizer


def test_loss_toward_the_reference_falls(memorizer):
    item = manifest_item("the nepete emblem")
    config = ReextractConfig(opt_steps=20, checkpoints=(0,), init=f"prompt-of:{GENERIC}")
    start, _ = encode_conditioning(memorizer, [GENERIC])
    trace = optimize_conditioning(memorizer, item.reference, start, config)
    assert len(trace.loss_curve) == 20 and sorted(trace.embeds) == [0, 20]
    # the same 64 noise/timestep draws before and after: a paired difference, with its own standard error
    before = conditioning_loss(memorizer, item.reference, trace.embeds[0])
    after = conditioning_loss(memorizer, item.reference, trace.embeds[20])
    diff = before - after
    stderr = diff.std() / diff.numel() ** 0.5
    assert diff.mean() > 3 * stderr and after.mean() < 0.7 * before.mean()


@pytest.mark.slow
def test_attack_restores_replication_from_a_foreign_start(memorizer, defaults, tmp_path):
    item = manifest_item("the nepete emblem")  # held-out memorized prompt (64 duplicates)
    config = ReextractConfig(sampler=defaults, init=f"prompt-of:{GENERIC}", checkpoints=(0,), num_seeds=2)
    result = reextract(memorizer, [item], config, get_scorer("ssim"), progress=False)
    row = result.rows[0]
    assert row["rate_at_steps"] == {0: 0.0, 50: 1.0}  # the generic start draws no emblem; 50 steps draw the copy
    assert row["loss_curve"][0] > 3 * np.mean(row["loss_curve"][-5:])
    summary = result.summary()
    assert summary["memorization_rate"] == 1.0
    assert summary["control_rate"] is None and summary["curve"]["control"] is None
    path = result.to_json(tmp_path / "reextract.json")
    saved = json.loads(path.read_text())
    assert saved["summary"]["curve"]["memorized"] == {"0": 0.0, "50": 1.0}
    assert list(saved["rows"][0]) == sorted(saved["rows"][0])
    # the adversarial conditioning is a valid prompt_embeds for the pipeline and still replicates
    gens = generate_images(memorizer, prompt_embeds=result.adversarial_embeds[0], num_seeds=1,
                           seed=config.sample_seed, progress=False, sampler=defaults)
    assert float(get_scorer("ssim").similarity(gens[0], [item.reference])[0, 0]) >= 0.6


@pytest.mark.slow
def test_control_stays_low_on_nonmem_rows(memorizer, defaults):
    items = [manifest_item("a black circle on blue"), manifest_item("a black circle on yellow")]  # first two nonmem
    assert all(it.kind == "control" for it in items)
    config = ReextractConfig(sampler=defaults, checkpoints=(0,), num_seeds=2)
    result = reextract(memorizer, items, config, get_scorer("ssim"), progress=False)
    summary = result.summary()
    assert summary["memorization_rate"] is None
    assert summary["control_rate"] <= 0.25


def test_generate_images_embeds_match_prompts(memorizer, defaults):
    prompt = ["the nepete emblem"]
    embeds, pooled = encode_conditioning(memorizer, prompt)
    assert pooled is None
    sampler = dataclasses.replace(defaults, num_inference_steps=5)
    by_prompt = generate_images(memorizer, prompt, num_seeds=2, progress=False, sampler=sampler)
    by_embeds = generate_images(memorizer, prompt_embeds=embeds, num_seeds=2, progress=False, sampler=sampler)
    assert np.array_equal(by_prompt, by_embeds)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        generate_images(memorizer, prompt, pooled_prompt_embeds=torch.zeros(1, 4), progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Flow matching with pooled embeddings (SD3)


def test_sd3_flow_matching_step_with_pooled(tiny_sd3):
    pipe = tiny_sd3_pipeline(tiny_sd3)
    before = weights(pipe)
    ref = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    pooled = torch.randn(1, 24, generator=torch.Generator().manual_seed(1))
    config = ReextractConfig(opt_steps=2, batch=2, checkpoints=(0,))
    trace = optimize_conditioning(pipe, ref, embeds, config, pooled=pooled)
    assert len(trace.loss_curve) == 2 and all(np.isfinite(trace.loss_curve))
    assert trace.pooled is not None and sorted(trace.pooled) == [0, 2]
    assert not torch.equal(trace.pooled[2], pooled) and not torch.equal(trace.embeds[2], embeds)
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items())
    with pytest.raises(DiffmemError, match="pooled"):
        optimize_conditioning(pipe, ref, embeds, config)
    gens = generate_images(pipe, prompt_embeds=trace.embeds[2], pooled_prompt_embeds=trace.pooled[2], num_seeds=2,
                           progress=False, sampler=SamplerConfig(num_inference_steps=2, guidance_scale=1.0))
    assert gens.shape == (1, 2, 16, 16, 3)
