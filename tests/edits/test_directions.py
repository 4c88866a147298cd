"""The direction view: locating the shared subspace with an SVD, projecting it out, exporting and comparing."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffmem
from diffmem.config import LocateConfig, RecordConfig, SamplerConfig
from diffmem.data import ManifestEntry
from diffmem.edits import MANIFEST_NAME, DirectionBasis, Mask, apply_edit, export_edited, subspace_overlap
from diffmem.errors import DiffmemError, EditMismatchError, ExportError
from diffmem.recording import ActivationRecorder, record
from diffmem.localization import explained_variance_curves, locate, locate_directions
from diffmem.stats import ActivationStats, LayerStats
from diffmem.targets import find_targets


# -- helpers ---------------------------------------------------------------------------------------------------------
def unit(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def synthetic_stats(
    shapes: dict[str, tuple[int, int]],
    directions: dict[str, torch.Tensor],
    mu: dict[str, torch.Tensor],
    *,
    prompts: int = 20,
    seed: int = 0,
    noise: float = 0.01,
    signatures: bool = True,
) -> ActivationStats:
    """Statistics whose signatures are ``mu + a_i * u + noise`` (``u`` absent: base prompts, pure noise)."""
    g = torch.Generator().manual_seed(seed)
    sigs, cond = {}, {}
    for name, (_, n) in shapes.items():
        sig = mu[name] + noise * torch.randn(prompts, n, generator=g)
        if name in directions:
            sig = sig + (1 + torch.rand(prompts, 1, generator=g)) * directions[name]
        sigs[name] = sig
        count = torch.full((2,), 10 * prompts, dtype=torch.int64)
        total = sig.sum(dim=0) * 10
        cond[name] = LayerStats(count, torch.stack([total, total]), torch.zeros(2, n), torch.zeros(2, n))
    return ActivationStats(shapes, 2, halves={"cond": cond}, meta={"num_prompts": prompts},
                           signatures=sigs if signatures else None)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def layer_shapes(denoiser: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: tuple(m.weight.shape) for name, m in find_targets(denoiser).items()}


def planted(denoiser: torch.nn.Module, rank_seed: int = 1):
    """Synthetic memorized and base statistics on the denoiser's target layers, with the planted directions."""
    shapes = layer_shapes(denoiser)
    u = {name: unit(n, rank_seed + i) for i, (name, (_, n)) in enumerate(shapes.items())}
    mu = {name: torch.randn(n, generator=torch.Generator().manual_seed(100 + i)) for i, (name, (_, n))
          in enumerate(shapes.items())}
    return shapes, u, synthetic_stats(shapes, u, mu, seed=0), synthetic_stats(shapes, {}, mu, seed=1)


def generate(pipe, seed: int = 3) -> np.ndarray:
    return pipe("a red cat", height=16, width=16, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


# -- locating ----------------------------------------------------------------------------------------------------------
def test_locator_recovers_a_planted_direction() -> None:
    shapes = {"a.ff.net.2": (8, 64), "b.ff.net.2": (8, 32)}
    u = {name: unit(n, i) for i, (name, (_, n)) in enumerate(shapes.items())}
    mu = {name: torch.randn(n, generator=torch.Generator().manual_seed(7)) for name, (_, n) in shapes.items()}
    mem, base = synthetic_stats(shapes, u, mu, seed=0), synthetic_stats(shapes, {}, mu, seed=1)
    basis = locate_directions(mem, base, LocateConfig(method="directions", explained_variance=0.5))
    assert basis.ranks() == {name: 1 for name in shapes}  # one planted direction carries the energy
    for name in shapes:
        top = basis.layers[name][:, 0]
        assert torch.dot(top, u[name]).item() >= 0.99  # signed towards the memorized side
    curves = basis.meta["explained_variance"]
    assert curves == explained_variance_curves(mem, base)
    for curve in curves.values():
        assert curve[0] > 0.99 and curve[-1] == pytest.approx(1.0) and curve == sorted(curve)

    # the base mean from the streamed sums (no base signatures) gives the same direction
    no_sig = synthetic_stats(shapes, {}, mu, seed=1, signatures=False)
    other = locate_directions(mem, no_sig, LocateConfig(method="directions", rank=3))
    assert other.ranks() == {name: 3 for name in shapes} and other.meta["base_mean"] == "statistics"
    for name in shapes:
        assert abs(torch.dot(other.layers[name][:, 0], u[name]).item()) >= 0.99
        gram = other.layers[name].T @ other.layers[name]
        torch.testing.assert_close(gram, torch.eye(3), atol=1e-5, rtol=0)

    with pytest.raises(DiffmemError, match="--signatures"):
        locate_directions(no_sig, base, LocateConfig(method="directions"))


def test_rank_is_capped_at_the_number_of_prompts() -> None:
    shapes = {"x.ff.net.2": (4, 16)}
    mu = {"x.ff.net.2": torch.zeros(16)}
    mem = synthetic_stats(shapes, {"x.ff.net.2": unit(16, 0)}, mu, prompts=3)
    basis = locate_directions(mem, synthetic_stats(shapes, {}, mu, seed=1), LocateConfig(method="directions", rank=8))
    assert basis.ranks() == {"x.ff.net.2": 3} and basis.meta["available_rank"] == {"x.ff.net.2": 3}


def test_locate_dispatches_to_directions(tiny_pipe) -> None:
    shapes, u, mem, base = planted(tiny_pipe.unet)
    basis = locate(tiny_pipe, mem, base, LocateConfig(method="directions", rank=2))
    assert isinstance(basis, DirectionBasis)
    assert basis.shapes == shapes and basis.ranks() == {name: 2 for name in shapes}
    assert basis.meta["method"] == "directions" and basis.meta["diffmem_version"] == diffmem.__version__


def test_signatures_do_not_depend_on_batching(tiny_pipe, prompts) -> None:
    config = dict(sampler=SamplerConfig(num_inference_steps=2, height=16, width=16), record_steps=2, signatures=True)
    one = record(tiny_pipe, prompts[:4], RecordConfig(batch_size=1, **config), progress=False)
    eight = record(tiny_pipe, prompts[:4], RecordConfig(batch_size=8, **config), progress=False)
    base = record(tiny_pipe, prompts[4:], RecordConfig(batch_size=8, **config), progress=False)
    for name in one.layers:
        torch.testing.assert_close(one.signatures[name], eight.signatures[name], rtol=1e-4, atol=1e-6)
    cfg = LocateConfig(method="directions", rank=2)
    overlap = subspace_overlap(locate_directions(one, base, cfg), locate_directions(eight, base, cfg))
    assert overlap["overall"] == pytest.approx(1.0, abs=1e-4)


# -- the basis ---------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_errors(tmp_path) -> None:
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))
    basis = DirectionBasis({"a": q, "b": torch.zeros(8, 0)}, {"a": (4, 16), "b": (2, 8)},
                           meta={"method": "directions", "config": {"rank": 3}})
    path = basis.save(tmp_path / "dirs")
    assert path == tmp_path / "dirs.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == basis.sha256()
    text = (tmp_path / "dirs.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    loaded = DirectionBasis.load(tmp_path / "dirs.json")
    assert loaded.shapes == basis.shapes and loaded.ranks() == {"a": 3, "b": 0}
    assert all(torch.equal(loaded.layers[n], basis.layers[n]) for n in basis.layers)
    assert loaded.meta == basis.meta and loaded.sha256() == basis.sha256()
    assert basis.num_params_changed() == 4 * 16 and basis.num_total() == 4 * 16 + 2 * 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirs.json", "dirs.safetensors"]

    with pytest.raises(DiffmemError, match="does not exist"):
        DirectionBasis.load(tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DiffmemError, match="cannot read"):
        DirectionBasis.load(tmp_path / "junk")
    Mask({"a": torch.zeros(2, 2, dtype=torch.bool)}).save(tmp_path / "mask")
    with pytest.raises(DiffmemError, match="holds a mask, not a directions"):
        DirectionBasis.load(tmp_path / "mask")
    (tmp_path / "dirs.json").write_text("{broken")
    with pytest.raises(DiffmemError, match="cannot read"):
        DirectionBasis.load(tmp_path / "dirs")
    with pytest.raises(ValueError, match="not orthonormal"):
        DirectionBasis({"a": torch.ones(16, 2)}, {"a": (4, 16)})


def test_params_changed_counts_only_touched_columns() -> None:
    axis = torch.zeros(16, 1)
    axis[5] = 1.0
    assert DirectionBasis({"a": axis}, {"a": (4, 16)}).num_params_changed() == 4  # like one masked neuron
    assert DirectionBasis({"a": unit(16, 0)[:, None]}, {"a": (4, 16)}).num_params_changed() == 4 * 16


def test_subspace_overlap_identical_orthogonal_and_chance() -> None:
    eye = torch.eye(32)
    a = DirectionBasis({"x": eye[:, :4], "y": eye[:, :0]}, {"x": (2, 32), "y": (2, 32)})
    b = DirectionBasis({"x": eye[:, 4:8], "y": eye[:, :0]}, {"x": (2, 32), "y": (2, 32)})
    same = subspace_overlap(a, a)
    assert same["per_layer"] == {"x": pytest.approx(1.0), "y": 1.0}
    assert same["cosines"]["x"] == pytest.approx([1.0] * 4) and same["chance"]["x"] == pytest.approx(4 / 32)
    ortho = subspace_overlap(a, b)
    assert ortho["per_layer"]["x"] == pytest.approx(0.0) and ortho["overall"] == pytest.approx(0.5)
    assert subspace_overlap(a, b, k=2)["ranks"]["x"] == [2, 2]
    with pytest.raises(EditMismatchError, match="'x'"):
        subspace_overlap(a, DirectionBasis({"x": eye[:16, :1]}, {"x": (2, 16)}))


# -- editing -----------------------------------------------------------------------------------------------------------
def test_projection_removes_the_direction_and_restores_bit_for_bit(fresh_tiny_pipe) -> None:
    pipe = fresh_tiny_pipe
    shapes = layer_shapes(pipe.unet)
    name = next(iter(shapes))
    u = unit(shapes[name][1], 0)
    basis = DirectionBasis({n: (u[:, None] if n == name else torch.zeros(s[1], 0)) for n, s in shapes.items()},
                           shapes)
    modules = dict(pipe.unet.named_modules())
    before = snapshot(pipe.unet)
    w0 = before[f"{name}.weight"]
    v = torch.randn(shapes[name][1], generator=torch.Generator().manual_seed(1))
    v = v - torch.dot(v, u) * u
    with basis.apply(pipe) as applied:
        assert applied is pipe
        w = modules[name].weight.detach()
        assert (w @ u).abs().max() < 1e-5 * w0.abs().max()
        torch.testing.assert_close(w @ v, w0 @ v, rtol=1e-5, atol=1e-5)
        for other in shapes:
            if other != name:
                assert torch.equal(modules[other].weight, before[f"{other}.weight"])
        projected = generate(pipe)
    assert_same(pipe.unet, before)
    assert not np.allclose(projected, generate(pipe))

    with pytest.raises(RuntimeError, match="boom"):
        with basis.apply(pipe.unet):
            raise RuntimeError("boom")
    assert_same(pipe.unet, before)

    assert basis.bake(pipe) == shapes[name][0] * shapes[name][1]
    assert (modules[name].weight.detach() @ u).abs().max() < 1e-5 * w0.abs().max()


def test_mismatch_names_the_first_layer_and_touches_nothing(fresh_tiny_pipe) -> None:
    pipe = fresh_tiny_pipe
    shapes = layer_shapes(pipe.unet)
    names = list(shapes)
    bad_shapes = dict(shapes)
    bad_shapes[names[1]] = (32, 128)  # first mismatch
    bad_shapes[names[2]] = (8, 8)
    layers = {n: unit(s[1], i)[:, None] for i, (n, s) in enumerate(bad_shapes.items())}
    bad = DirectionBasis(layers, bad_shapes)
    before = snapshot(pipe.unet)
    expected = f"directions layer '{names[1]}' has shape (32, 128) but the model's is (64, 256)"
    for action in (bad.validate, bad.bake):
        with pytest.raises(EditMismatchError) as err:
            action(pipe)
        assert str(err.value) == expected
    with pytest.raises(EditMismatchError, match="has shape"):
        with bad.apply(pipe):
            pytest.fail("the block must not run")
    missing = DirectionBasis({"down_blocks.9.ff.net.2": torch.zeros(4, 0)}, {"down_blocks.9.ff.net.2": (2, 4)})
    with pytest.raises(EditMismatchError, match="'down_blocks.9.ff.net.2'"):
        missing.bake(pipe)
    assert_same(pipe.unet, before)


# -- export ------------------------------------------------------------------------------------------------------------
def test_export_loads_with_plain_from_pretrained(tiny_pipe, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = copy.deepcopy(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    _, _, mem, base = planted(pipe.unet)
    basis = locate_directions(mem, base, LocateConfig(method="directions", rank=2))
    basis_file = basis.save(tmp_path / "dirs")
    before = snapshot(pipe.unet)
    out = export_edited(pipe, basis, tmp_path / "projected", source="tiny/source", edit_path=basis_file,
                        settings={"rank": 2})
    assert out == tmp_path / "projected"
    assert_same(pipe.unet, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirs.json", "dirs.safetensors", "projected"]

    loaded = StableDiffusionPipeline.from_pretrained(str(out))
    loaded.set_progress_bar_config(disable=True)
    with apply_edit(pipe, basis):
        expected = generate(pipe)
        edited = snapshot(pipe.unet)
    assert_same(loaded.unet, edited)
    assert np.allclose(generate(loaded), expected, atol=1e-6)

    text = (out / MANIFEST_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    manifest = json.loads(text)
    assert manifest["edit"]["kind"] == "directions" and manifest["source"] == "tiny/source"
    assert manifest["component"] == "pipeline" and manifest["edit"]["ranks"] == basis.ranks()
    assert manifest["edit_file_sha256"] == hashlib.sha256(basis_file.read_bytes()).hexdigest() == basis.sha256()
    assert manifest["edit"]["sha256"] == basis.sha256()
    assert manifest["edit"]["num_params_changed"] == basis.num_params_changed() == 4 * 64 * 256
    assert manifest["diffmem_version"] == diffmem.__version__ and manifest["settings"] == {"rank": 2}

    (out / "keep.txt").write_text("mine")  # an earlier export, with a file of the user's added
    with pytest.raises(ExportError, match="already exists"):
        export_edited(pipe, basis, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_edited(pipe, basis, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert json.loads((out / MANIFEST_NAME).read_text())["edit_meta"]["config"] == basis.meta["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirs.json", "dirs.safetensors", "projected"]


def test_failed_export_keeps_the_old_folder(tiny_pipe, tmp_path, monkeypatch) -> None:
    pipe = copy.deepcopy(tiny_pipe)
    _, _, mem, base = planted(pipe.unet)
    basis = locate_directions(mem, base, LocateConfig(method="directions", rank=1))
    before = snapshot(pipe.unet)

    def broken_save(save_directory, **kwargs):
        raise RuntimeError("disk on fire")

    old = export_edited(pipe, None, tmp_path / "old")  # an earlier export, which --overwrite may replace
    (old / "keep.txt").write_text("mine")
    names = sorted(p.name for p in old.iterdir())
    monkeypatch.setattr(pipe, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_edited(pipe, basis, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and sorted(p.name for p in old.iterdir()) == names
    assert (old / "keep.txt").read_text() == "mine"
    assert_same(pipe.unet, before)
    with pytest.raises(ExportError, match="Linear"):
        export_edited(torch.nn.Linear(2, 2), basis, tmp_path / "linear")


# -- transformers ------------------------------------------------------------------------------------------------------
def pixart_inputs(rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(rows, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(rows, 5, 32, generator=g),
                timestep=torch.full((rows,), 10), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3_inputs(rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(rows, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(rows, 5, 32, generator=g),
                pooled_projections=torch.randn(rows, 24, generator=g), timestep=torch.full((rows,), 10))


def recorded(model: torch.nn.Module, make_inputs, seed: int, prompts: int = 4) -> ActivationStats:
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=1, guidance_scale=1.0), record_steps=1,
                          signatures=True)
    recorder = ActivationRecorder(model, config, num_prompts=prompts, stop_generation=False)
    with torch.no_grad(), recorder:
        recorder.start_batch(prompts, prompt_index=list(range(prompts)))
        model(**make_inputs(prompts, seed))
    return recorder.stats


@pytest.mark.parametrize("fixture,make_inputs", [("tiny_pixart", pixart_inputs), ("tiny_sd3", sd3_inputs)])
def test_transformer_denoisers(fixture, make_inputs, request, tmp_path) -> None:
    model = request.getfixturevalue(fixture)
    mem, base = recorded(model, make_inputs, seed=0), recorded(model, make_inputs, seed=1)
    basis = locate(model, mem, base, LocateConfig(method="directions", rank=2))
    assert isinstance(basis, DirectionBasis) and set(basis.ranks().values()) == {2}

    shapes, u, smem, sbase = planted(model)  # synthetic signatures on the same layers
    synthetic = locate_directions(smem, sbase, LocateConfig(method="directions", rank=1))
    assert all(abs(torch.dot(synthetic.layers[n][:, 0], u[n]).item()) >= 0.99 for n in shapes)

    before = snapshot(model)
    inputs = make_inputs(2, 5)
    with torch.no_grad():
        with basis.apply(model):
            expected = model(**inputs).sample
            edited = snapshot(model)
        plain = model(**inputs).sample
    assert_same(model, before)
    assert not torch.allclose(expected, plain)

    out = export_edited(model, basis, tmp_path / "denoiser")
    loaded = type(model).from_pretrained(str(out)).eval()
    assert_same(loaded, edited)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, expected)
    assert json.loads((out / MANIFEST_NAME).read_text())["component"] == type(model).__name__


# -- mask vs projection ------------------------------------------------------------------------------------------------
def test_mask_and_projection_evaluated_on_one_pipeline(tiny_pipe, prompts, tmp_path) -> None:
    """Both edits, located from the same statistics, go through the same before/after evaluation."""
    from diffmem.evaluation import EvalConfig, evaluate_edit
    from diffmem.score import get_scorer

    pipe = copy.deepcopy(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    refs = []
    for i in range(4):
        path = tmp_path / f"ref{i}.png"
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(path)
        refs.append(path)
    entries = [
        ManifestEntry(prompts[0], True, 8, "locate", refs[0]),
        ManifestEntry(prompts[1], True, 8, "locate", refs[1]),
        ManifestEntry(prompts[2], True, 8, "heldout", refs[2]),
        ManifestEntry(prompts[3], False, 0, "nonmem", refs[3]),
    ]
    rcfg = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, height=16, width=16), record_steps=2,
                        signatures=True)
    stats_mem = record(pipe, prompts[:2], rcfg, progress=False)
    stats_base = record(pipe, ["", prompts[4], prompts[5]], rcfg, progress=False)
    mask = locate(pipe, stats_mem, stats_base, LocateConfig(ratio=0.05, record_steps=2))
    basis = locate(pipe, stats_mem, stats_base, LocateConfig(method="directions", rank=1))
    assert isinstance(mask, Mask) and isinstance(basis, DirectionBasis)
    assert set(basis.layers) == set(mask.layers) and basis.ranks() == dict.fromkeys(mask.layers, 1)
    ecfg = EvalConfig(sampler=SamplerConfig(num_inference_steps=2, height=16, width=16), num_seeds=2)
    scorer = get_scorer("ssim")
    weights_before = snapshot(pipe.unet)

    results = {}
    for name, edit in (("mask", mask), ("projection", basis)):
        results[name] = evaluate_edit(pipe, entries, ecfg, scorer, edit, progress=False)
        assert_same(pipe.unet, weights_before)
    (before_m, after_m), (before_p, after_p) = results["mask"], results["projection"]
    np.testing.assert_array_equal(before_m.images, before_p.images)  # the same unedited baseline
    assert before_m.rows == before_p.rows
    for after in (after_m, after_p):
        assert [r["prompt"] for r in after.rows] == [e.prompt for e in entries]
        assert all({"drift_similarity", "pixel_drift", "replication_rate"} <= set(r) for r in after.rows)
        assert set(after.summary()) >= {"locate", "heldout", "nonmem", "by_duplicates"}
    assert not np.array_equal(after_m.images, after_p.images)
    assert 0 < mask.num_params_changed() < basis.num_params_changed() == mask.num_total()
    assert 0.0 <= subspace_overlap(basis, basis)["overall"] <= 1.0 + 1e-9
    json.dumps([after_m.summary(), after_p.summary()])  # the summaries are plain JSON
