"""Scale-out: two CPU processes equal one, uneven shards, resumable recording, mixed precision, non-finite checks.

The multi-process tests share one ``accelerate launch --multi_gpu --num_processes 2`` run on the CPU (gloo, no
GPU visible) of ``tests/_dist_worker.py``, which runs the ``diffmem`` command lines of every comparison in the
same two processes; starting the launcher once keeps the file fast on a small machine. Each result is compared
with the same command run in this (single) process.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmem.cli import main as cli_main
from diffmem.config import RecordConfig
from diffmem.distributed import (
    CHECKPOINT_FORMAT,
    checkpoint_dir,
    record_distributed,
    shard_bounds,
)
from diffmem.errors import DiffmemError
from diffmem.hooks import record
from diffmem.locate import Mask, mask_iou
from diffmem.stats import ActivationStats, stats_paths

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_dist_worker.py"
SAMPLING = ["--steps", "2", "--height", "16", "--width", "16"]
RECORD = ["--record-steps", "2", "--batch-size", "2", *SAMPLING]
FIRST_FFN = "down_blocks.1.attentions.0.transformer_blocks.0.ff"
COLOURS = "red green blue yellow white black orange purple pink gray brown".split()
THINGS = "cat dog car tree house circle square triangle star".split()


def assert_stats_close(a: ActivationStats, b: ActivationStats, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same layout and counts; sums equal up to fp32 summation order (``atol`` relative to each tensor's scale)."""
    assert list(a.layers.items()) == list(b.layers.items())
    assert a.steps == b.steps and list(a.halves) == list(b.halves)
    for half in a.halves:
        for name in a.layers:
            x, y = a.halves[half][name], b.halves[half][name]
            assert x.sum.dtype == torch.float32 and x.count.dtype == torch.int64
            assert torch.equal(x.count, y.count), (half, name)
            for field in ("sum", "sumsq", "normsq"):
                u, v = getattr(x, field), getattr(y, field)
                torch.testing.assert_close(u, v, rtol=rtol, atol=atol * float(v.abs().max()))
    assert (a.signatures is None) == (b.signatures is None)
    if a.signatures is not None:
        for name in a.layers:
            torch.testing.assert_close(a.signatures[name], b.signatures[name], rtol=rtol, atol=atol)


def assert_same(a, b, rel: float = 1e-6, path: str = "") -> None:
    """Equal JSON-like structures; floats equal to ``rel``, everything else (keys, order, strings) exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=rel, abs=1e-12, nan_ok=True), path
    else:
        assert a == b, path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _cli(argv: list[str]) -> None:
    assert cli_main(argv) == 0, argv


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_pipe) -> dict[str, Path]:
    """A saved tiny model, prompt files, a manifest with reference images and a mask, in one folder."""
    from PIL import Image

    from diffmem.data import ManifestEntry, write_manifest

    root = tmp_path_factory.mktemp("dist")
    model = root / "model"
    tiny_pipe.save_pretrained(model)
    files = {"root": root, "model": model}
    prompt_sets = {
        "five": ["a red cat", "a blue dog on the sky", "the green tree", "a photo of a yellow star",
                 "a white house with a black car"],
        "one": ["an orange circle on pink background"],
        "base": ["a gray square", "a brown triangle", "a purple emblem", "a green logo"],
        "calib": ["a pink car", "a black tree", "a white star"],
    }
    for name, lines in prompt_sets.items():
        files[name] = root / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    rng = np.random.default_rng(0)
    entries = []
    for i, prompt in enumerate(prompt_sets["five"]):
        ref = root / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref)
        split = "locate" if i < 2 else "heldout" if i < 4 else "nonmem"
        entries.append(ManifestEntry(prompt, split != "nonmem", 3 if split != "nonmem" else 0, split, str(ref), {}))
    files["manifest"] = write_manifest(entries, root / "manifest.jsonl")
    # statistics and a mask made in this process, used as the base of `locate` and as the edit of `evaluate`
    _cli(["record", str(model), "--prompts", str(files["base"]), "--out", str(root / "base"), *RECORD])
    _cli(["record", str(model), "--prompts", str(files["five"]), "--out", str(root / "mem"), *RECORD])
    files["mask"] = root / "mask"
    _cli(["locate", str(model), "--memorized", str(root / "mem"), "--base", str(root / "base"),
          "--out", str(files["mask"]), "--steps", "2"])
    return files


def _commands(files: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """The command lines compared between two processes and one, writing under ``out``."""
    model = str(files["model"])
    return {
        "record": ["record", model, "--prompts", str(files["five"]), "--out", str(out / "stats"), "--signatures",
                   *RECORD],
        "record_one": ["record", model, "--prompts", str(files["one"]), "--out", str(out / "one"), "--signatures",
                       *RECORD],
        "record_ckpt": ["record", model, "--prompts", str(files["five"]), "--out", str(out / "ckpt"),
                        "--checkpoint-every", "1", *RECORD],
        "detect": ["detect", model, "--prompts", str(files["manifest"]), "--out", str(out / "detect.jsonl"),
                   "--calibration", str(files["calib"]), "--k", "2", "--seeds", "2", "--batch-size", "2", *SAMPLING],
        "evaluate": ["evaluate", model, "--prompts", str(files["manifest"]), "--out", str(out / "eval.json"),
                     "--mask", str(files["mask"]), "--scorer", "ssim", "--seeds", "2", "--batch-size", "1", *SAMPLING],
        "attack": ["attack", model, "--prompts", str(files["manifest"]), "--out", str(out / "attack"),
                   "--references", str(files["manifest"]), "--calibration", str(files["calib"]), "--scorer", "ssim",
                   "--generations", "3", "--clique", "2", "--batch-size", "3", *SAMPLING],
    }


@pytest.fixture(scope="module")
def runs(work) -> dict[str, Path]:
    """Every command run once in this process (``one``) and once in two launched CPU processes (``two``)."""
    one, two = work["root"] / "one", work["root"] / "two"
    one.mkdir()
    two.mkdir()
    commands_file = work["root"] / "commands.json"
    commands_file.write_text(json.dumps(list(_commands(work, two).values())), encoding="utf-8")
    launch = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(WORKER), str(commands_file),
    ]
    proc = subprocess.Popen(launch, env=_env(), cwd=work["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        for argv in _commands(work, one).values():  # overlaps with the launcher's start-up
            _cli(argv)
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return {"one": one, "two": two, "log": log}


# ---------------------------------------------------------------------------------------------------------------
# sharding


@pytest.mark.parametrize("n", [0, 1, 2, 5, 6, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_bounds_cover_in_order(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(n, world, world)


class _FakeState:
    """Rank 0 of two processes, for the error-propagation logic without a process group."""

    num_processes, process_index, is_main_process = 2, 0, True


def test_a_failure_on_any_process_is_raised_on_all(monkeypatch):
    import diffmem.distributed as dist

    monkeypatch.setattr(dist, "_all_gather", lambda obj, state: [obj, "non-finite activations in layer x at step 1"])
    with pytest.raises(DiffmemError, match="^process 1 failed: non-finite activations in layer x at step 1$"):
        dist._run(lambda: 1, _FakeState())

    def fail():
        raise DiffmemError("own error")

    with pytest.raises(DiffmemError, match="^own error$"):  # the failing process keeps its own error
        dist._run(fail, _FakeState())
    monkeypatch.setattr(dist, "_all_gather", lambda obj, state: [obj, None])
    assert dist._run(lambda: 7, _FakeState()) == 7


def test_single_process_cpu_launch_is_warned(monkeypatch, caplog):
    import diffmem.distributed as dist

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(dist, "_warned_single_cpu", False)
    caplog.set_level(logging.WARNING, logger="diffmem")
    assert dist.distributed_state().num_processes == 1
    assert "--mpirun_hostfile" in caplog.text and "--multi_gpu" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# two processes equal one


def test_record_two_processes_equals_one(runs, work):
    one, two = ActivationStats.load(runs["one"] / "stats"), ActivationStats.load(runs["two"] / "stats")
    assert_stats_close(two, one)
    assert two.signatures[next(iter(two.layers))].shape[0] == 5
    assert two.meta == one.meta and two.meta["num_prompts"] == 5
    assert "process 1 of 2 records prompts 3..5" in runs["log"]
    # locating on either statistics gives the very same mask
    for run in ("one", "two"):
        _cli(["locate", str(work["model"]), "--memorized", str(runs[run] / "stats"),
              "--base", str(work["root"] / "base"), "--out", str(runs[run] / "mask"), "--steps", "2"])
    a, b = Mask.load(runs["one"] / "mask"), Mask.load(runs["two"] / "mask")
    assert a.num_masked() > 0
    assert mask_iou(a, b)["overall"] == 1.0
    assert all(torch.equal(a.indices()[k], b.indices()[k]) for k in a.layers)


def test_record_fewer_prompts_than_processes(runs):
    one, two = ActivationStats.load(runs["one"] / "one"), ActivationStats.load(runs["two"] / "one")
    assert_stats_close(two, one)
    assert two.signatures[next(iter(two.layers))].shape[0] == 1


def test_record_checkpointed_two_processes(runs):
    # 3 + 2 prompts in rounds of one: the second process idles through the last round and its checkpoint
    assert_stats_close(ActivationStats.load(runs["two"] / "ckpt"), ActivationStats.load(runs["one"] / "ckpt"))
    assert not checkpoint_dir(runs["two"] / "ckpt").exists()


def test_only_the_main_process_writes(runs):
    def names(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.name.startswith("mask"))

    assert names(runs["two"]) == names(runs["one"])


def test_detect_two_processes_equals_one(runs):
    rows = {k: [json.loads(ln) for ln in (runs[k] / "detect.jsonl").read_text().splitlines()] for k in ("one", "two")}
    assert [r["prompt"] for r in rows["two"]] == [r["prompt"] for r in rows["one"]]
    assert [r["flagged"] for r in rows["two"]] == [r["flagged"] for r in rows["one"]]
    np.testing.assert_allclose([r["score"] for r in rows["two"]], [r["score"] for r in rows["one"]], rtol=1e-5)
    s1, s2 = (json.loads((runs[k] / "detect.summary.json").read_text())["summary"] for k in ("one", "two"))
    assert s2["auc"] == s1["auc"] and s2["num_flagged"] == s1["num_flagged"]
    assert s2["threshold"] == pytest.approx(s1["threshold"], rel=1e-5)


def test_evaluate_two_processes_equals_one(runs):
    one, two = (json.loads((runs[k] / "eval.json").read_text()) for k in ("one", "two"))
    assert "_results" not in two
    for key in ("rows_before", "rows_after"):
        assert [r["index"] for r in two[key]] == list(range(5))
        assert [r["prompt"] for r in two[key]] == [r["prompt"] for r in one[key]]
    assert_same(two, one)


def test_attack_two_processes_equals_one(runs):
    one, two = (json.loads((runs[k] / "attack" / "attack.json").read_text()) for k in ("one", "two"))
    assert [r["prompt"] for r in two["rows"]] == [r["prompt"] for r in one["rows"]]
    assert_same(two, one)
    assert two["calibration"]["num_prompts"] == 3


# ---------------------------------------------------------------------------------------------------------------
# resumable recording


def _many_prompts(n: int) -> list[str]:
    return [f"a {COLOURS[i % len(COLOURS)]} {THINGS[(i // len(COLOURS)) % len(THINGS)]}" for i in range(n)]


def test_record_resumes_after_sigkill(work, caplog):
    root = work["root"] / "resume"
    root.mkdir()
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(_many_prompts(40)) + "\n", encoding="utf-8")
    out = root / "stats"
    argv = ["record", str(work["model"]), "--prompts", str(prompt_file), "--out", str(out), "--checkpoint-every", "2",
            *RECORD]
    commands = root / "commands.json"
    commands.write_text(json.dumps([argv]), encoding="utf-8")
    progress = checkpoint_dir(out) / "progress.json"
    # each chunk of 2 prompts waits 0.25 s first, so the kill lands long before the 20th and last chunk
    proc = subprocess.Popen([sys.executable, str(WORKER), "--delay", "0.25", str(commands)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not progress.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    info = json.loads(progress.read_text())
    assert info["format"] == CHECKPOINT_FORMAT and 0 < info["done"][0] < 40
    assert not stats_paths(out)[0].exists()

    caplog.set_level(logging.INFO, logger="diffmem")
    _cli(argv)
    assert f"{sum(info['done'])} of 40 prompts already recorded" in caplog.text, caplog.text
    assert not checkpoint_dir(out).exists()
    _cli(["record", str(work["model"]), "--prompts", str(prompt_file), "--out", str(root / "full"), *RECORD])
    resumed, full = ActivationStats.load(out), ActivationStats.load(root / "full")
    assert_stats_close(resumed, full)
    assert resumed.meta == full.meta


def test_record_ignores_checkpoint_of_other_inputs(tiny_pipe, prompts, tmp_path, caplog):
    config = RecordConfig(num_inference_steps=2, record_steps=2, batch_size=2, height=16, width=16)
    folder = checkpoint_dir(tmp_path / "stats")
    folder.mkdir()
    (folder / "progress.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "key": "other", "done": [3],
                                                      "files": [None]}))
    caplog.set_level(logging.INFO, logger="diffmem")
    stats = record_distributed(tiny_pipe, prompts[:3], config, out=tmp_path / "stats", checkpoint_every=1,
                               progress=False)
    assert "ignoring checkpoint" in caplog.text and "resuming" not in caplog.text
    assert_stats_close(stats, record(tiny_pipe, prompts[:3], config, progress=False))
    assert not folder.exists()
    with pytest.raises(ValueError, match="checkpoint_every"):
        record_distributed(tiny_pipe, prompts[:3], config, checkpoint_every=1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# mixed precision and non-finite activations


def test_bfloat16_model_records_fp32_statistics(tiny_pipe, prompts):
    config = RecordConfig(num_inference_steps=2, record_steps=2, batch_size=3, height=16, width=16)
    full = record_distributed(tiny_pipe, prompts[:3], config, progress=False)
    half = record_distributed(copy.deepcopy(tiny_pipe).to(torch.bfloat16), prompts[:3], config, progress=False)
    assert_stats_close(half, full, rtol=0.1, atol=0.05)


def test_nonfinite_activation_names_layer_and_step(fresh_tiny_pipe, prompts):
    layer = fresh_tiny_pipe.unet.get_submodule(f"{FIRST_FFN}.net.2")
    calls = []

    def poison(module, args):
        calls.append(1)
        return (torch.where(torch.arange(args[0].shape[-1]) == 3, float("inf"), args[0]),) if len(calls) == 2 else None

    layer.register_forward_pre_hook(poison)
    config = RecordConfig(num_inference_steps=3, record_steps=3, batch_size=2, height=16, width=16)
    with pytest.raises(DiffmemError, match=rf"non-finite .* layer {FIRST_FFN}\.net\.2 at step 1"):
        record_distributed(fresh_tiny_pipe, prompts[:2], config, progress=False)


def test_cli_nonfinite_weight_is_a_one_line_error(work, fresh_tiny_pipe, tmp_path, capsys):
    with torch.no_grad():
        fresh_tiny_pipe.unet.get_submodule(f"{FIRST_FFN}.net.0.proj").weight[0, 0] = float("inf")
    fresh_tiny_pipe.save_pretrained(tmp_path / "model")
    status = cli_main(["record", str(tmp_path / "model"), "--prompts", str(work["one"]), "--out",
                       str(tmp_path / "stats"), "--dtype", "bfloat16", *RECORD])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert [ln for ln in lines if "error" in ln] == lines[-1:]
    assert lines[-1].startswith("diffmem: error: non-finite activations (inf/NaN)")
    assert f"layer {FIRST_FFN}.net.2 at step 0" in lines[-1]
    assert not (tmp_path / "stats.safetensors").exists()
