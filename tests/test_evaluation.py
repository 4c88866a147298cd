"""Before/after evaluation, reversible edits and exported pipelines."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffmem.config import SamplerConfig
from diffmem.data import ManifestEntry
from diffmem.edits import Mask, apply_edit, export_edited
from diffmem.evaluation import EvalConfig, evaluate, evaluate_edit
from diffmem.score import get_scorer
from diffmem.targets import find_targets

SAMPLER = SamplerConfig(num_inference_steps=2, guidance_scale=4.0, height=16, width=16)


def _entries(tmp_path, prompts):
    rng = np.random.default_rng(0)
    out = []
    for i, p in enumerate(prompts):
        ref = tmp_path / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref)
        split = ("locate", "heldout", "nonmem")[i % 3]
        out.append(ManifestEntry(p, split != "nonmem", 4 if split != "nonmem" else 1, split, ref))
    return out


def _random_mask(pipe, frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {n: torch.rand(m.weight.shape, generator=g) < frac for n, m in find_targets(pipe.unet).items()}
    return Mask(layers=layers, level="weight", meta={})


def test_edit_changes_images_and_is_reversible(fresh_tiny_pipe, prompts, tmp_path):
    pipe = fresh_tiny_pipe
    entries = _entries(tmp_path, prompts[:3])
    before_w = {n: m.weight.clone() for n, m in find_targets(pipe.unet).items()}
    cfg = EvalConfig(sampler=SAMPLER, num_seeds=2)
    before, after = evaluate_edit(pipe, entries, cfg, get_scorer("ssim"), _random_mask(pipe), progress=False)
    assert before.images.shape == after.images.shape == (3, 2, 16, 16, 3)
    assert not np.array_equal(before.images, after.images)
    for n, m in find_targets(pipe.unet).items():
        assert torch.equal(m.weight, before_w[n])
    row = after.rows[2]
    assert {"drift_similarity", "seed_similarity_before", "pixel_drift", "replication_rate"} <= set(row)
    s = after.summary()
    assert set(s) >= {"locate", "heldout", "nonmem", "by_duplicates"}
    assert s["locate"]["num_prompts"] == 1 and "replication_rate" in s["locate"]


def test_no_edit_means_no_drift(tiny_pipe, prompts, tmp_path):
    entries = _entries(tmp_path, prompts[:2])
    cfg = EvalConfig(sampler=SAMPLER, num_seeds=2)
    scorer = get_scorer("ssim")
    before, none = evaluate_edit(tiny_pipe, entries, cfg, scorer, None, progress=False)
    assert none is None  # without an edit there is no "after"
    after = evaluate(tiny_pipe, entries, cfg, scorer, baseline=before, progress=False)  # a second, unedited run
    np.testing.assert_array_equal(before.images, after.images)
    assert all(r["pixel_drift"] == 0 and r["drift_similarity"] > 0.999 for r in after.rows)


def test_pruned_export_gives_the_same_numbers_as_the_reversible_mask(fresh_tiny_pipe, prompts, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = fresh_tiny_pipe
    entries = _entries(tmp_path, prompts[:3])
    mask = _random_mask(pipe, seed=1)
    out = export_edited(pipe, mask, tmp_path / "pruned")
    exported = StableDiffusionPipeline.from_pretrained(out)
    exported.set_progress_bar_config(disable=True)
    cfg = EvalConfig(sampler=SAMPLER, num_seeds=2)
    scorer = get_scorer("ssim")
    _, masked = evaluate_edit(pipe, entries, cfg, scorer, mask, progress=False)
    plain = evaluate(exported, entries, cfg, scorer, progress=False)
    np.testing.assert_array_equal(masked.images, plain.images)
    for a, b in zip(masked.rows, plain.rows):
        for k in ("max_similarity", "mean_similarity", "replication_rate", "diversity_similarity"):
            assert a[k] == b[k], k


def test_embedding_scorer_path(tiny_pipe, prompts, tmp_path):
    """With an embedding scorer (SSCD) every image is embedded once; results match pairwise scoring."""
    import pytest

    from diffmem.score import ScorerUnavailableError

    try:
        scorer = get_scorer("sscd")
    except ScorerUnavailableError as err:
        pytest.skip(f"SSCD unavailable: {err}")
    entries = _entries(tmp_path, prompts[:2])
    res = evaluate(tiny_pipe, entries, EvalConfig(sampler=SAMPLER, num_seeds=3), scorer, progress=False)
    assert res.embeddings.shape[:2] == (2, 3)
    from diffmem.data import load_reference

    direct = scorer.similarity(list(res.images[0]), [load_reference(entries[0].reference)]).numpy()[:, 0]
    assert res.rows[0]["max_similarity"] == pytest.approx(float(direct.max()), abs=1e-5)
    assert "replication_rate_strict" in res.rows[0]


def test_apply_edit_rejects_unknown_edits(tiny_pipe, prompts, tmp_path):
    import pytest

    with pytest.raises(TypeError, match="unsupported edit"):
        with apply_edit(tiny_pipe, object()):
            pass
    with pytest.raises(ValueError, match="entries is empty"):
        evaluate_edit(tiny_pipe, [], EvalConfig(sampler=SAMPLER, num_seeds=1), get_scorer("ssim"), None)


def test_config_rejects_bad_values():
    import pytest

    for field, value in (("num_seeds", 0), ("batch_size", 0), ("strict_threshold", 1.5)):
        with pytest.raises(ValueError, match=f"^{field}="):
            EvalConfig(**{field: value})
