"""The command line on a tiny pipeline saved to disk: the record -> locate -> prune flow and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffmem.cli import main

MEM = ["a red cat", "a blue dog on the sky", "the green tree"]
BASE = ["a photo of a yellow star", "a white house with a black car", "an orange circle on pink background"]
SAMPLING = ["--steps", "3", "--height", "16", "--width", "16", "--guidance", "5"]


@pytest.fixture(scope="module")
def model_dir(tiny_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny-sd"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse rejects values before main's own handling
        code = exit_.code
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def flow(model_dir, tmp_path_factory):
    """record (memorized, base) -> locate -> prune, all through the CLI."""
    d = tmp_path_factory.mktemp("flow")
    _write(d / "mem.txt", MEM)
    (d / "base.jsonl").write_text("".join(json.dumps({"caption": p}) + "\n" for p in BASE))
    for name, prompts in (("mem", d / "mem.txt"), ("base", d / "base.jsonl")):
        assert main(["record", str(model_dir), "--prompts", str(prompts), "--out", str(d / f"{name}.safetensors"),
                     "--record-steps", "2", "--batch-size", "2", *SAMPLING]
                    + (["--add-empty-prompt"] if name == "base" else [])) == 0
    assert main(["locate", str(model_dir), "--memorized", str(d / "mem.safetensors"), "--base",
                 str(d / "base.safetensors"), "--out", str(d / "mask.safetensors"), "--ratio", "0.05",
                 "--record-steps", "2"]) == 0
    assert main(["prune", str(model_dir), "--edit", str(d / "mask.safetensors"), "--out", str(d / "pruned")]) == 0
    return d


def test_flow_writes_stats_mask_and_a_loadable_export(flow, model_dir):
    from diffusers import StableDiffusionPipeline

    from diffmem.edits import Mask
    from diffmem.stats import ActivationStats

    stats = ActivationStats.load(flow / "mem.safetensors")
    assert stats.steps == 2 and set(stats.halves) == {"uncond", "cond"}
    assert stats.meta["num_prompts"] == len(MEM)
    mask = Mask.load(flow / "mask.safetensors")
    assert mask.num_masked() > 0
    manifest = json.loads((flow / "pruned" / "diffmem_manifest.json").read_text())
    assert manifest["edit"]["num_params_changed"] == mask.num_masked()
    assert manifest["edit"]["sha256"] == mask.sha256()
    pipe = StableDiffusionPipeline.from_pretrained(flow / "pruned")
    modules = dict(pipe.unet.named_modules())
    for name, m in mask.layers.items():
        assert torch.all(modules[name].weight[m] == 0)
    orig = StableDiffusionPipeline.from_pretrained(model_dir)
    w0 = dict(orig.unet.named_modules())[next(iter(mask.layers))].weight
    assert not torch.equal(w0, modules[next(iter(mask.layers))].weight)
    img = pipe("a red cat", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_iou_of_a_mask_with_itself(flow, capsys):
    code, out = _run(["iou", flow / "mask.safetensors", flow / "mask.safetensors"], capsys)
    assert code == 0 and json.loads(out.out)["overall"] == 1.0


def test_neuron_level_masks_whole_columns(flow, model_dir):
    from diffmem.edits import Mask

    assert main(["locate", str(model_dir), "--memorized", str(flow / "mem.safetensors"), "--base",
                 str(flow / "base.safetensors"), "--out", str(flow / "neurons.safetensors"), "--ratio", "0.05",
                 "--record-steps", "2", "--method", "neuron"]) == 0
    m = Mask.load(flow / "neurons.safetensors")
    for layer in m.layers.values():
        cols = layer.any(0)
        assert torch.equal(layer, cols.expand_as(layer))


def test_missing_model_is_one_line(tmp_path, capsys):
    (tmp_path / "m.safetensors").write_bytes(b"")
    code, out = _run(["prune", tmp_path / "nope", "--edit", tmp_path / "m.safetensors", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert out.err.count("\n") == 1 and "nope" in out.err and "Traceback" not in out.err


def test_malformed_prompt_file_names_the_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "fine"}\n{not json\n')
    code, out = _run(["record", model_dir, "--prompts", bad, "--out", tmp_path / "s.safetensors"], capsys)
    assert code == 2 and "bad.jsonl:3" in out.err and out.err.count("\n") == 1


def test_out_of_range_ratio(flow, model_dir, tmp_path, capsys):
    code, out = _run(["locate", model_dir, "--memorized", flow / "mem.safetensors", "--base", flow / "base.safetensors",
                      "--out", tmp_path / "m.safetensors", "--ratio", "1.5"], capsys)
    assert code == 2 and "--ratio" in out.err and "1.5" in out.err
    assert not (tmp_path / "m.safetensors").exists()


def test_mask_from_another_model_is_refused(flow, tmp_path, capsys):
    from diffmem.zoo.tiny import build_tiny_pipeline

    other = build_tiny_pipeline(block_out_channels=(32, 96), text_dim=32)
    other.save_pretrained(tmp_path / "other")
    code, out = _run(["prune", tmp_path / "other", "--edit", flow / "mask.safetensors", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "shape" in out.err and "ff.net.2" in out.err
    assert not (tmp_path / "o").exists()


def test_existing_export_is_kept_without_overwrite(flow, model_dir, capsys):
    before = sorted(p.name for p in (flow / "pruned").iterdir())
    code, out = _run(["prune", model_dir, "--edit", flow / "mask.safetensors", "--out", flow / "pruned"], capsys)
    assert code == 2 and "overwrite" in out.err
    assert sorted(p.name for p in (flow / "pruned").iterdir()) == before
    code, _ = _run(["prune", model_dir, "--edit", flow / "mask.safetensors", "--out", flow / "pruned", "--overwrite"],
                   capsys)
    assert code == 0


def test_pickle_weights_are_refused_unless_allowed(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "pkl", safe_serialization=False)
    _write(tmp_path / "p.txt", MEM[:1])
    args = ["record", tmp_path / "pkl", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "s.safetensors",
            "--record-steps", "1", *SAMPLING]
    code, out = _run(args, capsys)
    assert code == 2 and "--allow-pickle" in out.err
    code, _ = _run(args + ["--allow-pickle"], capsys)
    assert code == 0 and (tmp_path / "s.safetensors").is_file()


def test_detect_writes_a_ranked_table(model_dir, tmp_path, capsys):
    _write(tmp_path / "p.txt", MEM + BASE)
    code, _ = _run(["detect", model_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "d.csv", "--seeds", "1",
                    *SAMPLING], capsys)
    assert code == 0
    lines = (tmp_path / "d.csv").read_text().splitlines()
    assert lines[0].startswith("rank,prompt,score") and len(lines) == 1 + len(MEM) + len(BASE)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "diffmem", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("record", "locate", "prune", "iou", "detect", "attack", "evaluate", "reextract", "mitigate", "demo",
                "audit"):
        assert cmd in out.stdout


def test_prune_refuses_to_overwrite_the_input_model_or_a_foreign_folder(flow, model_dir, tmp_path, capsys):
    before = sorted(p.name for p in model_dir.rglob("*"))
    for out in (model_dir, model_dir / "sub", model_dir.parent):
        code, res = _run(["prune", model_dir, "--edit", flow / "mask.safetensors", "--out", out, "--overwrite"], capsys)
        assert code == 2 and res.err.startswith("diffmem: error:") and res.err.count("\n") == 1
        assert "input model" in res.err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    code, res = _run(["prune", model_dir, "--edit", flow / "mask.safetensors", "--out", foreign, "--overwrite"], capsys)
    assert code == 2 and "--overwrite" in res.err and (foreign / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in model_dir.rglob("*")) == before


def test_export_carries_the_sampler_defaults(flow, model_dir, tmp_path):
    (model_dir / "diffmem_defaults.json").write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 5.0}))
    try:
        assert main(["prune", str(model_dir), "--edit", str(flow / "mask.safetensors"), "--out", str(tmp_path / "x")]) == 0
        carried = json.loads((tmp_path / "x" / "diffmem_defaults.json").read_text())
        assert carried == {"num_inference_steps": 3, "guidance_scale": 5.0}
        assert json.loads((tmp_path / "x" / "diffmem_manifest.json").read_text())["carried_sidecars"] == [
            "diffmem_defaults.json"]
    finally:
        (model_dir / "diffmem_defaults.json").unlink()


def _bad_inputs(model_dir, flow, tmp):
    """(argv, text the one-line error must contain) for every subcommand; tmp/out must stay unwritten."""
    out = tmp / "out"
    prompts = _write(tmp / "p.txt", MEM)
    manifest = tmp / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a", "memorized": True, "duplicates": 2, "split": "heldout",
                                    "reference": "../../../etc/passwd"}) + "\n")
    notimg = tmp / "notimg.jsonl"
    (tmp / "fake.png").write_text("not an image")
    notimg.write_text(json.dumps({"prompt": "a", "memorized": True, "duplicates": 2, "split": "heldout",
                                  "reference": "fake.png"}) + "\n")
    mem, base, mask = flow / "mem.safetensors", flow / "base.safetensors", flow / "mask.safetensors"
    return [
        (["record", tmp / "nope", "--prompts", prompts, "--out", out], "nope"),
        (["record", model_dir, "--prompts", tmp / "none.txt", "--out", out], "none.txt"),
        (["record", model_dir, "--prompts", prompts, "--out", out, "--batch-size", "0"], "--batch-size"),
        (["record", model_dir, "--prompts", prompts, "--out", out, "--height", "0"], "--height"),
        (["record", model_dir, "--prompts", prompts, "--out", out, "--height", "33"], "multiple of 8"),
        (["record", model_dir, "--prompts", prompts, "--out", out, "--device", "cuda:0"], "cuda"),
        (["locate", model_dir, "--memorized", mem, "--base", base, "--out", out, "--ratio", "0"], "--ratio"),
        (["locate", model_dir, "--memorized", tmp / "x.safetensors", "--base", base, "--out", out], "x"),
        (["prune", model_dir, "--edit", tmp / "x.safetensors", "--out", out], "x.safetensors"),
        (["prune", model_dir, "--out", out], "--edit"),
        (["iou", mask, tmp / "x.safetensors"], "x.safetensors"),
        (["detect", model_dir, "--prompts", prompts, "--out", tmp / "out.txt"], ".jsonl"),
        (["detect", model_dir, "--prompts", prompts, "--out", tmp / "out.csv", "--guidance", "1"], "guidance"),
        (["attack", model_dir, "--prompts", prompts, "--out", out, "--edit", tmp / "x"], "x.safetensors"),
        (["attack", model_dir, "--prompts", manifest, "--out", out], "outside"),
        (["evaluate", model_dir, "--prompts", manifest, "--out", tmp / "out.json"], "outside"),
        (["evaluate", model_dir, "--prompts", prompts, "--out", tmp / "out.json"], "p.txt"),
        (["reextract", model_dir, "--prompts", notimg, "--out", out, *SAMPLING], "not an image"),
        (["reextract", model_dir, "--prompts", prompts, "--out", out], "heldout"),
        (["reextract", model_dir, "--prompts", notimg, "--out", out, "--lr", "-1"], "--lr"),
        (["mitigate", model_dir, "--prompts", tmp / "none.jsonl", "--out", out], "none.jsonl"),
        (["mitigate", model_dir, "--prompts", manifest, "--out", out, "--target", "2"], "--target"),
        (["audit", model_dir, "--prompts", tmp / "none.txt", "--out", out], "none.txt"),
        (["demo", "--ratio", "1.5", "--out", out], "--ratio"),
    ]


def test_every_subcommand_rejects_bad_input_in_one_line(model_dir, flow, tmp_path, capsys):
    cases = _bad_inputs(model_dir, flow, tmp_path)
    assert {argv[0] for argv, _ in cases} >= {"record", "locate", "prune", "iou", "detect", "attack", "evaluate",
                                              "reextract", "mitigate", "audit", "demo"}
    for argv, needle in cases:
        code, res = _run(argv, capsys)
        err = res.err
        assert code == 2, (argv, err)
        assert err.startswith("diffmem: error:") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err and needle in err, (argv, err)
        for name in ("out", "out.txt", "out.csv", "out.json"):
            assert not (tmp_path / name).exists(), (argv, name)


def test_long_prompts_are_reported_once_in_one_line(model_dir, tmp_path, capsys, caplog):
    long = "a red cat " * 40
    _write(tmp_path / "p.txt", [long, long, "a red cat"])
    code, res = _run(["detect", model_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "d.jsonl",
                      "--seeds", "1", *SAMPLING], capsys)
    assert code == 0
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(lines) == 1 and "2 of 3 prompts" in lines[0] and "\n" not in lines[0]
    assert "truncated because CLIP" not in res.err + res.out and long not in res.err
