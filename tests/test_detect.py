"""Wen et al. noise-norm detection."""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.detect import DetectConfig, detect, flag_calibrated, noise_norm_scores


def _cfg(**kw) -> DetectConfig:
    base = dict(steps=1, num_seeds=2, num_inference_steps=3, guidance_scale=5.0, height=16, width=16, batch_size=4)
    base.update(kw)
    return DetectConfig(**base)


def test_scores_do_not_depend_on_batching(tiny_pipe, prompts):
    a = noise_norm_scores(tiny_pipe, prompts, _cfg(batch_size=1), progress=False)
    b = noise_norm_scores(tiny_pipe, prompts, _cfg(batch_size=4), progress=False)
    assert a.shape == (len(prompts),) and np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    # prompts are distinguished: the score is text-conditional
    assert len(np.unique(np.round(a, 6))) == len(prompts)


def test_more_steps_average_more_predictions(tiny_pipe, prompts):
    one = noise_norm_scores(tiny_pipe, prompts[:2], _cfg(steps=1), progress=False)
    two = noise_norm_scores(tiny_pipe, prompts[:2], _cfg(steps=2), progress=False)
    assert not np.allclose(one, two)


def test_empty_prompt_scores_zero(tiny_pipe):
    s = noise_norm_scores(tiny_pipe, [""], _cfg(), progress=False)
    assert s[0] == pytest.approx(0.0, abs=1e-6)


def test_labels_give_auc_and_ranking(tiny_pipe, prompts):
    labels = [True, False, True, False, False, False]
    res = detect(tiny_pipe, prompts, _cfg(), labels=labels, calibration_prompts=prompts[3:], m=2.0, progress=False)
    assert 0.0 <= res.auc <= 1.0 and res.tpr_at_1fpr is not None
    ranked = res.ranked()
    assert [r["rank"] for r in ranked] == list(range(1, 7))
    assert all(ranked[i]["score"] >= ranked[i + 1]["score"] for i in range(5))
    assert res.flagged is not None and res.threshold is not None


def test_calibrated_flags_hand_case():
    flags, thr = flag_calibrated(np.array([1.0, 5.0, 2.5]), np.array([1.0, 2.0, 3.0]), m=0.5)
    assert thr == pytest.approx(2.0 + 0.5 * 1.0)
    assert flags.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="at least 2"):
        flag_calibrated(np.array([1.0]), np.array([1.0]))


@pytest.mark.parametrize("field,value", [("steps", 0), ("num_seeds", 0), ("space", "pixels"), ("batch_size", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value})
