"""Full-size denoisers: target discovery on the meta device, and record / locate / prune on random weights.

The configs below are the published ``config.json`` files of the real models, written out so that nothing is
downloaded (the SD-1.5 UNet config lives in ``test_targets.py``, with its meta-device target test). Only the
weights are random: :func:`materialise` builds a model with parameters on the meta device and fills them with a
cheap seeded init, about twice as fast as the default initialisation.

``benchmarks/bench_full_scale.py`` imports the configs and helpers of this module and runs what does not fit the
CI budget (SDXL's 2.6 B parameters, SD3-medium's 2 B).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_targets import SD15_UNET_CONFIG
from torch import Tensor, nn

from diffmem.config import LocateConfig, RecordConfig, SamplerConfig
from diffmem.edits import MANIFEST_NAME, Mask, export_edited
from diffmem.recording import ActivationRecorder, record
from diffmem.localization import locate
from diffmem.stats import ActivationStats
from diffmem.targets import find_targets

_UNET_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# stabilityai/stable-diffusion-2-1, unet/config.json (stable-diffusion-2-base differs only in sample_size=64 and
# upcast_attention=False). ``attention_head_dim`` is the number of heads per level in diffusers' UNet naming.
SD2_UNET_CONFIG = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=_UNET_DOWN,
    up_block_types=_UNET_UP,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
    dual_cross_attention=False,
    only_cross_attention=False,
    num_class_embeds=None,
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    num_attention_heads=None,
    dual_cross_attention=False,
    use_linear_projection=True,
    class_embed_type=None,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    num_class_embeds=None,
    upcast_attention=None,
    resnet_time_scale_shift="default",
    projection_class_embeddings_input_dim=2816,
    conv_in_kernel=3,
    conv_out_kernel=3,
    time_embedding_type="positional",
)

# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json. The hub file names the older Transformer2DModel
# class; keys that PixArtTransformer2DModel does not take (use_linear_projection, double_self_attention,
# num_vector_embeds, ...) are left out. sample_size=128 turns the resolution / aspect-ratio conditions on.
PIXART_ALPHA_CONFIG = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    dropout=0.0,
    norm_num_groups=32,
    cross_attention_dim=1152,
    attention_bias=True,
    sample_size=128,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    upcast_attention=False,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=4096,
    attention_type="default",
)

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (dual_attention_layers and qk_norm came
# with SD 3.5; SD3-medium has neither).
SD3_MEDIUM_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    dual_attention_layers=(),
    qk_norm=None,
)

_UNET_FFN = (
    r"(down_blocks\.\d+\.attentions|up_blocks\.\d+\.attentions|mid_block\.attentions)"
    r"\.\d+\.transformer_blocks\.\d+\.ff\.net\.2"
)


@dataclass(frozen=True)
class FullScaleArch:
    """A published denoiser config and what diffmem should find in it.

    Args:
        key: Short name (also the benchmark's ``--arch`` choice).
        title: Human-readable name.
        class_name: The diffusers model class.
        config: Constructor keyword arguments (the published config).
        source: Hub repository whose config this is.
        widths: Expected number of target layers per ``in_features`` (the FFN inner width).
        name_pattern: Regex that every target name fullmatches.
        text_dim: Width of the encoder hidden states the denoiser attends to.
        pooled_dim: Width of the pooled text embedding (SDXL's ``text_embeds``, SD3's ``pooled_projections``).
        params_m: Parameter count in millions, as built by diffusers from this config.
    """

    key: str
    title: str
    class_name: str
    config: dict[str, Any]
    source: str
    widths: dict[int, int]
    name_pattern: str
    text_dim: int
    pooled_dim: int | None
    params_m: float

    @property
    def num_targets(self) -> int:
        return sum(self.widths.values())

    @property
    def model_class(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.class_name)


ARCHS: dict[str, FullScaleArch] = {
    a.key: a
    for a in (
        FullScaleArch(
            "sd15", "Stable Diffusion 1.5", "UNet2DConditionModel", SD15_UNET_CONFIG,
            "runwayml/stable-diffusion-v1-5", {1280: 5, 2560: 5, 5120: 6}, _UNET_FFN, 768, None, 859.52,
        ),
        FullScaleArch(
            "sd2", "Stable Diffusion 2.x", "UNet2DConditionModel", SD2_UNET_CONFIG,
            "stabilityai/stable-diffusion-2-1", {1280: 5, 2560: 5, 5120: 6}, _UNET_FFN, 1024, None, 865.91,
        ),
        FullScaleArch(
            "sdxl", "Stable Diffusion XL", "UNet2DConditionModel", SDXL_UNET_CONFIG,
            "stabilityai/stable-diffusion-xl-base-1.0", {2560: 10, 5120: 60}, _UNET_FFN, 2048, 1280, 2567.46,
        ),
        FullScaleArch(
            "pixart", "PixArt-alpha XL/2", "PixArtTransformer2DModel", PIXART_ALPHA_CONFIG,
            "PixArt-alpha/PixArt-XL-2-1024-MS", {4608: 28}, r"transformer_blocks\.\d+\.ff\.net\.2", 4096, None, 611.35,
        ),
        FullScaleArch(
            "sd3", "Stable Diffusion 3 medium", "SD3Transformer2DModel", SD3_MEDIUM_CONFIG,
            "stabilityai/stable-diffusion-3-medium-diffusers", {6144: 47},
            r"transformer_blocks\.\d+\.ff(_context)?\.net\.2", 4096, 2048, 2028.33,
        ),
    )
}


# -- helpers shared with benchmarks/bench_full_scale.py ---------------------------------------------------------


def meta_model(arch: FullScaleArch) -> nn.Module:
    """Build the denoiser on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return arch.model_class(**arch.config)


def materialise(arch: FullScaleArch, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Build a full-size denoiser on the CPU with seeded random fp32 weights, skipping the default init.

    Parameters are created on the meta device and then allocated uninitialised; buffers (the sin-cos position
    tables of PixArt and SD3) are computed for real by the constructor and kept. Every parameter with two or more
    dimensions is drawn from ``U(-a, a)`` with standard deviation ``std``; 1-D weights (norms) are ones, biases zero.

    Args:
        arch: The architecture.
        seed: Seed of the weights.
        std: Standard deviation of the weights.

    Returns:
        The model in eval mode, without gradients.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; buffers built on the CPU
        model = arch.model_class(**arch.config)
    buffers = {name: b for name, b in model.named_buffers()}
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    bound = std * math.sqrt(3.0)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


def denoiser_inputs(
    arch: FullScaleArch,
    prompt_seeds: list[int],
    *,
    step: int,
    num_steps: int,
    latent: int,
    text_len: int,
) -> dict[str, Any]:
    """Keyword arguments of one classifier-free-guidance denoiser call, ``[uncond; cond]`` rows.

    Each "prompt" is a seeded random text embedding (the unconditional one has its own seed); the latents of row
    ``i`` of each half come from seed ``i``, the same noise for every prompt set.

    Args:
        arch: The architecture.
        prompt_seeds: One seed per prompt.
        step: Step index, for the timestep.
        num_steps: Number of steps of the schedule.
        latent: Latent height and width.
        text_len: Number of text tokens.

    Returns:
        Inputs for ``model(**inputs)``.
    """
    n = len(prompt_seeds)
    rows = 2 * n
    channels = arch.config["in_channels"]

    def draw(seed: int, *shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale

    latents = torch.cat([draw(i, 1, channels, latent, latent) for i in range(n)] * 2)
    seeds = [10_000] * n + [10_000 + 1 + s for s in prompt_seeds]  # uncond first
    text = torch.cat([draw(s, 1, text_len, arch.text_dim) for s in seeds])
    frac = 1.0 - step / num_steps  # from pure noise towards the data
    if arch.class_name == "SD3Transformer2DModel":  # flow matching: timestep = 1000 * sigma
        pooled = torch.cat([draw(s + 50_000, 1, arch.pooled_dim) for s in seeds])
        return dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                    timestep=torch.full((rows,), 1000.0 * frac))
    timestep = torch.full((rows,), int(999 * frac), dtype=torch.int64)
    if arch.class_name == "PixArtTransformer2DModel":
        conds = {"resolution": torch.tensor([[1024.0, 1024.0]]).repeat(rows, 1), "aspect_ratio": torch.ones(rows, 1)}
        return dict(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, added_cond_kwargs=conds)
    kwargs: dict[str, Any] = dict(sample=latents, timestep=timestep, encoder_hidden_states=text)
    if arch.config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and size / crop conditions
        pooled = torch.cat([draw(s + 50_000, 1, arch.pooled_dim) for s in seeds])
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(rows, 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return kwargs


def record_bare(
    model: nn.Module,
    arch: FullScaleArch,
    prompt_seeds: list[int],
    *,
    steps: int = 2,
    latent: int = 8,
    text_len: int = 16,
) -> ActivationStats:
    """Record a bare denoiser driven step by step with :class:`ActivationRecorder`, with CFG.

    Args:
        model: The denoiser.
        arch: Its architecture.
        prompt_seeds: One seed per "prompt" (see :func:`denoiser_inputs`).
        steps: Steps to run and record.
        latent: Latent height and width.
        text_len: Number of text tokens.

    Returns:
        The statistics, both CFG halves.
    """
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=steps, guidance_scale=5.0), record_steps=steps)
    recorder = ActivationRecorder(model, config, num_prompts=len(prompt_seeds))
    with torch.no_grad(), recorder:
        recorder.start_batch(len(prompt_seeds), cfg=True)
        for step in range(steps):
            model(**denoiser_inputs(arch, prompt_seeds, step=step, num_steps=steps, latent=latent, text_len=text_len))
    return recorder.stats


def digest(t: Tensor) -> str:
    """sha256 of a tensor's bytes (to compare large weights without keeping a copy)."""
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy()).hexdigest()


def check_mask(mask: Mask, stats: ActivationStats, ratio: float, steps: int) -> None:
    """A wanda mask covers the recorded layers and masks at most ``steps * ceil(ratio * in)`` weights per row."""
    assert mask.level == "weight"
    assert list(mask.layers) == list(stats.layers)
    for name, m in mask.layers.items():
        assert tuple(m.shape) == stats.layers[name]
        k = math.ceil(round(ratio * m.shape[1], 9))
        assert int(m.sum(dim=1).max()) <= steps * k, name
    assert 0 < mask.fraction() <= steps * ratio * 1.01


def pruned_digests(model: nn.Module, mask: Mask) -> dict[str, str]:
    """Digests of the target weights as the mask should leave them (the masked entries zeroed, the rest kept)."""
    targets = find_targets(model)
    return {name: digest(targets[name].weight.masked_fill(m, 0)) for name, m in mask.layers.items()}


def check_apply_mask(model: nn.Module, mask: Mask) -> dict[str, str]:
    """Inside ``mask.apply`` exactly the masked weights are zero; on exit every target weight is restored bit for bit.

    Returns:
        :func:`pruned_digests` of the model, to check an export against.
    """
    targets = find_targets(model)
    before = {name: digest(targets[name].weight) for name in mask.layers}
    expected = pruned_digests(model, mask)
    with mask.apply(model) as applied:
        assert applied is model
        for name, m in mask.layers.items():
            assert not targets[name].weight[m].any(), name
            assert digest(targets[name].weight) == expected[name], name
    assert {name: digest(targets[name].weight) for name in mask.layers} == before
    return expected


def check_reloaded(model: nn.Module, mask: Mask, expected: dict[str, str]) -> None:
    """The reloaded denoiser holds zeros at the masked entries and the original weights elsewhere."""
    targets = find_targets(model)
    assert list(targets) == list(mask.layers)
    for name, m in mask.layers.items():
        w = targets[name].weight
        assert w.dtype == torch.float32
        assert not w[m].any(), name
        assert digest(w) == expected[name], name


# -- target discovery on the meta device ---------------------------------------------------------------------------


# SD-1.5's meta-device target test is test_targets.test_sd15_config_has_16_ffn_outputs.
@pytest.mark.parametrize("key", ["sd2", "sdxl", "pixart", "sd3"])
def test_full_size_targets_on_meta(key: str) -> None:
    arch = ARCHS[key]
    model = meta_model(arch)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(arch.params_m, abs=0.01)
    targets = find_targets(model)
    assert len(targets) == arch.num_targets
    assert Counter(t.in_features for t in targets.values()) == Counter(arch.widths)
    assert all(re.fullmatch(arch.name_pattern, name) for name in targets)
    assert list(targets) == [name for name, _ in model.named_modules() if name in targets]  # module order
    hidden = {t.in_features // t.out_features for t in targets.values()}
    assert hidden == {4}  # every FFN is 4x wide (GEGLU value half for the UNets)


def test_sd2_attention_layout_on_meta() -> None:
    unet = meta_model(ARCHS["sd2"])
    block = unet.down_blocks[0].attentions[0]
    assert isinstance(block.proj_in, nn.Linear)  # use_linear_projection
    assert block.transformer_blocks[0].attn1.heads == 5  # attention_head_dim counts heads: 5 x 64 at 320
    assert unet.up_blocks[3].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024


def test_sdxl_has_70_transformer_blocks_on_meta() -> None:
    unet = meta_model(ARCHS["sdxl"])
    per_attention = [len(a.transformer_blocks) for b in unet.down_blocks for a in getattr(b, "attentions", [])]
    assert per_attention == [2, 2, 10, 10]
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10
    per_attention = [len(a.transformer_blocks) for b in unet.up_blocks for a in getattr(b, "attentions", [])]
    assert per_attention == [10, 10, 10, 2, 2, 2]
    names = find_targets(unet)
    assert sum(name.startswith("mid_block.") for name in names) == 10
    assert unet.add_embedding.linear_1.in_features == 2816  # 1280 pooled text + 6 x 256 time ids


def test_sd3_last_block_has_no_context_ffn_on_meta() -> None:
    model = meta_model(ARCHS["sd3"])
    names = list(find_targets(model))
    last = len(model.transformer_blocks) - 1
    assert last == 23 and model.transformer_blocks[last].context_pre_only
    assert sum(".ff.net.2" in n for n in names) == 24
    assert sum(".ff_context.net.2" in n for n in names) == 23
    assert f"transformer_blocks.{last}.ff.net.2" in names
    assert f"transformer_blocks.{last}.ff_context.net.2" not in names


# -- record / locate / prune with materialised random weights ------------------------------------------------------


def build_sd15_pipeline(tokenizer_dir: Path, seed: int = 0):
    """A ``StableDiffusionPipeline`` around the full SD-1.5 UNet (random weights), with tiny VAE and text encoder.

    The text encoder is one CLIP layer of width 768 (the UNet's cross-attention width). The VAE has four levels,
    so its scale factor is 8 as in SD-1.5; it never runs, since recording stops before decoding.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffmem.zoo.tiny import DEFAULT_WORDS, word_tokenizer

    unet = materialise(ARCHS["sd15"], seed=seed)
    tokenizer = word_tokenizer(DEFAULT_WORDS, tokenizer_dir)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_sd15_full_unet_record_locate_prune_export(tmp_path: Path, prompts: list[str]) -> None:
    from diffusers import UNet2DConditionModel

    pipe = build_sd15_pipeline(tmp_path / "tokenizer")
    assert pipe.vae_scale_factor == 8
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, height=64, width=64), record_steps=2,
                          batch_size=2)
    stats_mem = record(pipe, prompts[:2], config, progress=False)
    stats_base = record(pipe, prompts[2:4], config, progress=False)

    widths = {name: shape[1] for name, shape in stats_mem.layers.items()}
    assert len(widths) == 16
    assert Counter(widths.values()) == {1280: 5, 2560: 5, 5120: 6}
    assert list(stats_mem.halves) == ["uncond", "cond"]
    # 64 px -> 8x8 latents, halved by each of the three down-sampling levels: 64, 16, 4 tokens, 1 in the middle.
    for name, width in widths.items():
        tokens = 1 if name.startswith("mid_block.") else {1280: 64, 2560: 16, 5120: 4}[width]
        for half in ("uncond", "cond"):
            assert stats_mem.halves[half][name].count.tolist() == [2 * tokens] * 2, name

    mask = locate(pipe, stats_mem, stats_base, LocateConfig(method="wanda", ratio=0.01, record_steps=2))
    check_mask(mask, stats_mem, ratio=0.01, steps=2)
    expected = check_apply_mask(pipe.unet, mask)

    conv_in = pipe.unet.conv_in.weight.clone()
    out = tmp_path / "unet"
    try:
        export_edited(pipe.unet, mask, out)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert manifest["component"] == "UNet2DConditionModel"
        assert manifest["edit"]["num_params_changed"] == mask.num_masked()
        assert manifest["edit"]["num_total"] == mask.num_total()
        del pipe  # one full-size UNet in memory at a time
        gc.collect()
        reloaded = UNet2DConditionModel.from_pretrained(out)
        check_reloaded(reloaded, mask, expected)
        assert torch.equal(reloaded.conv_in.weight, conv_in)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 3.4 GB; pytest keeps the last three temporary folders


# PixArt-alpha's export and reload (another 2.4 GB written) and SD3-medium / SDXL (8 / 10 GB of fp32 weights) run in
# benchmarks/bench_full_scale.py; the export path of a bare denoiser is covered by the SD-1.5 test above.
@pytest.mark.slow
def test_pixart_full_transformer_record_locate_apply() -> None:
    arch = ARCHS["pixart"]
    model = materialise(arch)
    stats_mem = record_bare(model, arch, [0, 1], steps=2, latent=8, text_len=16)
    stats_base = record_bare(model, arch, [2, 3], steps=2, latent=8, text_len=16)
    assert Counter(shape[1] for shape in stats_mem.layers.values()) == {4608: 28}
    for half in ("uncond", "cond"):
        first = stats_mem.halves[half]["transformer_blocks.0.ff.net.2"]
        assert first.count.tolist() == [2 * 16, 2 * 16]  # (8 / patch 2)^2 tokens for each of 2 prompts

    mask = locate(model, stats_mem, stats_base, LocateConfig(method="wanda", ratio=0.01, record_steps=2))
    check_mask(mask, stats_mem, ratio=0.01, steps=2)
    check_apply_mask(model, mask)
