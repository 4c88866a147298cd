"""Streaming statistics: the moments, save/load, and merging shards."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffmem.config import RecordConfig, SamplerConfig
from diffmem.errors import DiffmemError
from diffmem.recording import record
from diffmem.files import pair_paths
from diffmem.stats import (
    ActivationStats,
    LayerStats,
    check_same_layers,
    prompts_sha256,
    provenance,
    row_moments,
    stats_paths,
)


def small_config(**overrides) -> RecordConfig:
    sampler = SamplerConfig(num_inference_steps=3, guidance_scale=7.5, height=16, width=16)
    return RecordConfig(**{"sampler": sampler, "record_steps": 2, "batch_size": 4, "signatures": True, **overrides})


def assert_same_tensors(a: ActivationStats, b: ActivationStats, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        if exact or sa[key].dtype == torch.int64:
            assert torch.equal(sa[key], sb[key]), key
        else:
            scale = float(sb[key].abs().max())
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6 * scale)


@pytest.fixture
def two_layer_stats() -> ActivationStats:
    torch.manual_seed(0)
    stats = ActivationStats({"a.ff.net.2": (3, 5), "b.ff.net.2": (2, 4)}, steps=2, meta={"num_prompts": 1})
    for half in ("uncond", "cond"):
        for name, (_, n_in) in stats.layers.items():
            for step in range(2):
                rows = torch.randn(7, n_in)
                stats.ensure_half(half)[name].add_at_(step, rows.shape[0], row_moments(rows))
    return stats


def test_moments_match_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * 3 + 1
    stats = ActivationStats({"l": (2, 6)}, steps=1)
    stats.ensure_half("cond")["l"].add_at_(0, 30, row_moments(x[:30]))
    stats.ensure_half("cond")["l"].add_at_(0, 20, row_moments(x[30:].double()))
    torch.testing.assert_close(stats.mean("l")[0], x.mean(0))
    torch.testing.assert_close(stats.var("l")[0], x.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    normalised = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(stats.act_norm("l")[0], normalised.pow(2).mean(0).sqrt())
    assert stats.layer_stats("l").sum.dtype == torch.float32


def test_zero_rows_contribute_nothing():
    moments = row_moments(torch.zeros(3, 4))
    assert torch.equal(moments, torch.zeros(3, 4))


def test_unknown_half_and_layer(two_layer_stats):
    only_cond = ActivationStats({"x": (1, 2)}, steps=1)
    only_cond.ensure_half("cond")
    with pytest.raises(DiffmemError, match="no 'uncond' half"):
        only_cond.act_norm("x", "uncond")
    with pytest.raises(DiffmemError, match="no layer 'nope'"):
        two_layer_stats.mean("nope")
    with pytest.raises(ValueError, match="half="):
        two_layer_stats.ensure_half("both")


def test_save_load_round_trip(tmp_path, tiny_pipe, prompts):
    stats = record(tiny_pipe, prompts[:3], small_config(), progress=False)
    written = stats.save(tmp_path / "run" / "mem")
    assert written == tmp_path / "run" / "mem.safetensors"
    sidecar = tmp_path / "run" / "mem.json"
    assert sidecar.is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["mem.json", "mem.safetensors"]  # no temp files
    header = json.loads(sidecar.read_text())
    assert header["steps"] == 2 and header["halves"] == ["uncond", "cond"]
    assert [name for name, _ in header["layers"]] == list(stats.layers)
    assert header["meta"]["prompts_sha256"] == prompts_sha256(prompts[:3])
    assert sidecar.read_text() == json.dumps(header, sort_keys=True, indent=2) + "\n"

    for path in (tmp_path / "run" / "mem", written, sidecar):
        loaded = ActivationStats.load(path)
        assert loaded.layers == stats.layers and list(loaded.layers) == list(stats.layers)
        assert loaded.steps == stats.steps and list(loaded.halves) == list(stats.halves)
        assert loaded.meta == json.loads(json.dumps(stats.meta))
        assert_same_tensors(loaded, stats)
        assert set(loaded.signatures) == set(stats.layers)


def test_save_overwrites_atomically(tmp_path, two_layer_stats):
    two_layer_stats.save(tmp_path / "s.safetensors")
    two_layer_stats.ensure_half("cond")["a.ff.net.2"].count += 1
    two_layer_stats.save(tmp_path / "s.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    assert_same_tensors(ActivationStats.load(tmp_path / "s"), two_layer_stats)


def test_stats_paths():
    assert stats_paths("out/x") == stats_paths("out/x.safetensors") == stats_paths("out/x.json")
    tensor_path, json_path = stats_paths("out/x.v1")
    assert tensor_path.name == "x.v1.safetensors" and json_path.name == "x.v1.json"
    assert stats_paths("out/x.v1") == pair_paths("out/x.v1")  # the same pairing as every edit file


def test_check_same_layers_names_the_first_difference():
    a = ActivationStats({"x": (2, 4), "y": (2, 3)}, steps=1)
    check_same_layers(a, ActivationStats({"x": (2, 4), "y": (2, 3)}, steps=3))  # steps may differ
    with pytest.raises(DiffmemError, match=r"^layer 'y' has shape \(2, 3\) in the memorized statistics but \(2, 5\)"):
        check_same_layers(a, ActivationStats({"x": (2, 4), "y": (2, 5)}, steps=1))
    with pytest.raises(DiffmemError, match="^layer 'y' of the memorized statistics is missing from the base"):
        check_same_layers(a, ActivationStats({"x": (2, 4)}, steps=1))
    with pytest.raises(DiffmemError, match="^layer 'z' of the base statistics is missing from the memorized"):
        check_same_layers(a, ActivationStats({"x": (2, 4), "y": (2, 3), "z": (1, 1)}, steps=1))


def test_provenance_of_a_located_edit():
    import diffmem
    from diffmem.config import LocateConfig

    mem = ActivationStats({"x": (2, 4)}, 1, meta={"model_id": "toy/model", "prompts_sha256": "aaa", "num_prompts": 2,
                                                   "denoiser": "UNet2DConditionModel"})
    base = ActivationStats({"x": (2, 4)}, 1, meta={"prompts_sha256": "bbb", "num_prompts": 5})
    config = LocateConfig(ratio=0.5)
    meta = provenance("wanda", config, mem, base)
    assert meta == {
        "method": "wanda",
        "config": config.to_dict(),
        "stats_mem": {"prompts_sha256": "aaa", "num_prompts": 2, "model_id": "toy/model"},
        "stats_base": {"prompts_sha256": "bbb", "num_prompts": 5},
        "diffmem_version": diffmem.__version__,
        "model_id": "toy/model",
    }
    assert "model_id" not in provenance("wanda", config, base, mem)


def test_load_errors(tmp_path, two_layer_stats):
    with pytest.raises(DiffmemError, match="not found"):
        ActivationStats.load(tmp_path / "missing")
    two_layer_stats.save(tmp_path / "s")
    (tmp_path / "s.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DiffmemError, match="not a diffmem activation statistics file"):
        ActivationStats.load(tmp_path / "s")


def test_merge_of_two_shards_equals_one_run(tiny_pipe, prompts):
    config = small_config()
    whole = record(tiny_pipe, prompts, config, progress=False)
    first = record(tiny_pipe, prompts[:4], config, progress=False)
    second = record(tiny_pipe, prompts[4:], config, progress=False)
    merged = first.merge_(second)
    assert merged is first
    assert_same_tensors(merged, whole, exact=False)
    assert merged.meta["num_prompts"] == len(prompts)
    assert [p["num_prompts"] for p in merged.meta["parts"]] == [4, 2]
    assert merged.meta["parts"][0]["prompts_sha256"] == prompts_sha256(prompts[:4])

    # resuming through record(stats=...) merges in place too
    resumed = record(tiny_pipe, prompts[:4], config, progress=False)
    out = record(tiny_pipe, prompts[4:], config, stats=resumed, progress=False)
    assert out is resumed
    assert_same_tensors(out, whole, exact=False)


def test_merge_refuses_mismatches(tiny_pipe, prompts):
    config = small_config(signatures=False, record_steps=1)
    base = record(tiny_pipe, prompts[:1], config, progress=False)
    before = base.state_dict()
    other_steps = record(tiny_pipe, prompts[:1], dataclasses.replace(config, record_steps=2), progress=False)
    with pytest.raises(DiffmemError, match="1 and 2 recorded steps"):
        base.merge_(other_steps)
    plain = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, guidance_scale=1.0))
    no_cfg = record(tiny_pipe, prompts[:1], plain, progress=False)
    with pytest.raises(DiffmemError, match="halves"):
        base.merge_(no_cfg)
    with_sig = record(tiny_pipe, prompts[:1], dataclasses.replace(config, signatures=True), progress=False)
    with pytest.raises(DiffmemError, match="signatures"):
        base.merge_(with_sig)
    other_layers = record(tiny_pipe, prompts[:1], dataclasses.replace(config, target="attn2.to_q"), progress=False)
    with pytest.raises(DiffmemError, match="different layers"):
        base.merge_(other_layers)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused merges change nothing


def test_layer_stats_zeros_and_add():
    a = LayerStats.zeros(2, 3)
    b = LayerStats.zeros(2, 3)
    b.add_at_(1, 4, torch.ones(3, 3))
    a.add_(b).add_(b)
    assert a.count.tolist() == [0, 8] and a.shape == (2, 3)
    assert torch.equal(a.sum[1], torch.full((3,), 2.0))
