"""``diffmem detect --method`` and ``diffmem audit --candidates`` through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.zoo import default_model_path

MODEL = default_model_path()
SAMPLING = ["--steps", "3", "--height", "16", "--width", "16", "--guidance", "5"]


@pytest.fixture(scope="module")
def model_dir(tiny_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-detectors") / "tiny-sd"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


def test_detect_method_bright_ending_writes_masks(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe green tree\na blue dog on the sky\n")
    out = tmp_path / "be.jsonl"
    code, _ = _run(["detect", model_dir, "--prompts", prompts, "--out", out, "--method", "bright_ending", "--seeds",
                    "1", *SAMPLING], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all("mask_fraction" in r for r in rows)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["method"] == "bright_ending" and summary["config"]["score"] == "local_noise_norm"
    assert summary["summary"]["cost"]["denoiser_calls"] == 3
    with np.load(out.with_suffix(".masks.npz")) as saved:
        assert saved["masks"].shape == (3, 16, 16) and saved["masks"].dtype == bool
        assert list(saved["prompts"]) == ["a red cat", "the green tree", "a blue dog on the sky"]  # input order


def test_detect_method_anisotropy(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe green tree\na blue dog on the sky\n")
    out = tmp_path / "a.jsonl"
    code, _ = _run(["detect", model_dir, "--prompts", prompts, "--out", out, "--method", "anisotropy", "--seeds", "1",
                    *SAMPLING], capsys)
    assert code == 0
    assert len(out.read_text().splitlines()) == 3
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["method"] == "anisotropy" and summary["config"]["cosine_weight"] == 2.0
    assert summary["summary"]["cost"]["denoiser_calls"] == 2  # two passes on pure noise, whatever the schedule


def test_detect_method_sharpness_and_the_errors(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe green tree\n")
    out = tmp_path / "s.csv"
    code, _ = _run(["detect", model_dir, "--prompts", prompts, "--out", out, "--method", "sharpness", "--seeds", "1",
                    *SAMPLING], capsys)
    assert code == 0 and json.loads(out.with_suffix(".summary.json").read_text())["method"] == "sharpness"
    code, err = _run(["detect", model_dir, "--prompts", prompts, "--out", out, "--method", "nope"], capsys)
    assert code == 2 and "invalid choice: 'nope'" in err.err and "bright_ending" in err.err
    code, err = _run(["detect", model_dir, "--prompts", prompts, "--out", out, "--method", "sharpness", "--preset",
                      "wen2024"], capsys)
    assert code == 2 and "--preset wen2024 is a preset of the wen detector" in err.err
    code, err = _run(["audit", model_dir, "--out", tmp_path / "a"], capsys)
    assert code == 2 and "--candidates" in err.err


@pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="embedded checkpoint missing")
def test_audit_screens_candidates_and_attacks_the_flagged(tmp_path, capsys):
    rows = [json.loads(line) for line in (MODEL / "memorization.jsonl").read_text().splitlines()]
    pool = [r["prompt"] for r in rows if r["duplicates"] == 128][:3] + (MODEL / "base_prompts.txt").read_text().split(
        "\n")[:9]
    candidates = tmp_path / "pool.txt"
    candidates.write_text("\n".join(p for p in pool if p) + "\n")
    code, out = _run(["audit", MODEL, "--candidates", candidates, "--flag-top", "3", "--out", tmp_path / "audit",
                      "--quick"], capsys)
    assert code == 0, out.err
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    passed = report["candidates"]["passed_on"]
    assert len(passed) == 3 and sum(p in pool[:3] for p in passed) >= 2, passed
    assert report["detection"]["num_prompts"] == 3 and "attack" in report
    assert "screened 12 candidates with wen" in out.out
