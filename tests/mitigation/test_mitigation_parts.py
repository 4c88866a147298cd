"""The parts of :mod:`diffmem.mitigation` on the tiny pipeline: rows loaded once, the strength rule, the adversarial
fine-tuning, the locality evidence and a cross-fitted ``mitigate``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.config import SamplerConfig
from diffmem.data import ManifestEntry
from diffmem.edits import Mask, WeightDelta
from diffmem.errors import DiffmemError
from diffmem.mitigation import MitigateConfig, finetune_against, load_rows, locality_evidence, mitigate
from diffmem.mitigation.strength import _acceptable, _judged, decide
from diffmem.reextraction import ReextractConfig
from diffmem.sampling import generate_images
from diffmem.score import get_scorer
from diffmem.targets import get_denoiser

SAMPLER = SamplerConfig(num_inference_steps=3, guidance_scale=3.0, height=16, width=16)
PROMPTS = ["a red cat", "a blue dog on the sky", "a green bird", "a red dog", "a blue cat", "the sky"]


@pytest.fixture
def rows(tiny_pipe, tmp_path):
    """Six rows whose references are the tiny pipeline's own seed-0 generations: four ``locate``, two ``nonmem``."""
    images = generate_images(tiny_pipe, PROMPTS, num_seeds=1, seed=0, sampler=SAMPLER)
    out = []
    for i, p in enumerate(PROMPTS):
        path = tmp_path / f"ref{i}.png"
        Image.fromarray(images[i, 0]).save(path)
        split = "locate" if i < 4 else "nonmem"
        out.append(ManifestEntry(prompt=p, memorized=split == "locate", duplicates=8 if i < 4 else 1,
                                 reference=path, split=split))
    return out


def test_load_rows_loads_each_image_once_and_keeps_its_latents(tiny_pipe, rows):
    loaded = load_rows(rows, (16, 16))
    assert len(loaded) == 6 and loaded.prompts == PROMPTS
    assert all(p.shape == (16, 16, 3) and p.dtype == np.uint8 for p in loaded.pixels)
    lat = loaded.latents(tiny_pipe)
    assert lat.shape[0] == 6 and loaded.latents(tiny_pipe) is lat  # encoded once
    sub = loaded.subset([3, 1])
    assert sub.prompts == [PROMPTS[3], PROMPTS[1]] and torch.equal(sub.latents(tiny_pipe), lat[[3, 1]])
    assert [it.prompt for it in sub.items()] == sub.prompts and sub.items()[0].kind == "memorized"
    with pytest.raises(DiffmemError, match="a red cat"):
        load_rows([ManifestEntry(prompt="a red cat", memorized=True, duplicates=8, reference=None, split="locate")],
                  (16, 16))


def test_strength_is_judged_by_similarity_when_replication_has_no_signal():
    row = {"locate_replication": 0.0, "out_of_fold_replication": 0.0, "locate_similarity": 0.7,
           "out_of_fold_similarity": 0.6, "drift_within_spread": 1.0}
    assert _acceptable(row, target=0.05)  # by replication: already at the target
    assert _judged(row, by_similarity=True) == 0.6  # out of fold first
    assert not _acceptable(row, target=0.05, similarity_floor=0.4)  # still more like its image than ordinary rows
    assert _acceptable({**row, "out_of_fold_similarity": 0.35}, target=0.05, similarity_floor=0.4)
    assert not _acceptable({**row, "drift_within_spread": 0.25}, target=0.05)  # drift vetoes


def test_finetune_against_returns_a_delta_and_leaves_the_model_unchanged(fresh_tiny_pipe, rows):
    pipe = fresh_tiny_pipe
    denoiser = get_denoiser(pipe)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    memorized, nonmem = rows[:2], rows[4:]
    shape = pipe.encode_prompt("x", "cpu", 1, False)[0].shape[1:]
    adversarial = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    cfg = MitigateConfig(finetune_steps=2, finetune_batch=2, sampler=SAMPLER)
    delta = finetune_against(pipe, Mask({}), memorized, adversarial, nonmem, cfg, progress=False)
    assert isinstance(delta, WeightDelta) and delta.num_params_changed() > 0
    assert all(torch.equal(p, before[n]) for n, p in denoiser.named_parameters())  # restored bit for bit
    with pytest.raises(DiffmemError, match="nonmem"):
        finetune_against(pipe, Mask({}), memorized, adversarial, [], cfg, progress=False)


def test_locality_evidence_reports_trigger_distances_and_mask_overlap(tiny_pipe, rows):
    attack = ReextractConfig(opt_steps=2, checkpoints=(), sampler=SAMPLER)
    out = locality_evidence(tiny_pipe, rows[:2], ["", "the sky"], attack, get_scorer("ssim"), ratio=0.1,
                            record_steps=2, progress=False)
    assert out["rows"] == 2 and len(out["trigger_replication_rate"]) == 2
    assert out["trigger_distance_rms"] > 0 and out["natural_prompt_distance_rms"] > 0
    assert 0.0 <= out["trigger_mask_iou"] <= 1.0 and 0.0 <= out["trigger_mask_iou_chance"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in out["trigger_vs_prompt_mask_iou"])


def test_mitigate_cross_fits_and_reports_the_estimate_beside_in_sample(tiny_pipe, rows):
    cfg = MitigateConfig(strengths=(0.02, 0.5), folds=2, sweep_num_seeds=1, estimate_num_seeds=1, record_steps=2,
                         sampler=SAMPLER)
    res = mitigate(tiny_pipe, rows, cfg, get_scorer("ssim"), progress=False)
    assert res.strength in (0.02, 0.5) and isinstance(res.edit, Mask)
    assert all("out_of_fold_replication" in r and "locate_similarity" in r for r in res.sweep)
    est = res.estimate
    assert sorted(i for f in est["folds"] for i in f) == sorted(e.prompt for e in rows if e.split == "locate")
    assert est["out_of_fold"]["rows"] == 4 and est["in_sample"]["rows"] == 4
    assert set(est["out_of_fold"]["prompt"]) == {"model", "diffusers-default", "high-guidance"}
    assert 0.0 <= est["memorized_replication_unedited"] <= 1.0



def _row(rep, spread=1.0, plausible=True):
    return {"locate_replication": rep, "out_of_fold_replication": rep, "drift_within_spread": spread,
            "plausible": plausible}


def test_decide_takes_the_margin_step_unless_drift_or_plausibility_vetoes_it():
    sweep = [_row(0.5), _row(0.04)]
    assert decide(sweep, 0.05, margin_steps=0) == (1, True)  # the first acceptable, at once
    assert decide(sweep, 0.05, margin_steps=1) == (1, False)  # one more strength to try
    assert decide(sweep + [_row(0.0)], 0.05, margin_steps=1) == (2, True)
    assert sweep[1]["margin"] == "first acceptable" and "margin" not in sweep[0]
    vetoed = [_row(0.5), _row(0.04), _row(0.0, spread=0.25)]
    assert decide(vetoed, 0.05, margin_steps=2) == (1, True) and vetoed[2]["margin"].startswith("rejected")
    implausible = [_row(0.5), _row(0.04), {**_row(0.0), "plausible": False}]
    assert decide(implausible, 0.05, margin_steps=1) == (1, True)
    two = [_row(0.04), _row(0.02), _row(0.0)]
    assert decide(two, 0.05, margin_steps=2) == (2, True) and [r.get("margin") for r in two][1:] == ["taken"] * 2
    # nothing acceptable: the plausible one with the lowest replication, and the sweep goes on
    none = [_row(0.6), _row(0.3), {**_row(0.1), "plausible": False}]
    assert decide(none, 0.05, margin_steps=1) == (1, False)


def test_mitigate_stops_the_sweep_after_the_margin_step(tiny_pipe, rows):
    cfg = MitigateConfig(strengths=(0.02, 0.1, 0.2, 0.5), margin_steps=1, folds=0, sweep_num_seeds=1,
                         record_steps=2, sampler=SAMPLER)
    res = mitigate(tiny_pipe, rows, cfg, get_scorer("ssim"), progress=False)
    index, done = decide([dict(r) for r in res.sweep], cfg.target, res.sweep[0].get("similarity_floor"), 1)
    assert res.strength == res.sweep[index]["strength"]  # the sweep's own rows give the same choice
    assert done or len(res.sweep) == len(cfg.strengths)  # it stopped only where the rule says it may


def test_quality_gate_holds_a_round_to_the_vetoes_or_to_the_edit_it_grows_from():
    from diffmem.mitigation.strength import QualityGate

    def row(kid, std, spread, passes):
        return {"memorized_becomes": {"kid_mean": kid, "kid_std": std}, "drift_within_spread": spread,
                "passes": passes}

    gate = QualityGate.__new__(QualityGate)  # holds() reads only the two rows
    good = row(1e-4, 1e-4, 1.0, True)
    assert gate.holds(row(1e-4, 1e-4, 1.0, True), good)
    assert not gate.holds(row(1e-4, 1e-4, 0.25, False), good)  # the start passed: the candidate must pass too
    bad = row(3e-3, 2e-4, 0.5, False)
    # the start already failed: no worse is enough (KID within two of the candidate's deviations, no less drift)
    assert gate.holds(row(3.3e-3, 2e-4, 0.5, False), bad)
    assert not gate.holds(row(3.5e-3, 2e-4, 0.5, False), bad)
    assert not gate.holds(row(3e-3, 2e-4, 0.25, False), bad)


class _RefusingGate:
    """A quality gate that refuses every candidate of a round (its smallest size is kept), counting its checks."""

    def __init__(self):
        self.checked = []

    def measure(self, pipe, edit):
        self.checked.append(edit.num_params_changed())
        return {"passes": len(self.checked) == 1}  # the start passes, no candidate does

    def holds(self, row, start):
        return bool(row["passes"])


def test_a_robust_round_that_breaks_the_gate_is_halved_and_its_smallest_size_kept(tiny_pipe, rows):
    from diffmem.config import RecordConfig
    from diffmem.localization import locate
    from diffmem.mitigation.robust import harden
    from diffmem.mitigation.strength import locate_config
    from diffmem.recording import record

    cfg = MitigateConfig(ratio=0.02, robust="prune", max_rounds=1, min_rounds=1, target=0.0, folds=0,
                         robust_fraction=0.01, robust_gate=True, robust_shrinks=2, record_steps=2, sampler=SAMPLER,
                         attack_inits=("prompt",), robust_samplers=("model",),
                         attack=ReextractConfig(opt_steps=2, checkpoints=(), num_seeds=1))
    mem, non = [e for e in rows if e.split == "locate"], [e for e in rows if e.split == "nonmem"]
    rcfg = RecordConfig(sampler=SAMPLER, record_steps=2, seed=0)
    edit = locate(tiny_pipe, record(tiny_pipe, [e.prompt for e in mem], rcfg, progress=False),
                  record(tiny_pipe, [""], rcfg, progress=False), locate_config("wanda", 0.02, 2))
    loaded, kept = load_rows(mem, (16, 16)), load_rows(non, (16, 16))
    gate = _RefusingGate()
    out, rounds, _ = harden(tiny_pipe, edit, loaded, kept, [""], rcfg, 0.02, cfg, get_scorer("ssim"), False,
                            gate=gate)
    first = rounds[0]
    assert first["gate"].startswith("kept the smallest") and first["fraction_added"] == pytest.approx(0.01 / 4)
    # the start, then the round at its full share and halved twice, each larger than the edit it grows from
    assert len(gate.checked) == 1 + 3 and gate.checked[0] == edit.num_params_changed()
    assert gate.checked[1] > gate.checked[2] > gate.checked[3] > gate.checked[0]
    assert out.num_params_changed() == gate.checked[3] == first["parameters_changed_after"]  # the smallest kept
    ungated, again, _ = harden(tiny_pipe, edit, loaded, kept, [""], rcfg, 0.02, replace(cfg, robust_gate=False),
                               get_scorer("ssim"), False, gate=gate)
    assert len(gate.checked) == 4 and "gate" not in again[0]  # with robust_gate off the gate is never consulted
    assert ungated.num_params_changed() == gate.checked[1]  # and the round adds its full share


class _PassingSecondGate(_RefusingGate):
    """Refuses the full-size round, passes it halved."""

    def measure(self, pipe, edit):
        self.checked.append(edit.num_params_changed())
        return {"passes": len(self.checked) != 2}


def test_a_robust_round_keeps_the_largest_size_that_passes_the_gate(tiny_pipe, rows):
    from diffmem.config import RecordConfig
    from diffmem.localization import locate
    from diffmem.mitigation.robust import harden
    from diffmem.mitigation.strength import locate_config
    from diffmem.recording import record

    cfg = MitigateConfig(ratio=0.02, robust="prune", max_rounds=1, min_rounds=1, target=0.0, folds=0,
                         robust_fraction=0.01, robust_gate=True, robust_shrinks=2, record_steps=2, sampler=SAMPLER,
                         attack_inits=("prompt",), robust_samplers=("model",),
                         attack=ReextractConfig(opt_steps=2, checkpoints=(), num_seeds=1))
    mem, non = [e for e in rows if e.split == "locate"], [e for e in rows if e.split == "nonmem"]
    rcfg = RecordConfig(sampler=SAMPLER, record_steps=2, seed=0)
    edit = locate(tiny_pipe, record(tiny_pipe, [e.prompt for e in mem], rcfg, progress=False),
                  record(tiny_pipe, [""], rcfg, progress=False), locate_config("wanda", 0.02, 2))
    gate = _PassingSecondGate()
    out, rounds, _ = harden(tiny_pipe, edit, load_rows(mem, (16, 16)), load_rows(non, (16, 16)), [""], rcfg, 0.02,
                            cfg, get_scorer("ssim"), False, gate=gate)
    assert rounds[0]["gate"] == "passed" and rounds[0]["fraction_added"] == pytest.approx(0.005)
    assert len(gate.checked) == 3 and out.num_params_changed() == gate.checked[2] < gate.checked[1]
