"""``benchmarks/bench_detect.py --zoo``: the rule that picks the default detector, and one quick run."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_detect.py"


def _bench():
    name = "benchmarks_bench_detect"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_default_detector_is_the_best_mean_auc_among_cheap_enough_variants():
    pick = _bench().pick_default_detector
    table = {
        "a": {"wen_k5": {"auc": 0.99, "cost_ratio": 6.0}, "sharpness_finite": {"auc": 0.999, "cost_ratio": 12.0},
              "bright_ending": {"auc": 1.0, "cost_ratio": 1.5}},
        "b": {"wen_k5": {"auc": 0.95, "cost_ratio": 5.5}, "sharpness_finite": {"auc": 0.80, "cost_ratio": 11.0},
              "bright_ending": {"auc": 1.0, "cost_ratio": 1.4}},
    }
    assert pick(table, 5.0) == "wen"  # mean 0.97 beats 0.90; bright_ending is too slow
    assert pick(table, 1.0) == "bright_ending"
    assert pick(table, 50.0) is None
    table["b"]["wen_k5"]["cost_ratio"] = 4.0  # must be cheap enough on every model
    assert pick(table, 5.0) == "sharpness"


def test_zoo_run_prints_a_row_per_model_and_detector(capsys):
    from diffmem.zoo import default_model_path

    if not (default_model_path() / "model_index.json").is_file():
        pytest.skip("embedded checkpoint missing")
    argv = ["--zoo", "--models", "tiny-sd-memorizer", "--quick", "--limit", "2", "--detectors", "wen_k1",
            "sharpness_finite", "bright_ending", "--steps-cap", "4", "--no-progress"]
    assert _bench().main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = [re.fullmatch(r"detector_row model=tiny-sd-memorizer detector=(\w+) auc=\S+ tpr_at_1fpr=\S+ "
                         r"cost_ratio=\S+ cost_ratio_wall=\S+ denoiser_ratio=(\S+)", line) for line in out[:3]]
    assert all(rows), out
    assert [m.group(1) for m in rows] == ["wen_k1", "sharpness_finite", "bright_ending"]
    # denoiser rows: generate 4 steps x 2 seeds; wen k = 1 one step x 2 seeds; the finite difference one step and
    # one perturbed pass x 2 seeds; bright ending all 4 steps x 1 seed
    assert [float(m.group(2)) for m in rows] == [4.0, 2.0, 2.0]
    assert re.fullmatch(r"baseline_row model=tiny-sd-memorizer auc=\S+ tpr_at_1fpr=\S+", out[3])
    assert re.fullmatch(r"default_detector=(\w+|none)", out[4])
