"""``diffmem demo`` and ``diffmem audit`` at reduced settings on the embedded tiny memorizer."""

from __future__ import annotations

import json

import pytest

from diffmem.cli import main
from diffmem.zoo import default_model_path

MODEL = default_model_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"embedded checkpoint missing at {MODEL}"),
]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_report_has_the_promised_blocks(demo_out, capsys):
    report = json.loads((demo_out / "report.json").read_text())
    for block in ("before", "after"):
        for split in ("heldout", "locate", "nonmem"):
            rate = report[block][split]["replication_rate"]
            assert 0.0 <= rate <= 1.0
    assert report["mask"]["weights_zeroed"] > 0 and 0 < report["mask"]["fraction"] < 1
    assert 0.0 <= report["iou_subsets"]["overall"] <= 1.0
    assert report["detection"]["auc"] is not None
    assert {"before", "after"} <= set(report["attack"])
    assert report["directions"]["comparison"]["projection_parameters_changed"] > 0
    assert report["settings"]["quick"] is True
    # the mask must actually cut replication on the split it was located on
    assert report["after"]["locate"]["replication_rate"] <= report["before"]["locate"]["replication_rate"]


def test_demo_html_is_self_contained(demo_out):
    html = (demo_out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "src='http" not in html and 'src="http' not in html
    for section in ("Headline", "Extraction attack", "Shared subspace", "Plots", "heldout"):
        assert section in html


def test_demo_export_loads_with_plain_diffusers(demo_out):
    import torch
    from diffusers import StableDiffusionPipeline

    from diffmem.locate import Mask

    pipe = StableDiffusionPipeline.from_pretrained(demo_out / "pruned")
    mask = Mask.load(demo_out / "mask.safetensors")
    modules = dict(pipe.unet.named_modules())
    assert all(torch.all(modules[n].weight[m] == 0) for n, m in mask.layers.items())
    manifest = json.loads((demo_out / "pruned" / "diffmem_manifest.json").read_text())
    assert manifest["mask_sha256"] == mask.sha256()


def test_audit_without_references_stops_at_detection_and_attack(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the kazomi emblem\na red circle on blue\n")
    calib = tmp_path / "c.txt"
    calib.write_text("a green square on white\na black triangle on yellow\na blue circle on red\n")
    assert main(["audit", str(MODEL), "--prompts", str(prompts), "--calibration", str(calib), "--out",
                 str(tmp_path / "audit"), "--quick"]) == 0
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert "attack" in report and "detection" in report and "before" not in report
    assert (tmp_path / "audit" / "report.html").is_file()
