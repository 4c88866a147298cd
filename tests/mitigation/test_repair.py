"""The repair (:func:`diffmem.mitigation.repair.repair_edit`): a distillation toward the unedited model on ordinary
rows, on the tiny UNet and DiT pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffmem.data import ManifestEntry
from diffmem.edits import WeightDelta, apply_edit
from diffmem.errors import DiffmemError
from diffmem.mitigation.repair import repair_edit
from diffmem.mitigation.rows import Rows
from diffmem.objective import denoiser_call, encode_conditioning
from diffmem.targets import get_denoiser

ORDINARY = ["a green bird", "a red dog", "a blue cat", "the sky", "a cat", "a green dog on the sky"]


def _rows(size: int = 16) -> Rows:
    rng = np.random.default_rng(0)
    entries = [ManifestEntry(p, False, 1, "nonmem") for p in ORDINARY]
    return Rows(entries, [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in ORDINARY])


def _ffn_zeroing_edit(pipe) -> WeightDelta:
    """Zero a third of every output projection of the feed-forward layers: a deletion large enough to move the
    ordinary prompts' predictions."""
    denoiser = get_denoiser(pipe)
    params = dict(denoiser.named_parameters())
    names = [n for n in params if n.endswith("ff.net.2.weight")]
    before = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            params[n][:, : params[n].shape[1] // 3] = 0.0
    delta = WeightDelta.between(before, pipe)
    with torch.no_grad():
        for n in names:
            params[n].copy_(before[n])
    return delta


def _distance_to_unedited(pipe, edit, rows: Rows, other=None) -> float:
    """Mean squared distance between the edited and the unedited (or ``other``-edited) denoiser's predictions on
    ``rows`` at fixed noisy latents (seeded noise, timesteps spread over the schedule)."""
    denoiser = get_denoiser(pipe)
    predict = denoiser_call(pipe, 16, 16)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(123)
    x0 = rows.latents(pipe)
    cond = encode_conditioning(pipe, rows.prompts)[0]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(50, sched.config.num_train_timesteps - 50, len(rows)).long()
    noisy = sched.add_noise(x0, noise, t)
    with torch.no_grad():
        if other is None:
            ref = predict(noisy, t, cond, None)
        else:
            with apply_edit(pipe, other):
                ref = predict(noisy, t, cond, None)
        with apply_edit(pipe, edit):
            now = predict(noisy, t, cond, None)
    return float(((now - ref) ** 2).mean())


@pytest.mark.parametrize("which", ["tiny_pipe", "tiny_pixart_pipe"])
def test_repair_pulls_the_edited_model_back_on_ordinary_rows_and_keeps_the_zeros(which, request):
    pipe = request.getfixturevalue(which)
    denoiser = get_denoiser(pipe)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    edit, rows = _ffn_zeroing_edit(pipe), _rows()
    repaired = repair_edit(pipe, edit, rows, steps=60, lr=1e-3, batch=4, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in denoiser.named_parameters())  # the pipeline is restored
    assert set(repaired.deltas) == set(edit.deltas)  # scope "edited": only the parameters the edit changed train
    assert repaired.meta["method"] == "repair" and repaired.meta["base_edit"] == edit.kind
    with apply_edit(pipe, repaired):
        params = dict(denoiser.named_parameters())
        for n in edit.deltas:
            k = params[n].shape[1] // 3
            assert torch.count_nonzero(params[n][:, :k]) == 0  # the deletion's zeros stay zero
            assert not torch.equal(params[n][:, k:], before[n][:, k:])  # the rest moved
    # the repair's objective: on the ordinary rows the repaired model predicts closer to the unedited one
    assert _distance_to_unedited(pipe, repaired, rows) < _distance_to_unedited(pipe, edit, rows)


def test_repair_scope_all_trains_every_parameter_but_the_zeros(tiny_pipe):
    edit, rows = _ffn_zeroing_edit(tiny_pipe), _rows()
    repaired = repair_edit(tiny_pipe, edit, rows, steps=2, batch=2, scope="all", progress=False)
    trainable = {n for n, _ in get_denoiser(tiny_pipe).named_parameters()}
    assert set(edit.deltas) < set(repaired.deltas) <= trainable


@pytest.mark.parametrize("kwargs, match", [({"scope": "some"}, "scope="), ({"steps": 0}, "steps=0"),
                                           ({"lr": -1.0}, "lr=-1.0"), ({"uncond_share": 2.0}, "uncond_share=2.0"),
                                           ({"deleted_weight": -1.0}, "deleted_weight=-1.0")])
def test_repair_names_a_bad_setting(tiny_pipe, kwargs, match):
    with pytest.raises(DiffmemError, match=match):
        repair_edit(tiny_pipe, _ffn_zeroing_edit(tiny_pipe), _rows(), progress=False, **kwargs)


def test_repair_needs_ordinary_rows_and_an_edit_that_changes_something(tiny_pipe):
    with pytest.raises(DiffmemError, match="ordinary"):
        repair_edit(tiny_pipe, _ffn_zeroing_edit(tiny_pipe), Rows([], []), progress=False)
    with pytest.raises(DiffmemError, match="changes no parameter"):
        repair_edit(tiny_pipe, WeightDelta({}), _rows(), steps=1, progress=False)


def test_repair_holds_the_deleted_rows_at_the_edited_model(tiny_pipe):
    """With ``deleted`` rows the repaired model stays closer to the edited one on them than a repair without."""
    edit, rows = _ffn_zeroing_edit(tiny_pipe), _rows()
    rng = np.random.default_rng(1)
    deleted = Rows([ManifestEntry(p, True, 10, "locate") for p in ("a red cat", "a blue dog on the sky")],
                   [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)])
    free = repair_edit(tiny_pipe, edit, rows, steps=40, lr=1e-3, batch=4, progress=False)
    held = repair_edit(tiny_pipe, edit, rows, steps=40, lr=1e-3, batch=4, deleted=deleted, deleted_weight=10.0,
                       progress=False)
    assert held.meta["deleted_rows"] == 2 and free.meta["deleted_rows"] == 0
    assert _distance_to_unedited(tiny_pipe, held, deleted, other=edit) < _distance_to_unedited(
        tiny_pipe, free, deleted, other=edit)


def test_repair_split_spreads_the_share_and_keeps_at_least_one_row():
    from diffmem.mitigation.fit import repair_split

    assert repair_split(12, 0.5) == [0, 2, 4, 6, 8, 10]
    assert repair_split(5, 1.0) == [0, 1, 2, 3, 4]
    assert repair_split(3, 0.01) == [0]
    for n in range(1, 30):
        for share in (0.1, 0.25, 0.5, 0.9):
            idx = repair_split(n, share)
            assert len(set(idx)) == len(idx) == min(n, max(1, round(n * share))) and 0 <= min(idx) <= max(idx) < n


@pytest.fixture
def repair_manifest(self_referenced_manifest):
    """Four ``locate`` rows (references: the pipeline's own generations) and four ``nonmem`` rows."""
    from diffmem.config import SamplerConfig

    sampler = SamplerConfig(num_inference_steps=3, guidance_scale=3.0, height=16, width=16)
    memorized = ["a red cat", "a blue dog on the sky", "a green bird on the sky", "a red sky"]
    return self_referenced_manifest(memorized, ORDINARY[:4], sampler), sampler


def test_mitigate_with_repair_repairs_in_every_fold_and_names_the_rows_it_fitted_on(tiny_pipe, repair_manifest,
                                                                                     caplog):
    import logging

    from diffmem.mitigation import MitigateConfig, mitigate
    from diffmem.score import get_scorer

    caplog.set_level(logging.INFO, logger="diffmem.mitigation.repair")

    entries, sampler = repair_manifest
    cfg = MitigateConfig(ratio=0.05, folds=2, sweep_num_seeds=1, estimate_num_seeds=1, record_steps=2,
                         sampler=sampler, repair_steps=3)
    res = mitigate(tiny_pipe, entries, cfg, get_scorer("ssim"), progress=False)
    assert isinstance(res.edit, WeightDelta) and res.edit.meta["method"] == "repair" and "repair" in res.timings_s
    assert res.edit.meta["rows"] == 2 and res.edit.meta["deleted_rows"] == 4  # half the nonmem rows; every given row
    info = res.estimate["repair"]
    nonmem = [e.prompt for e in entries if e.split == "nonmem"]
    assert info["fitted_on"] == nonmem[0::2] and info["unseen"] == nonmem[1::2]
    assert "out_of_fold" in res.estimate
    held = [r.getMessage() for r in caplog.records if r.getMessage().startswith("repair: 3 steps on 2 ordinary")]
    assert sum("(4 deleted rows held)" in m for m in held) == 1  # the final fit holds every given row
    assert sum("(2 deleted rows held)" in m for m in held) == 2  # each fold's fit holds only its training rows
    denoiser = get_denoiser(tiny_pipe)
    with apply_edit(tiny_pipe, res.plain_edit):
        zeroed = {n: p.detach() == 0 for n, p in denoiser.named_parameters()}
    with apply_edit(tiny_pipe, res.edit):
        for n, p in denoiser.named_parameters():
            assert torch.count_nonzero(p.detach()[zeroed[n]]) == 0, n  # the deletion's zeros stay zero


def test_mitigate_repair_needs_nonmem_rows_with_references(tiny_pipe, repair_manifest):
    from diffmem.mitigation import MitigateConfig, mitigate
    from diffmem.score import get_scorer

    entries, sampler = repair_manifest
    locate_only = [e for e in entries if e.split == "locate"]
    cfg = MitigateConfig(ratio=0.05, folds=0, sweep_num_seeds=1, record_steps=2, sampler=sampler, repair_steps=3)
    with pytest.raises(DiffmemError, match="the repair needs 'nonmem' rows"):
        mitigate(tiny_pipe, locate_only, cfg, get_scorer("ssim"), progress=False)


def test_mitigate_repairs_after_the_redirect_and_keeps_both_edits_zeros(tiny_pipe, repair_manifest):
    from diffmem.mitigation import MitigateConfig, mitigate
    from diffmem.score import get_scorer

    entries, sampler = repair_manifest
    cfg = MitigateConfig(ratio=0.05, folds=0, sweep_num_seeds=1, estimate_num_seeds=1, record_steps=2,
                         sampler=sampler, redirect=1.0, repair_steps=2)
    res = mitigate(tiny_pipe, entries, cfg, get_scorer("ssim"), progress=False)
    assert res.edit.meta["method"] == "repair" and res.edit.meta["base_edit"] == "weight delta"  # the redirect
    assert list(res.timings_s).index("redirect") < list(res.timings_s).index("repair")
    denoiser = get_denoiser(tiny_pipe)
    with apply_edit(tiny_pipe, res.plain_edit):
        zeroed = {n: p.detach() == 0 for n, p in denoiser.named_parameters()}
    with apply_edit(tiny_pipe, res.edit):
        for n, p in denoiser.named_parameters():
            assert torch.count_nonzero(p.detach()[zeroed[n]]) == 0, n
