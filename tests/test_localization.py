"""Tests of localization (Chavhan's weight rule, neuron level, the locator registry), mask storage and mask overlap."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffmem.config import LocateConfig
from diffmem.edits import Mask, chance_iou, mask_iou
from diffmem.errors import DiffmemError, EditMismatchError
from diffmem.files import pair_paths
from diffmem.localization import (
    list_locators,
    locate,
    register_locator,
    select_neurons,
    select_wanda,
    stats_act_norm,
    wanda_scores,
)
from diffmem.stats import ActivationStats, LayerStats

LAYER = "blocks.0.ff.net.2"


def make_stats(
    norms: dict[str, torch.Tensor],
    out_features: dict[str, int],
    *,
    uncond: dict[str, torch.Tensor] | None = None,
    meta: dict | None = None,
) -> ActivationStats:
    """Statistics whose ``act_norm`` is exactly ``norms`` (one token row per step, ``normsq = norm**2``)."""

    def half(per_layer: dict[str, torch.Tensor]) -> dict[str, LayerStats]:
        out = {}
        for name, n in per_layer.items():
            steps, features = n.shape
            out[name] = LayerStats(
                count=torch.ones(steps, dtype=torch.int64),
                sum=torch.zeros(steps, features),
                sumsq=torch.zeros(steps, features),
                normsq=n.float() ** 2,
            )
        return out

    layers = {name: (out_features[name], n.shape[1]) for name, n in norms.items()}
    steps = next(iter(norms.values())).shape[0]
    halves = {"cond": half(norms)}
    if uncond is not None:
        halves["uncond"] = half(uncond)
    return ActivationStats(layers, steps, halves=halves, meta=meta)


def reference_wanda(weight: torch.Tensor, a_mem: torch.Tensor, a_base: torch.Tensor, ratio: float, tau: int,
                    min_fraction: float, *, floor: bool = False, strict: bool = False) -> torch.Tensor:
    """Loop-by-loop implementation of Chavhan's rule, for comparison with the vectorised one.

    ``floor``: ``k = int(ratio * in)`` as the original code (else ``ceil``); ``strict``: a weight needs more than
    ``min_fraction * tau`` steps, as the original code (else at least ``max(1, ceil(min_fraction * tau))``).
    """
    out_f, in_f = weight.shape
    k = int(ratio * in_f) if floor else math.ceil(ratio * in_f)
    hits = torch.zeros(out_f, in_f, dtype=torch.int64)
    for t in range(tau):
        for i in range(out_f):
            s_mem = [abs(float(weight[i, j])) * float(a_mem[t, j]) for j in range(in_f)]
            s_base = [abs(float(weight[i, j])) * float(a_base[t, j]) for j in range(in_f)]
            for j in sorted(range(in_f), key=lambda j: -s_mem[j])[:k]:
                if s_mem[j] > s_base[j]:
                    hits[i, j] += 1
    if strict:
        return hits > min_fraction * tau
    return hits >= max(1, math.ceil(min_fraction * tau))


# Hand-made case: one layer, W is 2 x 4, two steps.
W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
A_MEM = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 1.0, 1.0, 1.0]])
A_BASE = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])


def hand_stats() -> tuple[ActivationStats, ActivationStats]:
    return make_stats({LAYER: A_MEM}, {LAYER: 2}), make_stats({LAYER: A_BASE}, {LAYER: 2})


def as_rows(mask: Mask) -> list[list[int]]:
    return mask.layers[LAYER].int().tolist()


def test_wanda_scores_is_abs_weight_times_norm() -> None:
    w = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    assert torch.equal(wanda_scores(w, torch.tensor([2.0, 0.5])), torch.tensor([[2.0, 1.0], [6.0, 2.0]]))


def test_wanda_hand_case_union_over_steps() -> None:
    # Step 0, k = 2: row 0 top {2, 3}, but S_base[0, 3] = 8 > 4 drops column 3; row 1 top {0, 1}, both kept.
    # Step 1: row 0 scores [5, 2, 3, 4] -> {0, 3}; row 1 [20, 3, 2, 1] -> {0, 1}; the base is zero.
    mem, base = hand_stats()
    mask = select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.5, record_steps=2))
    assert mask.level == "weight"
    assert as_rows(mask) == [[1, 0, 1, 1], [1, 1, 0, 0]]
    only_first = select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.5, record_steps=1))
    assert as_rows(only_first) == [[0, 0, 1, 0], [1, 1, 0, 0]]


def test_wanda_min_step_fraction() -> None:
    mem, base = hand_stats()
    # Two steps: f = 1.0 needs both steps; f = 0.5 needs ceil(1) = 1 step, i.e. the plain union.
    both = select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.5, record_steps=2, min_step_fraction=1.0))
    assert as_rows(both) == [[0, 0, 0, 0], [1, 1, 0, 0]]
    half = select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.5, record_steps=2, min_step_fraction=0.5))
    assert as_rows(half) == [[1, 0, 1, 1], [1, 1, 0, 0]]
    # 0.51 * 2 -> ceil(1.02) = 2 steps.
    strict = select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.5, record_steps=2, min_step_fraction=0.51))
    assert as_rows(strict) == [[0, 0, 0, 0], [1, 1, 0, 0]]


def test_wanda_ratio_is_ceil_of_ratio_times_in_features() -> None:
    mem, base = hand_stats()
    cfg = dict(record_steps=1)
    # ratio 0.25 -> k = 1: row 0 picks column 3, dropped by the base (4 < 8); row 1 picks column 0.
    assert as_rows(select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.25, **cfg))) == [[0, 0, 0, 0], [1, 0, 0, 0]]
    # ratio 0.3 -> k = ceil(1.2) = 2, same as 0.5.
    assert as_rows(select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.3, **cfg))) == [[0, 0, 1, 0], [1, 1, 0, 0]]
    # ratio 1 -> every weight whose memorized score beats the base score.
    assert as_rows(select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=1.0, **cfg))) == [[1, 1, 1, 0], [1, 1, 1, 0]]


def test_ratio_and_step_fraction_ignore_float_noise() -> None:
    # 0.07 * 100 == 7.000000000000001 and 0.3 * 10 == 3.0000000000000004 in floating point.
    w = torch.arange(1.0, 101.0).unsqueeze(0)
    mem = make_stats({LAYER: torch.ones(10, 100)}, {LAYER: 1})
    base = make_stats({LAYER: torch.zeros(10, 100)}, {LAYER: 1})
    assert select_wanda(mem, base, {LAYER: w}, LocateConfig(ratio=0.07, record_steps=1)).num_masked() == 7
    neurons = select_neurons(mem, base, {LAYER: w}, LocateConfig(method="neuron", ratio=0.07, record_steps=1))
    assert neurons.num_masked() == 7
    # The same 7 weights win in steps 0-2 only (zero activations select nothing), so 3 of 10 steps suffice.
    three = make_stats({LAYER: torch.cat([torch.ones(3, 100), torch.zeros(7, 100)])}, {LAYER: 1})
    frac = select_wanda(three, base, {LAYER: w}, LocateConfig(ratio=0.07, record_steps=10, min_step_fraction=0.3))
    assert frac.num_masked() == 7
    stricter = select_wanda(three, base, {LAYER: w}, LocateConfig(ratio=0.07, record_steps=10, min_step_fraction=0.31))
    assert stricter.num_masked() == 0


def test_wanda_keeps_only_weights_beating_the_base() -> None:
    mem, _ = hand_stats()
    same = make_stats({LAYER: A_MEM.clone()}, {LAYER: 2})
    assert select_wanda(mem, same, {LAYER: W}, LocateConfig(ratio=1.0, record_steps=2)).num_masked() == 0
    louder = make_stats({LAYER: A_MEM * 2}, {LAYER: 2})
    assert select_wanda(mem, louder, {LAYER: W}, LocateConfig(ratio=1.0, record_steps=2)).num_masked() == 0
    zero_base = make_stats({LAYER: torch.zeros_like(A_MEM)}, {LAYER: 2})
    assert select_wanda(mem, zero_base, {LAYER: W}, LocateConfig(ratio=1.0, record_steps=2)).num_masked() == 8


def test_wanda_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    weights = {"a.net.2": torch.randn(6, 20, generator=g), "b.net.2": torch.randn(5, 12, generator=g)}
    a_mem = {n: torch.rand(4, w.shape[1], generator=g) for n, w in weights.items()}
    a_base = {n: torch.rand(4, w.shape[1], generator=g) for n, w in weights.items()}
    outs = {n: w.shape[0] for n, w in weights.items()}
    mem, base = make_stats(a_mem, outs), make_stats(a_base, outs)
    for ratio, tau, frac in ((0.1, 3, 0.0), (0.3, 4, 0.5), (0.5, 2, 1.0)):
        mask = select_wanda(mem, base, weights, LocateConfig(ratio=ratio, record_steps=tau, min_step_fraction=frac))
        assert list(mask.layers) == list(weights)
        for name, w in weights.items():
            expected = reference_wanda(w, a_mem[name], a_base[name], ratio, tau, frac)
            assert torch.equal(mask.layers[name], expected), (name, ratio, tau, frac)


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "outliers", "constant_rows"])
def test_fast_row_topk_is_exact(dist: str) -> None:
    from diffmem.localization import _RowTopK

    g = torch.Generator().manual_seed(3)
    absw = torch.randn(40, 512, generator=g).abs()
    if dist == "constant_rows":  # ties everywhere: the bound fails and these rows are ranked in full
        absw[::3] = 1.0
    a = {
        "uniform": torch.rand(3, 512, generator=g),
        "lognormal": (2 * torch.randn(3, 512, generator=g)).exp(),
        "outliers": torch.rand(3, 512, generator=g).index_fill_(1, torch.arange(0, 512, 97), 100.0),
        "constant_rows": torch.cat([torch.ones(1, 512), torch.rand(2, 512, generator=g)]),
    }[dist]
    for k in (1, 6, 16):
        helper = _RowTopK(absw, k)
        assert helper.fast
        values, cols = helper(a)
        assert values.shape == cols.shape == (3, 40, k)
        for t in range(3):
            ref_values, ref_cols = torch.topk(absw * a[t], k, dim=1)
            assert torch.equal(values[t].sort(dim=1).values, ref_values.sort(dim=1).values)
            assert torch.equal(absw.gather(1, cols[t]) * a[t][cols[t]], values[t])
            if dist != "constant_rows":
                assert torch.equal(cols[t].sort(dim=1).values, ref_cols.sort(dim=1).values)


def test_half_both_pools_counts_before_the_square_root() -> None:
    cond = LayerStats(torch.tensor([1]), torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 4.0]]))
    uncond = LayerStats(torch.tensor([3]), torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[15.0, 0.0]]))
    stats = ActivationStats({LAYER: (1, 2)}, 1, halves={"cond": {LAYER: cond}, "uncond": {LAYER: uncond}})
    assert torch.allclose(stats_act_norm(stats, LAYER, "both"), torch.tensor([[2.0, 1.0]]))
    assert torch.allclose(stats_act_norm(stats, LAYER, "cond"), torch.tensor([[1.0, 2.0]]))
    no_cfg = ActivationStats({LAYER: (1, 2)}, 1, halves={"cond": {LAYER: cond}})
    with pytest.raises(DiffmemError, match="uncond"):
        stats_act_norm(no_cfg, LAYER, "both")


def test_too_few_recorded_steps_is_an_error() -> None:
    mem, base = hand_stats()
    with pytest.raises(DiffmemError, match="record_steps=5"):
        select_wanda(mem, base, {LAYER: W}, LocateConfig(record_steps=5))


def test_neuron_mask_is_whole_columns() -> None:
    w = torch.tensor([[1.0, 1.0, 3.0, 1.0], [1.0, 1.0, 4.0, 1.0]])  # column norms sqrt(2), sqrt(2), 5, sqrt(2)
    a_mem = torch.tensor([[2.0, 1.0, 1.2, 0.5], [2.0, 1.0, 1.2, 0.5]])
    a_base = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # contrast = (a_mem - a_base) * col_norm = [1.41, 0, 1.0, -0.71]
    mem, base = make_stats({LAYER: a_mem}, {LAYER: 2}), make_stats({LAYER: a_base}, {LAYER: 2})
    mask = select_neurons(mem, base, {LAYER: w}, LocateConfig(method="neuron", ratio=0.5, record_steps=2))
    assert mask.level == "neuron"
    assert as_rows(mask) == [[1, 0, 1, 0], [1, 0, 1, 0]]
    assert mask.columns()[LAYER].tolist() == [0, 2]
    # Only positive contrasts are kept, even when the ratio allows more.
    wide = select_neurons(mem, base, {LAYER: w}, LocateConfig(method="neuron", ratio=1.0, record_steps=2))
    assert wide.columns()[LAYER].tolist() == [0, 2]
    with pytest.raises(ValueError, match="partial columns"):
        Mask({LAYER: torch.tensor([[True, False], [False, False]])}, level="neuron")


def toy_denoiser() -> nn.Module:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.blocks:
        block.ff = FeedForward(8, mult=2)
    return model


def test_locate_on_a_model_records_provenance() -> None:
    model = toy_denoiser()
    names = ["blocks.0.ff.net.2", "blocks.1.ff.net.2"]
    g = torch.Generator().manual_seed(1)
    mem = make_stats({n: torch.rand(3, 16, generator=g) + 1 for n in names}, dict.fromkeys(names, 8),
                     meta={"model_id": "toy/model", "prompts_sha256": "aaa", "num_prompts": 2})
    base = make_stats({n: torch.rand(3, 16, generator=g) for n in names}, dict.fromkeys(names, 8),
                      meta={"prompts_sha256": "bbb", "num_prompts": 5})
    config = LocateConfig(ratio=0.25, record_steps=3)
    mask = locate(model, mem, base, config)
    assert list(mask.layers) == names
    assert mask.shapes() == dict.fromkeys(names, (8, 16))
    assert 0 < mask.num_masked() <= 2 * 8 * 4 * 3  # layers x rows x k x steps
    assert mask.meta["method"] == "wanda"
    assert mask.meta["config"] == config.to_dict()
    assert mask.meta["model_id"] == "toy/model"
    assert mask.meta["stats_mem"]["prompts_sha256"] == "aaa"
    assert mask.meta["stats_base"]["prompts_sha256"] == "bbb"
    neurons = locate(model, mem, base, LocateConfig(method="neuron", ratio=0.25, record_steps=3))
    assert neurons.level == "neuron" and neurons.meta["method"] == "neuron"

    wrong = make_stats({"blocks.7.ff.net.2": torch.rand(3, 16)}, {"blocks.7.ff.net.2": 8})
    with pytest.raises(EditMismatchError, match="blocks.7.ff.net.2"):
        locate(model, wrong, wrong, config)


def test_locate_dispatches_through_the_locator_registry(monkeypatch) -> None:
    import diffmem.localization as localization

    mem, base = hand_stats()
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].ff = nn.Module()
    model.blocks[0].ff.net = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Linear(4, 2)])
    calls = []
    monkeypatch.setitem(localization._LOCATORS, "directions", lambda *args: calls.append(args) or "basis")
    assert locate(model, mem, base, LocateConfig(method="directions")) == "basis"
    assert calls and calls[0][2][LAYER] is model.blocks[0].ff.net[2].weight

    monkeypatch.delitem(localization._LOCATORS, "directions")  # as if no locator were registered for it
    with pytest.raises(DiffmemError, match="locate method 'directions' is not available; choose one of neuron, wanda"):
        locate(model, mem, base, LocateConfig(method="directions"))


def test_register_locator(monkeypatch) -> None:
    import diffmem.localization as localization

    monkeypatch.setattr(localization, "_LOCATORS", dict(localization._LOCATORS))
    assert list_locators() == ["directions", "neuron", "wanda"]

    def mine(stats_mem, stats_base, weights, config):
        return Mask({n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()})

    register_locator("mine", mine)
    register_locator("mine", mine)  # the same function again is fine
    assert list_locators() == ["directions", "mine", "neuron", "wanda"]
    with pytest.raises(ValueError, match="'wanda' is already registered"):
        register_locator("wanda", mine)
    monkeypatch.setitem(localization._LOCATORS, "wanda", mine)  # a registered function is what locate calls
    mem, base = hand_stats()
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].ff = nn.Module()
    model.blocks[0].ff.net = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Linear(4, 2)])
    assert locate(model, mem, base, LocateConfig(record_steps=2)).num_masked() == 8


# -- the original code's rounding (the chavhan2024 preset) -----------------------------------------------------------


def test_floor_rounding_and_strict_step_count_match_the_loop_reference() -> None:
    g = torch.Generator().manual_seed(5)
    weights = {"a.net.2": torch.randn(6, 20, generator=g), "b.net.2": torch.randn(5, 12, generator=g)}
    a_mem = {n: torch.rand(4, w.shape[1], generator=g) for n, w in weights.items()}
    a_base = {n: torch.rand(4, w.shape[1], generator=g) for n, w in weights.items()}
    outs = {n: w.shape[0] for n, w in weights.items()}
    mem, base = make_stats(a_mem, outs), make_stats(a_base, outs)
    for ratio, tau, frac in ((0.1, 3, 0.0), (0.3, 4, 0.5), (0.5, 2, 1.0), (0.25, 4, 0.25)):
        for floor in (False, True):
            for strict in (False, True):
                config = LocateConfig(ratio=ratio, record_steps=tau, min_step_fraction=frac,
                                      k_rounding="floor" if floor else "ceil", strict_step_count=strict)
                mask = select_wanda(mem, base, weights, config)
                for name, w in weights.items():
                    expected = reference_wanda(w, a_mem[name], a_base[name], ratio, tau, frac, floor=floor,
                                               strict=strict)
                    assert torch.equal(mask.layers[name], expected), (name, ratio, tau, frac, floor, strict)


def test_floor_rounding_empties_a_layer_at_a_tiny_ratio(caplog) -> None:
    mem, base = hand_stats()
    # int(0.2 * 4) = 0 selects nothing (with a warning), where ceil gives 1 weight per row
    with caplog.at_level(logging.WARNING, logger="diffmem"):
        empty = select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.2, record_steps=1, k_rounding="floor"))
    assert empty.num_masked() == 0 and "its mask is empty" in caplog.text
    assert select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.2, record_steps=1)).num_masked() == 1
    # f * tau = 1 of 2 steps: at least 1 step (the union), but strictly more than 1 step (both)
    assert as_rows(select_wanda(mem, base, {LAYER: W}, LocateConfig(ratio=0.5, record_steps=2, min_step_fraction=0.5,
                                                                     strict_step_count=True))) == [[0, 0, 0, 0],
                                                                                                   [1, 1, 0, 0]]


def test_chavhan2024_preset() -> None:
    config = LocateConfig.from_preset("chavhan2024", ratio=0.02)
    assert (config.method, config.half, config.k_rounding, config.strict_step_count) == ("wanda", "both", "floor", True)
    assert config.ratio == 0.02 and config.preset == "chavhan2024"
    assert config.to_dict()["preset"] == "chavhan2024"
    with pytest.raises(ValueError, match="preset='nope' is invalid"):
        LocateConfig.from_preset("nope")
    with pytest.raises(ValueError, match="k_rounding"):
        LocateConfig(k_rounding="round")
    # the preset's pooled halves: the same statistics with only a cond half cannot be used
    mem, base = hand_stats()
    with pytest.raises(DiffmemError, match="uncond"):
        select_wanda(mem, base, {LAYER: W}, LocateConfig.from_preset("chavhan2024", ratio=0.5, record_steps=2))


def two_layer_mask(a: list[int], b: list[int], level: str = "weight") -> Mask:
    return Mask.from_indices({"x": torch.tensor(a), "y": torch.tensor(b)}, {"x": (2, 3), "y": (4, 2)}, level=level)


def test_mask_save_load_round_trip_stores_indices(tmp_path) -> None:
    mask = two_layer_mask([0, 4, 5], [])
    mask.meta = {"method": "wanda", "config": {"ratio": 0.5}}
    path = mask.save(tmp_path / "m")
    st_path, json_path = pair_paths(tmp_path / "m")
    assert path == st_path and st_path.is_file() and json_path.is_file()
    tensors = load_file(str(st_path))
    assert tensors["x"].dtype == torch.int64 and tensors["x"].tolist() == [0, 4, 5]
    assert tensors["y"].numel() == 0
    text = json_path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]

    loaded = Mask.load(tmp_path / "m.safetensors")
    assert list(loaded.layers) == ["x", "y"]
    assert loaded.level == "weight" and loaded.meta == mask.meta
    for name in mask.layers:
        assert torch.equal(loaded.layers[name], mask.layers[name])
    assert loaded.counts() == {"x": 3, "y": 0} and loaded.num_total() == 14
    assert loaded.sha256() == mask.sha256()

    neuron = Mask.from_columns({"x": [1]}, {"x": (2, 3)})
    neuron.save(tmp_path / "n.safetensors")
    assert Mask.load(tmp_path / "n").level == "neuron"
    with pytest.raises(DiffmemError, match="does not exist"):
        Mask.load(tmp_path / "missing")


def test_mask_from_indices_rejects_out_of_range() -> None:
    with pytest.raises(EditMismatchError, match="'x'"):
        Mask.from_indices({"x": torch.tensor([6])}, {"x": (2, 3)})


def test_mask_iou() -> None:
    a = two_layer_mask([0, 1, 2], [0])
    assert mask_iou(a, a) == {"per_layer": {"x": 1.0, "y": 1.0}, "overall": 1.0}
    disjoint = mask_iou(a, two_layer_mask([3, 4], [1, 2]))
    assert disjoint == {"per_layer": {"x": 0.0, "y": 0.0}, "overall": 0.0}
    # x: {0,1,2} vs {1,2,3} -> 2 / 4; y: {0} vs {} -> 0 / 1; overall (2 + 0) / (4 + 1).
    partial = mask_iou(a, two_layer_mask([1, 2, 3], []))
    assert partial["per_layer"] == {"x": 0.5, "y": 0.0}
    assert partial["overall"] == pytest.approx(0.4)


def test_mask_iou_and_check_compatible_mismatch() -> None:
    a = two_layer_mask([0], [0])
    other_shape = Mask.from_indices({"x": torch.tensor([0]), "y": torch.tensor([0])}, {"x": (3, 2), "y": (4, 2)})
    with pytest.raises(EditMismatchError, match=r"'x' has shape \(2, 3\)"):
        mask_iou(a, other_shape)
    missing = Mask.from_indices({"x": torch.tensor([0])}, {"x": (2, 3)})
    with pytest.raises(EditMismatchError, match="'y'"):
        a.check_compatible(missing)
    with pytest.raises(EditMismatchError, match="'y'"):
        missing.check_compatible(a)
    a.check_compatible(two_layer_mask([1], []))


def test_union_and_chance_iou() -> None:
    a = two_layer_mask([0, 1, 2], [0])
    b = two_layer_mask([2, 3], [])
    union = a.union(b)
    assert union.indices()["x"].tolist() == [0, 1, 2, 3] and union.indices()["y"].tolist() == [0]
    assert union.level == "weight"
    # random masks of these sizes: x meets in 3 * 2 / 6 = 1 weight of 3 + 2 - 1; y in 0 of 1 + 0 - 0.
    assert chance_iou(a, b) == pytest.approx(1 / 5)
    neurons = Mask.from_columns({"x": [0]}, {"x": (2, 3), "y": (4, 2)}).union(
        Mask.from_columns({"y": [1]}, {"x": (2, 3), "y": (4, 2)}))
    assert neurons.level == "neuron" and {k: v.tolist() for k, v in neurons.columns().items()} == {"x": [0], "y": [1]}
    # a layer of one mask only is kept as it is (robust pruning adds layers beyond the FFNs)
    extra = a.union(Mask.from_indices({"z": torch.tensor([1, 5])}, {"z": (2, 1, 3)}))
    assert list(extra.shapes()) == ["x", "y", "z"] and extra.indices()["z"].tolist() == [1, 5]
    assert extra.num_masked() == a.num_masked() + 2
    with pytest.raises(EditMismatchError, match="'x'"):
        a.union(Mask.from_indices({"x": torch.tensor([0])}, {"x": (3, 2)}))
