"""Tests of applying, baking and exporting masks on a tiny Stable Diffusion pipeline."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch

import diffmem
from diffmem.errors import ExportError, MaskMismatchError
from diffmem.locate import Mask
from diffmem.prune import MANIFEST_NAME, apply_mask, bake, export_pruned, validate_mask
from diffmem.targets import find_targets
from diffmem.zoo.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def mask(pipe) -> Mask:
    g = torch.Generator().manual_seed(0)
    layers = {name: torch.rand(lin.weight.shape, generator=g) < 0.2 for name, lin in find_targets(pipe.unet).items()}
    return Mask(layers, meta={"method": "wanda", "config": {"ratio": 0.2}})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def generate(pipe, seed: int = 3) -> np.ndarray:
    out = pipe(
        "a red cat",
        height=16,
        width=16,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def test_apply_mask_zeroes_and_restores_bit_for_bit(pipe, mask) -> None:
    before = snapshot(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    with apply_mask(pipe, mask) as applied:
        assert applied is pipe
        for name, m in mask.layers.items():
            w = modules[name].weight
            assert torch.all(w[m] == 0)
            assert torch.equal(w[~m], before[f"{name}.weight"][~m])
    assert_same(pipe.unet, before)

    with pytest.raises(RuntimeError, match="boom"):
        with apply_mask(pipe.unet, mask):
            raise RuntimeError("boom")
    assert_same(pipe.unet, before)


def test_apply_mask_changes_the_output(pipe, mask) -> None:
    reference = generate(pipe)
    with apply_mask(pipe, mask):
        masked = generate(pipe)
    assert not np.allclose(reference, masked)
    assert np.array_equal(generate(pipe), reference)


def test_bake_zeroes_exactly_the_masked_weights(pipe, mask) -> None:
    unet = copy.deepcopy(pipe.unet)
    before = snapshot(unet)
    assert bake(unet, mask) == mask.num_masked()
    after = unet.state_dict()
    for key, value in before.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in mask.layers:
            m = mask.layers[name]
            assert torch.all(after[key][m] == 0)
            assert torch.equal(after[key][~m], value[~m])
        else:
            assert torch.equal(after[key], value), key


def test_mismatch_names_the_first_layer_and_touches_nothing(pipe, mask) -> None:
    names = list(mask.layers)
    layers = dict(mask.layers)
    layers[names[1]] = torch.zeros(32, 128, dtype=torch.bool)  # first mismatch
    layers[names[2]] = torch.zeros(8, 8, dtype=torch.bool)
    bad = Mask(layers)
    before = snapshot(pipe.unet)
    expected = f"mask layer '{names[1]}' has shape (32, 128) but the model's is (64, 256)"
    for action in (validate_mask, bake):
        with pytest.raises(MaskMismatchError) as err:
            action(pipe, bad)
        assert str(err.value) == expected
    with pytest.raises(MaskMismatchError, match="has shape"):
        with apply_mask(pipe, bad):
            pytest.fail("the block must not run")
    assert_same(pipe.unet, before)

    missing = Mask({**mask.layers, "down_blocks.9.ff.net.2": torch.zeros(2, 2, dtype=torch.bool)})
    with pytest.raises(MaskMismatchError, match="'down_blocks.9.ff.net.2' is not in the model"):
        bake(pipe, missing)
    assert_same(pipe.unet, before)


def test_export_loads_with_plain_from_pretrained(pipe, mask, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    before = snapshot(pipe.unet)
    out = export_pruned(pipe, mask, tmp_path / "pruned", source="tiny/source", config={"ratio": 0.2})
    assert out == tmp_path / "pruned"
    assert_same(pipe.unet, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]

    loaded = StableDiffusionPipeline.from_pretrained(str(out))
    loaded.set_progress_bar_config(disable=True)
    modules = dict(loaded.unet.named_modules())
    for name, m in mask.layers.items():
        w = modules[name].weight
        assert torch.all(w[m] == 0)
        assert torch.equal(w[~m], before[f"{name}.weight"][~m])
    with apply_mask(pipe, mask):
        expected = generate(pipe)
    assert np.allclose(generate(loaded), expected, atol=1e-5)

    text = (out / MANIFEST_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    manifest = json.loads(text)
    assert manifest["source"] == "tiny/source"
    assert manifest["mask_sha256"] == mask.sha256()
    assert manifest["counts"] == mask.counts()
    assert manifest["num_zeroed"] == mask.num_masked()
    assert manifest["fraction_zeroed"] == pytest.approx(mask.fraction())
    assert manifest["level"] == "weight"
    assert manifest["diffmem_version"] == diffmem.__version__
    assert manifest["config"] == {"ratio": 0.2}


def test_export_records_the_mask_file_hash(pipe, mask, tmp_path) -> None:
    mask_file = mask.save(tmp_path / "mask")
    out = export_pruned(pipe, mask, tmp_path / "pruned", mask_path=mask_file)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["mask_sha256"] == hashlib.sha256(mask_file.read_bytes()).hexdigest() == mask.sha256()
    assert manifest["config"] == {"ratio": 0.2}  # from the mask's meta


def test_export_refuses_existing_folder_unless_overwrite(pipe, mask, tmp_path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_pruned(pipe, mask, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    export_pruned(pipe, mask, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / MANIFEST_NAME).is_file() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_failed_export_leaves_nothing_behind(pipe, mask, tmp_path, monkeypatch) -> None:
    before = snapshot(pipe.unet)

    def broken_save(save_directory, **kwargs):
        with open(f"{save_directory}/model_index.json", "w") as f:
            f.write("{}")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipe, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_pruned(pipe, mask, tmp_path / "pruned")
    assert list(tmp_path.iterdir()) == []
    assert_same(pipe.unet, before)

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_pruned(pipe, mask, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]


def test_export_bare_denoiser(pipe, mask, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    out = export_pruned(pipe.unet, mask, tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(str(out))
    modules = dict(unet.named_modules())
    for name, m in mask.layers.items():
        assert torch.all(modules[name].weight[m] == 0)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["component"] == "UNet2DConditionModel"
    with pytest.raises(ExportError, match="Linear"):
        export_pruned(torch.nn.Linear(2, 2), Mask({}), tmp_path / "linear")
