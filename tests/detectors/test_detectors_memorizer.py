"""The new detectors on the embedded memorizer, and the audit's screening of a prompt pool it was not told about.

Measured on ``assets/tiny-sd-memorizer`` (32 memorized emblems, 24 ordinary prompts, the model's sampler); the
figures and the benchmark behind them are in ``docs/faithfulness.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.config import SamplerConfig
from diffmem.detection import detect, detector_config
from diffmem.zoo import default_model_path

MODEL = default_model_path()
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="embedded checkpoint missing")


@pytest.fixture(scope="module")
def memorizer():
    from diffmem.data import read_manifest
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(str(MODEL))
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(**sampling_defaults(MODEL))
    # the training set's prompts: memorized emblems against ordinary captions (never-seen emblems are the attack's
    # control, not part of this comparison)
    entries = [e for e in read_manifest(MODEL / "memorization.jsonl") if e.split != "never_seen"]
    return pipe, sampler, entries


def _run(memorizer, name, **settings):
    pipe, sampler, entries = memorizer
    labels = np.array([e.memorized for e in entries])
    cfg = detector_config(name, sampler=sampler, batch_size=16, **settings)
    res = detect(pipe, [e.prompt for e in entries], cfg, labels=labels, progress=False)
    return res, labels


@needs_model
@pytest.mark.slow  # a whole 25-step generation of 56 prompts: about 30 s on one thread
def test_bright_ending_scores_memorized_prompts_higher(memorizer):
    """The BE-weighted noise magnitude (the paper's detection) is higher for memorized prompts: AUC 0.72 here.

    With the first end token's map the separation is weak on this model (the emblems fill the image, so there is
    no local region to single out); ``end_tokens="all"`` measures AUC 0.96. See docs/faithfulness.md.
    """
    res, labels = _run(memorizer, "bright_ending", num_seeds=1)
    assert res.scores[labels].mean() > res.scores[~labels].mean()
    assert res.auc >= 0.6, res.auc
    assert res.masks.shape == (len(labels), 32, 32) and res.masks.any(axis=(1, 2)).all()
    assert res.cost["denoiser_calls"] == 25 * 4  # the whole 25-step schedule, 4 batches of 16


@needs_model
@pytest.mark.xfail(strict=True, reason="measured: at the first step of this zero-terminal-SNR v-prediction model the "
                   "Hessian-score product is smaller for memorized prompts (AUC 0.11; docs/faithfulness.md)")
def test_sharpness_scores_memorized_prompts_higher(memorizer):
    res, labels = _run(memorizer, "sharpness", num_seeds=4, hvp="finite")
    assert res.scores[labels].mean() > res.scores[~labels].mean()


@needs_model
def test_audit_screening_finds_the_memorized_prompts_in_a_pool(memorizer):
    """A pool of the manifest's prompts and the base prompts, unlabelled: the top 16 are memorized emblems."""
    from diffmem.workflows.audit import screen_candidates

    pipe, sampler, entries = memorizer
    pool = [e.prompt for e in entries] + (MODEL / "base_prompts.txt").read_text().split("\n")
    pool = [p for p in dict.fromkeys(pool) if p]
    memorized = {e.prompt for e in entries if e.memorized}
    cfg = detector_config("wen", sampler=sampler, score_steps=5, num_seeds=2, batch_size=32)
    screen = screen_candidates(pipe, pool, cfg, flag_top=16, progress=False)
    hits = sum(pool[i] in memorized for i in screen.flagged)
    assert len(screen.flagged) == 16 and hits >= 14, [pool[i] for i in screen.flagged]
    summary = screen.summary()
    assert summary["num_passed_on"] == 16 and summary["rule"] == "the 16 highest scores"
    # calibrated on the base prompts: what passes is above mean + 3 std of ordinary prompts, mostly memorized
    calib = [p for p in pool if p not in memorized and p not in {e.prompt for e in entries}]
    screen = screen_candidates(pipe, pool, cfg, calibration_prompts=calib, progress=False)
    passed = [pool[i] for i in screen.flagged]
    assert passed and sum(p in memorized for p in passed) >= 0.9 * len(passed), passed
