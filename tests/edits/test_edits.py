"""The Edit protocol on a tiny Stable Diffusion pipeline, for every kind of edit (mask, directions, weight delta).

Each kind is checked for the same contract: it round-trips through ``save`` / ``load_edit``, applies reversibly
(restored bit for bit, also after an exception), bakes, refuses a model it does not fit with a one-line
``EditMismatchError`` without touching it, and ``export_edited`` writes a folder that a plain ``from_pretrained``
loads into the edited model. Then the guards of ``export_edited``: it never overwrites the source model or a folder
that is not an earlier export, and a failed export leaves everything as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import diffmem
from diffmem.edits import (
    MANIFEST_NAME,
    DirectionBasis,
    Edit,
    Mask,
    WeightDelta,
    apply_edit,
    check_output_dir,
    export_edited,
    list_edit_formats,
    load_edit,
    register_edit,
)
from diffmem.errors import DiffmemError, EditMismatchError, ExportError, MaskMismatchError
from diffmem.targets import find_targets
from diffmem.zoo.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = build_tiny_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_mask(unet) -> Mask:
    g = torch.Generator().manual_seed(0)
    layers = {name: torch.rand(lin.weight.shape, generator=g) < 0.2 for name, lin in find_targets(unet).items()}
    return Mask(layers, meta={"method": "wanda", "config": {"ratio": 0.2}})


def make_basis(unet) -> DirectionBasis:
    g = torch.Generator().manual_seed(1)
    targets = find_targets(unet)
    layers = {name: torch.linalg.qr(torch.randn(lin.in_features, 2, generator=g))[0] for name, lin in targets.items()}
    shapes = {name: tuple(lin.weight.shape) for name, lin in targets.items()}
    return DirectionBasis(layers, shapes, meta={"method": "directions", "config": {"rank": 2}})


def make_delta(unet) -> WeightDelta:
    g = torch.Generator().manual_seed(2)
    first, second = list(find_targets(unet))[:2]
    params = dict(unet.named_parameters())
    names = [f"{first}.weight", f"{first}.bias", f"{second}.weight", "conv_in.weight"]
    deltas = {n: 0.05 * torch.randn(params[n].shape, generator=g) for n in names}
    return WeightDelta(deltas, meta={"method": "finetune", "config": {"steps": 3}})


MAKERS: dict[str, Callable[[torch.nn.Module], Edit]] = {"mask": make_mask, "directions": make_basis,
                                                         "delta": make_delta}
KINDS = list(MAKERS)


@pytest.fixture(scope="module")
def edits(pipe) -> dict[str, Edit]:
    return {kind: make(pipe.unet) for kind, make in MAKERS.items()}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def changed_keys(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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


def expected_keys(edit: Edit) -> set[str]:
    """State-dict keys an edit changes (a mask or basis edits ``<layer>.weight``, a delta names the parameter)."""
    if isinstance(edit, WeightDelta):
        return set(edit.deltas)
    return {f"{name}.weight" for name in edit.layer_shapes()}


# -- the protocol, for every kind ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_save_and_load_edit(kind, edits, tmp_path) -> None:
    edit = edits[kind]
    path = edit.save(tmp_path / "edit")
    assert path == tmp_path / "edit.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "edit.safetensors"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == edit.sha256()
    text = (tmp_path / "edit.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    sidecar = json.loads(text)
    assert sidecar["kind"] == edit.kind and sidecar["sha256"] == edit.sha256() and sidecar["meta"] == edit.meta

    for spelling in ("edit", "edit.safetensors", "edit.json"):
        loaded = load_edit(tmp_path / spelling)
        assert type(loaded) is type(edit)
        assert loaded.sha256() == edit.sha256() and loaded.meta == edit.meta
        assert loaded.layer_shapes() == edit.layer_shapes()
        assert loaded.num_params_changed() == edit.num_params_changed()
        mine, theirs = edit.tensors(), loaded.tensors()
        assert list(mine) == list(theirs)
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert type(edit).load(tmp_path / "edit").sha256() == edit.sha256()  # the class's own loader
    assert type(Edit.load(tmp_path / "edit")) is type(edit)  # the base class loads any kind
    other = next(cls for cls in (Mask, DirectionBasis, WeightDelta) if cls is not type(edit))
    with pytest.raises(DiffmemError, match=f"holds a {edit.kind}, not a {other.kind}"):
        load_edit(tmp_path / "edit", expect=other)
    with pytest.raises(DiffmemError, match=f"holds a {edit.kind}, not a {other.kind}"):
        other.load(tmp_path / "edit")


def test_every_kind_is_registered_when_the_package_is_imported() -> None:
    assert list_edit_formats() == sorted(cls.format for cls in (Mask, DirectionBasis, WeightDelta))
    assert all("load" not in vars(cls) for cls in (Mask, DirectionBasis, WeightDelta))  # one Edit.load for all
    with pytest.raises(ValueError, match="already registered"):
        register_edit(type("OtherMask", (Mask,), {}))
    assert register_edit(Mask) is Mask
    assert MaskMismatchError is EditMismatchError  # the former name still catches


@pytest.mark.parametrize("kind", KINDS)
def test_apply_is_reversible_bit_for_bit(kind, edits, fresh_tiny_pipe) -> None:
    pipe, edit = fresh_tiny_pipe, edits[kind]
    before = snapshot(pipe.unet)
    reference = generate(pipe)
    with apply_edit(pipe, edit) as applied:
        assert applied is pipe
        assert changed_keys(pipe.unet, before) == expected_keys(edit)
        inside = snapshot(pipe.unet)
        edited = generate(pipe)
    assert_same(pipe.unet, before)
    assert not np.allclose(reference, edited)
    assert np.array_equal(generate(pipe), reference)

    with pytest.raises(RuntimeError, match="boom"):
        with edit.apply(pipe.unet):  # a bare denoiser works too
            assert changed_keys(pipe.unet, before) == expected_keys(edit)
            raise RuntimeError("boom")
    assert_same(pipe.unet, before)

    with edit.apply(pipe):  # a second application gives the very same weights
        assert_same(pipe.unet, inside)
    assert_same(pipe.unet, before)


@pytest.mark.parametrize("kind", KINDS)
def test_bake_writes_what_apply_shows(kind, edits, fresh_tiny_pipe) -> None:
    pipe, edit = fresh_tiny_pipe, edits[kind]
    with edit.apply(pipe):
        inside = snapshot(pipe.unet)
    assert edit.bake(pipe) == edit.num_params_changed() > 0
    assert_same(pipe.unet, inside)


def test_what_each_kind_writes(edits, fresh_tiny_pipe) -> None:
    unet = fresh_tiny_pipe.unet
    before = snapshot(unet)
    modules = dict(unet.named_modules())
    mask, basis, delta = edits["mask"], edits["directions"], edits["delta"]
    with mask.apply(unet):
        for name, m in mask.layers.items():
            w = modules[name].weight
            assert torch.all(w[m] == 0)
            assert torch.equal(w[~m], before[f"{name}.weight"][~m])
    with basis.apply(unet):
        for name, u in basis.layers.items():
            w0 = before[f"{name}.weight"]
            w = modules[name].weight.detach()
            assert (w @ u).abs().max() < 1e-5 * w0.abs().max()  # the subspace is gone from the input side
            v = torch.randn(u.shape[0], generator=torch.Generator().manual_seed(4))
            v = v - u @ (u.T @ v)  # ... and the rest is untouched
            torch.testing.assert_close(w @ v, w0 @ v, rtol=1e-5, atol=1e-5)
    params = dict(unet.named_parameters())
    with delta.apply(unet):
        for name, d in delta.deltas.items():
            assert torch.equal(params[name].detach(), before[name] + d)
    assert delta.num_params_changed() == sum(d.numel() for d in delta.deltas.values())
    assert mask.num_params_changed() == mask.num_masked()


@pytest.mark.parametrize("kind", KINDS)
def test_mismatch_is_one_line_and_touches_nothing(kind, pipe, tmp_path) -> None:
    names = list(find_targets(pipe.unet))
    missing = "down_blocks.9.ff.net.2"
    if kind == "mask":
        layers = dict(make_mask(pipe.unet).layers)
        layers[names[1]] = torch.zeros(32, 128, dtype=torch.bool)  # first mismatch
        layers[names[2]] = torch.zeros(8, 8, dtype=torch.bool)
        bad, culprit, shapes = Mask(layers), names[1], "(32, 128) but the model's is (64, 256)"
        absent = Mask({missing: torch.zeros(2, 2, dtype=torch.bool), **layers})
    elif kind == "directions":
        basis = make_basis(pipe.unet)
        wrong = dict(basis.shapes)
        wrong[names[1]] = (32, 256)
        wrong[names[2]] = (8, 256)
        bad, culprit, shapes = DirectionBasis(basis.layers, wrong), names[1], "(32, 256) but the model's is (64, 256)"
        absent = DirectionBasis({missing: torch.zeros(4, 0), **basis.layers}, {missing: (2, 4), **basis.shapes})
    else:
        deltas = dict(make_delta(pipe.unet).deltas)
        culprit = f"{names[0]}.bias"
        deltas[culprit] = torch.zeros(65)
        bad, shapes = WeightDelta(deltas), "(65,) but the model's is (64,)"
        missing = f"{missing}.weight"
        absent = WeightDelta({missing: torch.ones(2, 2), **deltas})
    before = snapshot(pipe.unet)
    for action in (bad.validate, bad.bake, lambda p: export_edited(p, bad, tmp_path / "out")):
        with pytest.raises(EditMismatchError) as err:
            action(pipe)
        assert str(err.value) == f"{bad.kind} layer '{culprit}' has shape {shapes}"
    with pytest.raises(EditMismatchError, match="has shape"):
        with apply_edit(pipe, bad):
            pytest.fail("the block must not run")
    with pytest.raises(EditMismatchError) as err:
        absent.bake(pipe)
    assert str(err.value) == (f"{absent.kind} layer '{missing}' is not in the model (UNet2DConditionModel); "
                              "was it made for another model?")
    assert_same(pipe.unet, before)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_with_plain_from_pretrained(kind, pipe, edits, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    edit = edits[kind]
    edit_file = edit.save(tmp_path / "edit")
    before = snapshot(pipe.unet)
    out = export_edited(pipe, edit, tmp_path / "edited", source="tiny/source", edit_path=edit_file,
                        settings={"locate": {"ratio": 0.2}})
    assert out == tmp_path / "edited"
    assert_same(pipe.unet, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "edit.safetensors", "edited"]

    loaded = StableDiffusionPipeline.from_pretrained(str(out))
    loaded.set_progress_bar_config(disable=True)
    with apply_edit(pipe, edit):
        expected = generate(pipe)
        edited = snapshot(pipe.unet)
    assert_same(loaded.unet, edited)
    np.testing.assert_array_equal(generate(loaded), expected)

    text = (out / MANIFEST_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    manifest = json.loads(text)
    assert manifest["format"] == "diffmem.export" and manifest["component"] == "pipeline"
    assert manifest["source"] == "tiny/source"
    assert manifest["edit"] == json.loads(json.dumps(edit.describe()))
    assert manifest["edit"]["kind"] == edit.kind and manifest["edit"]["sha256"] == edit.sha256()
    assert manifest["edit"]["num_params_changed"] == edit.num_params_changed()
    assert manifest["edit"]["fraction_changed"] == pytest.approx(edit.fraction_changed())
    assert manifest["edit_meta"] == edit.meta
    assert manifest["edit_file_sha256"] == hashlib.sha256(edit_file.read_bytes()).hexdigest() == edit.sha256()
    assert manifest["settings"] == {"locate": {"ratio": 0.2}}
    assert manifest["diffmem_version"] == diffmem.__version__
    assert manifest["carried_sidecars"] == []


def test_mask_manifest_records_counts_and_level(pipe, edits, tmp_path) -> None:
    mask = edits["mask"]
    manifest = json.loads((export_edited(pipe, mask, tmp_path / "pruned") / MANIFEST_NAME).read_text())
    assert manifest["edit"]["counts"] == mask.counts()
    assert manifest["edit"]["num_params_changed"] == mask.num_masked()
    assert manifest["edit"]["fraction_changed"] == pytest.approx(mask.fraction())
    assert manifest["edit"]["level"] == "weight"
    assert manifest["edit_meta"]["config"] == {"ratio": 0.2}  # from the mask's meta
    assert manifest["settings"] is None
    basis = edits["directions"]
    manifest = json.loads((export_edited(pipe, basis, tmp_path / "projected") / MANIFEST_NAME).read_text())
    assert manifest["edit"]["ranks"] == basis.ranks() and manifest["edit"]["num_params_changed"] == 4 * 64 * 256


@pytest.mark.parametrize("kind", KINDS)
def test_export_bare_denoiser(kind, pipe, edits, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    edit = edits[kind]
    out = export_edited(pipe.unet, edit, tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(str(out))
    with edit.apply(pipe.unet):
        assert_same(unet, snapshot(pipe.unet))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["component"] == "UNet2DConditionModel"


def test_export_without_an_edit_and_of_a_bare_module(pipe, tmp_path) -> None:
    out = export_edited(pipe.unet, None, tmp_path / "plain")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["edit"] is None and manifest["edit_meta"] is None
    with pytest.raises(ExportError, match="Linear"):
        export_edited(torch.nn.Linear(2, 2), Mask({}), tmp_path / "linear")
    with pytest.raises(ExportError, match="does not exist"):
        export_edited(pipe.unet, None, tmp_path / "other", edit_path=tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_apply_edit_without_an_edit_and_with_a_foreign_object(fresh_tiny_pipe) -> None:
    before = snapshot(fresh_tiny_pipe.unet)
    with apply_edit(fresh_tiny_pipe, None) as applied:
        assert applied is fresh_tiny_pipe
        assert_same(fresh_tiny_pipe.unet, before)
    with pytest.raises(TypeError, match="unsupported edit"):
        with apply_edit(fresh_tiny_pipe, object()):
            pytest.fail("the block must not run")


# -- export_edited's guards ----------------------------------------------------------------------------------------


@pytest.fixture
def source(pipe, tmp_path) -> Path:
    """A saved model folder ``tmp/parent/model`` with diffmem's sampler defaults beside the weights."""
    folder = tmp_path / "parent" / "model"
    pipe.save_pretrained(folder)
    (folder / "diffmem_defaults.json").write_text(json.dumps({"num_inference_steps": 2}))
    (folder.parent / "notes.txt").write_text("mine")
    return folder


def test_export_copies_the_sampler_defaults_of_the_source(source, edits, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(source))
    out = export_edited(loaded, edits["mask"], tmp_path / "pruned")  # the source is the pipeline's own path
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"] == str(source)
    assert manifest["carried_sidecars"] == ["diffmem_defaults.json"]
    assert (out / "diffmem_defaults.json").read_bytes() == (source / "diffmem_defaults.json").read_bytes()


@pytest.mark.parametrize("where", ["source itself", "inside the source", "around the source"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_writes_over_the_source(where, overwrite, source, pipe, edits) -> None:
    out = {"source itself": source, "inside the source": source / "unet" / "edited",
           "around the source": source.parent}[where]
    parent = tree(source.parent)
    for src in (str(source), str(source / ".." / "model")):  # the same folder, spelled differently
        with pytest.raises(ExportError, match="would overwrite the input model") as err:
            export_edited(pipe, edits["mask"], out, source=src, overwrite=overwrite)
        assert "\n" not in str(err.value)
    assert tree(source.parent) == parent
    assert sorted(p.name for p in source.parent.parent.iterdir()) == ["parent"]  # no temporary folder left


def test_overwrite_replaces_only_an_earlier_export(pipe, edits, tmp_path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="already exists" if not overwrite else "not an earlier diffmem") as err:
            export_edited(pipe, edits["mask"], out, overwrite=overwrite)
        assert "\n" not in str(err.value)
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    (out / "keep.txt").unlink()  # an empty folder may be filled
    export_edited(pipe, edits["mask"], out, overwrite=True)
    assert json.loads((out / MANIFEST_NAME).read_text())["edit"]["kind"] == "mask"
    with pytest.raises(ExportError, match="already exists"):
        export_edited(pipe, edits["directions"], out)
    export_edited(pipe, edits["directions"], out, overwrite=True)  # an earlier export is replaced
    assert json.loads((out / MANIFEST_NAME).read_text())["edit"]["kind"] == "directions"
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        check_output_dir(a_file, overwrite=True)


def test_failed_export_leaves_everything_as_it_was(pipe, edits, tmp_path, monkeypatch) -> None:
    before = snapshot(pipe.unet)
    old = export_edited(pipe, edits["delta"], tmp_path / "old")
    old_tree = tree(old)

    def broken_save(save_directory, **kwargs):
        with open(f"{save_directory}/model_index.json", "w") as f:
            f.write("{}")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipe, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_edited(pipe, edits["mask"], tmp_path / "new")
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_edited(pipe, edits["mask"], old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert tree(old) == old_tree
    assert_same(pipe.unet, before)
