"""Finding the FFN output layers, target patterns, and loading pipelines safely."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffmem.errors import ModelLoadError, TargetNotFoundError
from diffmem.pipelines import load_pipeline, looks_like_path
from diffmem.targets import find_targets, get_denoiser, is_regex, model_source

TINY_FFN = [
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
]

# The UNet config of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def test_default_targets_of_tiny_unet(tiny_pipe):
    targets = find_targets(tiny_pipe.unet)
    assert list(targets) == TINY_FFN  # module order, names relative to the UNet
    modules = dict(tiny_pipe.unet.named_modules())
    for name, linear in targets.items():
        assert isinstance(linear, nn.Linear)
        assert modules[name] is linear
        assert linear.in_features == 4 * linear.out_features  # GEGLU inner width
    assert list(find_targets(tiny_pipe)) == TINY_FFN  # a pipeline resolves to its denoiser


def test_sd15_config_has_16_ffn_outputs():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    targets = find_targets(unet)
    assert len(targets) == 16
    assert all(name.endswith("transformer_blocks.0.ff.net.2") for name in targets)
    assert {t.in_features for t in targets.values()} == {1280, 2560, 5120}
    assert all(t.in_features == 4 * t.out_features for t in targets.values())


def test_pixart_targets(tiny_pixart):
    targets = find_targets(tiny_pixart)
    assert list(targets) == ["transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2"]
    assert all(t.in_features == 64 for t in targets.values())


def test_sd3_targets_include_context_ffn(tiny_sd3):
    targets = find_targets(tiny_sd3)
    assert "transformer_blocks.0.ff.net.2" in targets
    assert "transformer_blocks.0.ff_context.net.2" in targets
    assert all(name.endswith("net.2") for name in targets)
    order = [name for name, _ in tiny_sd3.named_modules() if name in targets]
    assert list(targets) == order


def test_suffix_pattern(tiny_pipe):
    unet = tiny_pipe.unet
    assert not is_regex("ff.net.2")
    assert list(find_targets(unet, "ff.net.2")) == TINY_FFN
    assert list(find_targets(unet, TINY_FFN[3])) == [TINY_FFN[3]]
    q = find_targets(unet, "attn2.to_q")
    assert len(q) == 4 and all(n.endswith(".attn2.to_q") for n in q)
    # "net.2" is a suffix of a full component: "t.2" is not
    with pytest.raises(TargetNotFoundError):
        find_targets(unet, "t.2")


def test_regex_pattern_is_fullmatched(tiny_pipe):
    unet = tiny_pipe.unet
    assert is_regex(r"up_blocks\..*ff\.net\.2")
    assert list(find_targets(unet, r"up_blocks\..*ff\.net\.2")) == TINY_FFN[1:3]
    with pytest.raises(TargetNotFoundError):
        find_targets(unet, r"ff\.net\.2")  # fullmatch, not search


def test_no_match_lists_candidates(tiny_pipe):
    with pytest.raises(TargetNotFoundError) as info:
        find_targets(tiny_pipe.unet, "ff.net.3")
    message = str(info.value)
    assert "\n" not in message
    assert "'ff.net.3'" in message and "candidates:" in message
    assert "ff.net.2" in message  # the closest names are suggested


def test_pattern_matches_only_linear(tiny_pipe):
    with pytest.raises(TargetNotFoundError):
        find_targets(tiny_pipe.unet, "ff")  # a FeedForward, not a Linear


def test_model_without_feed_forward():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(TargetNotFoundError, match="no diffusers FeedForward.*candidates: 0, 2"):
        find_targets(model)
    assert list(find_targets(model, "2")) == ["2"]


def test_invalid_regex():
    with pytest.raises(TargetNotFoundError, match="not a valid regex"):
        find_targets(nn.Sequential(nn.Linear(2, 2)), "ff.(net")


def test_get_denoiser(tiny_pipe, tiny_pixart):
    assert get_denoiser(tiny_pipe) is tiny_pipe.unet
    assert get_denoiser(tiny_pixart) is tiny_pixart
    with pytest.raises(TypeError):
        get_denoiser(object())


def test_model_source_is_where_the_model_was_loaded_from(tiny_pipe, tmp_path):
    assert model_source(tiny_pipe) is None  # built in memory
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    pipe = load_pipeline(tmp_path / "pipe")
    assert model_source(pipe) == str(tmp_path / "pipe")
    assert model_source(pipe.unet) == str(tmp_path / "pipe" / "unet")  # a bare denoiser names its own folder


# -- load_pipeline ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["org/model", "stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4"])
def test_hub_ids_are_not_paths(model):
    assert not looks_like_path(model)


@pytest.mark.parametrize("model", ["./models/sd", "/abs/sd", "~/sd", "a/b/c", "models/", "C:\\sd", "a b/c"])
def test_paths_are_paths(model):
    assert looks_like_path(model)


def test_load_missing_path_fails_fast(tmp_path):
    for missing in (tmp_path / "nope", "./no-such-model-folder", "no/such/model"):
        with pytest.raises(ModelLoadError, match="model path not found") as info:
            load_pipeline(missing)
        assert "\n" not in str(info.value)


def test_load_missing_under_existing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="model path not found"):
        load_pipeline("models/sd")


def test_load_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_load_safetensors_folder(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    pipe = load_pipeline(tmp_path / "pipe")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert torch.equal(pipe.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)


def test_bin_only_folder_needs_allow_pickle(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False)
    assert not list((tmp_path / "pipe" / "unet").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="allow-pickle") as info:
        load_pipeline(tmp_path / "pipe")
    assert "unet" in str(info.value) and "\n" not in str(info.value)
    pipe = load_pipeline(tmp_path / "pipe", allow_pickle=True, torch_dtype=torch.float32)
    assert torch.equal(pipe.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)
