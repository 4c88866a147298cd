"""Scale-out: two CPU processes equal one, uneven shards, resumable recording, mixed precision, non-finite checks.

The multi-process tests share one ``accelerate launch --multi_gpu --num_processes 2`` run on the CPU (gloo, no GPU
visible) of ``tests/_dist_worker.py``, whose jobs call the library directly (record, detect, evaluate, attack);
starting the launcher once keeps the file fast on a small machine. The same jobs also run in this single process,
and the results are compared with tolerances that follow from the arithmetic:

* Every job makes one pipeline call per prompt (``batch_size=1``; for the images, one image or one prompt's
  generations per call), so each prompt goes through the very same operations in both runs; only the order in
  which per-prompt results are added differs.
* Counts, per-prompt values (detection scores, images, similarities, signatures) and everything derived from them
  alone are therefore equal exactly.
* A sum of ``n`` fp32 terms, added in any order, is within ``gamma_(n-1) * sum(|x|)`` of the exact sum
  (``gamma_k = k u / (1 - k u)``, ``u = eps / 2``), so two orders differ by at most ``n * eps * sum(|x|)``. The
  recorded statistics are such sums over the ``n = count`` token rows of a step, with ``sum(|x|)`` the sum itself
  for the non-negative ``sumsq`` and ``normsq``, and at most ``sqrt(n * sumsq)`` (Cauchy-Schwarz) for ``sum``.
* A mask located from either statistics is the same, except where a weight's score lies within the propagated
  bound of its row's selection boundary; such a weight is named in a warning, any other difference fails.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist_worker import record_config, run_jobs

from diffmem.config import LocateConfig, RecordConfig, SamplerConfig
from diffmem.edits import Mask
from diffmem.errors import DiffmemError
from diffmem.recording import record
from diffmem.localization import locate, stats_act_norm
from diffmem.parallel import shard_bounds, shard_map
from diffmem.resume import CHECKPOINT_FORMAT, checkpoint_dir, record_resumable, record_to_file
from diffmem.stats import ActivationStats, stats_paths

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_dist_worker.py"
FIRST_FFN = "down_blocks.1.attentions.0.transformer_blocks.0.ff"
COLOURS = "red green blue yellow white black orange purple pink gray brown".split()
THINGS = "cat dog car tree house circle square triangle star".split()
EPS = torch.finfo(torch.float32).eps
LOCATE = LocateConfig(record_steps=2)

FIVE = ["a red cat", "a blue dog on the sky", "the green tree", "a photo of a yellow star",
        "a white house with a black car"]
ONE = ["an orange circle on pink background"]
BASE = ["a gray square", "a brown triangle", "a purple emblem", "a green logo"]
CALIBRATION = ["a pink car", "a black tree", "a white star"]


# ---------------------------------------------------------------------------------------------------------------
# tolerances from the arithmetic


def sum_bound(n_terms: torch.Tensor, abs_sum: torch.Tensor) -> torch.Tensor:
    """Largest difference between two fp32 sums of the same ``n_terms`` terms added in different orders."""
    return n_terms * EPS * abs_sum


def stats_bounds(a: ActivationStats, b: ActivationStats, half: str, name: str) -> dict[str, torch.Tensor]:
    """Per-element bounds of ``sum``, ``sumsq`` and ``normsq`` of one layer and half (see the module docstring)."""
    x, y = a.halves[half][name], b.halves[half][name]
    n = x.count.to(torch.float64).unsqueeze(1)  # the counts are equal (checked first)
    sumsq = torch.maximum(x.sumsq, y.sumsq).double() * (1 + n * EPS)  # above the exact sum of squares
    return {
        "sum": sum_bound(n, torch.sqrt(n * sumsq)),
        "sumsq": sum_bound(n, sumsq),
        "normsq": sum_bound(n, torch.maximum(x.normsq, y.normsq).double() * (1 + n * EPS)),
    }


def assert_stats_match(a: ActivationStats, b: ActivationStats, exact_signatures: bool = True) -> None:
    """Same layout, equal counts, sums within the summation-order bound, equal signatures."""
    assert list(a.layers.items()) == list(b.layers.items())
    assert a.steps == b.steps and list(a.halves) == list(b.halves)
    for half in a.halves:
        for name in a.layers:
            x, y = a.halves[half][name], b.halves[half][name]
            assert x.sum.dtype == torch.float32 and x.count.dtype == torch.int64
            assert torch.equal(x.count, y.count), (half, name)
            for field, bound in stats_bounds(a, b, half, name).items():
                diff = (getattr(x, field).double() - getattr(y, field).double()).abs()
                worst = int(torch.argmax(diff - bound))
                step, feature = divmod(worst, diff.shape[1])
                assert bool((diff <= bound).all()), (
                    f"{half}/{name}/{field}[{step}, {feature}] differs by {float(diff.flatten()[worst]):.3g}, more "
                    f"than the fp32 bound {float(bound.flatten()[worst]):.3g} for {int(x.count[step])} terms"
                )
    assert (a.signatures is None) == (b.signatures is None)
    if a.signatures is not None:
        for name in a.layers:
            if exact_signatures:  # one prompt's signature comes from one pipeline call in both runs
                assert torch.equal(a.signatures[name], b.signatures[name]), name
            else:
                torch.testing.assert_close(a.signatures[name], b.signatures[name])


def act_norm_bound(a: ActivationStats, b: ActivationStats, name: str, half: str = "cond") -> torch.Tensor:
    """Bound of ``|act_norm_a - act_norm_b|``, ``act_norm = sqrt(normsq / count)``, from the ``normsq`` bound.

    ``sqrt(p) - sqrt(q) = (p - q) / (sqrt(p) + sqrt(q))``; the division and the square root add a few ulp.
    """
    n = a.halves[half][name].count.to(torch.float64).clamp_min(1).unsqueeze(1)
    da, db = stats_act_norm(a, name, half).double(), stats_act_norm(b, name, half).double()
    d_normsq = stats_bounds(a, b, half, name)["normsq"]
    return d_normsq / (n * (da + db).clamp_min(torch.finfo(torch.float64).tiny)) + 4 * EPS * torch.maximum(da, db)


def mask_differences(
    ma: Mask, mb: Mask, stats_a: ActivationStats, stats_b: ActivationStats, base: ActivationStats, weights, config
) -> tuple[list[str], list[str]]:
    """Weights selected by one mask only, split into near ties (explained by the bounds) and the others.

    At step ``t`` weight ``(i, j)`` is selected when its score ``|W_ij| * a_j`` is among the row's top ``k`` and beats
    the base score. A difference of ``a`` within :func:`act_norm_bound` can flip that only where the score lies
    within ``|W_ij| * da_j + max_l |W_il| * da_l`` of its competitor (the ``k + 1``-th score of the row for a weight
    among the top ``k``, else the ``k``-th), or within ``|W_ij| * da_j`` of the base score.
    """
    ties, others = [], []
    for name, a_layer in ma.layers.items():
        differ = torch.nonzero(a_layer ^ mb.layers[name])
        if not differ.numel():
            continue
        absw = weights[name].detach().double().abs()
        in_f = absw.shape[1]
        k = int(config.ratio * in_f) if config.k_rounding == "floor" else min(
            in_f, max(1, math.ceil(round(config.ratio * in_f, 9))))
        a_mem = stats_act_norm(stats_a, name, config.half).double()[: config.record_steps]
        a_base = stats_act_norm(base, name, config.half).double()[: config.record_steps]
        delta = act_norm_bound(stats_a, stats_b, name, config.half)[: config.record_steps]
        for i, j in differ.tolist():
            near = []
            for t in range(a_mem.shape[0]):
                row, base_score = absw[i] * a_mem[t], float(absw[i, j] * a_base[t, j])
                # the propagated bound, plus the rounding of the fp32 products the library compares
                tol_j = float(absw[i, j] * delta[t, j]) + EPS * max(float(row[j]), base_score)
                tol_row = tol_j + float((absw[i] * delta[t]).max()) + EPS * float(row.max())
                # a selected weight competes with the (k + 1)-th score of its row, an unselected one with the k-th
                top = torch.topk(row, min(k + 1, in_f)).values.tolist() + [-math.inf]
                score = float(row[j])
                gap = score - top[k] if score >= top[k - 1] else top[k - 1] - score
                if gap <= tol_row or abs(float(row[j]) - base_score) <= tol_j:
                    near.append(t)
            if near:
                ties.append(f"{name}[{i}, {j}] (a tie within the bound at steps {near})")
            else:
                others.append(f"{name}[{i}, {j}]")
    return ties, others


def assert_same_mask(ma: Mask, mb: Mask, stats_a, stats_b, base, weights, config=LOCATE) -> None:
    """The masks are equal, or differ only at weights whose selection is a tie within the summation bound."""
    assert list(ma.layers) == list(mb.layers)
    ties, others = mask_differences(ma, mb, stats_a, stats_b, base, weights, config)
    assert not others, (
        f"the masks differ at {len(others)} weights whose scores lie farther than the fp32 summation bound from "
        f"the selection boundary: {others[:5]}" + (f"; near ties elsewhere: {ties[:5]}" if ties else "")
    )
    if ties:
        warnings.warn(f"the masks differ only at near ties within the fp32 summation bound: {ties[:5]}", stacklevel=2)


def test_mask_differences_tell_ties_from_real_changes() -> None:
    """Two columns tied to 1e-6 may swap places within the bound; a real change of the activations may not."""
    from diffmem.localization import select_wanda
    from diffmem.stats import LayerStats

    def stats(norms: list[float], tokens: int = 1000) -> ActivationStats:
        a = torch.tensor([norms], dtype=torch.float32)
        layer = LayerStats(torch.tensor([tokens]), torch.zeros(1, 4), torch.zeros(1, 4), a * a * tokens)
        return ActivationStats({"x": (1, 4)}, 1, halves={"cond": {"x": layer}})

    weights = {"x": torch.ones(1, 4)}
    config = LocateConfig(ratio=0.25, record_steps=1)  # one weight per row
    base = stats([0.0] * 4)
    a, tied = stats([1.0, 1.0 - 1e-6, 0.5, 0.5]), stats([1.0 - 1e-6, 1.0, 0.5, 0.5])
    clear, moved = stats([1.0, 0.9, 0.5, 0.5]), stats([0.9, 1.0, 0.5, 0.5])
    ma, mt, mc, mm = (select_wanda(s, base, weights, config) for s in (a, tied, clear, moved))
    assert ma.indices()["x"].tolist() == [0] == mc.indices()["x"].tolist()
    assert mt.indices()["x"].tolist() == [1] == mm.indices()["x"].tolist()
    ties, others = mask_differences(ma, mt, a, tied, base, weights, config)
    assert len(ties) == 2 and others == []
    with pytest.warns(UserWarning, match="near ties"):
        assert_same_mask(ma, mt, a, tied, base, weights, config)
    ties, others = mask_differences(mc, mm, clear, moved, base, weights, config)
    assert ties == [] and others == ["x[0, 0]", "x[0, 1]"]
    with pytest.raises(AssertionError, match="differ at 2 weights"):
        assert_same_mask(mc, mm, clear, moved, base, weights, config)


def test_sum_bound_covers_any_order_and_nothing_more() -> None:
    """The bound holds for reordered fp32 sums of ill-conditioned data, and a real change of one term exceeds it."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(20_000, generator=g) * torch.logspace(-3, 3, 20_000)).float()
    exact = float(x.double().sum())
    bound = float(sum_bound(torch.tensor(x.numel(), dtype=torch.float64), x.double().abs().sum()))
    for seed in range(5):
        perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))
        serial = torch.zeros((), dtype=torch.float32)
        for chunk in x[perm].split(997):  # blocks added one after another, as the recorder does
            serial += chunk.sum()
        assert abs(float(serial) - float(x.sum())) <= bound
        assert abs(float(serial) - exact) <= bound / 2
    assert bound < 1e-2 * float(x.abs().sum())  # not vacuous


# ---------------------------------------------------------------------------------------------------------------
# sharding and error propagation


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


def test_shard_map_in_one_process_is_a_plain_call():
    assert shard_map(lambda items: [x * x for x in items], [1, 2, 3]) == [1, 4, 9]
    assert shard_map(lambda items: [], []) == []


class _FakeState:
    """Rank 0 of two processes, for the error-propagation logic without a process group."""

    num_processes, process_index, is_main_process = 2, 0, True


def test_a_failure_on_any_process_is_raised_on_all(monkeypatch):
    import diffmem.parallel as parallel

    monkeypatch.setattr(parallel, "gather_all", lambda obj, state: [obj, "non-finite activations in layer x at step 1"])
    with pytest.raises(DiffmemError, match="^process 1 failed: non-finite activations in layer x at step 1$"):
        parallel.run_everywhere(lambda: 1, _FakeState())

    def fail():
        raise DiffmemError("own error")

    with pytest.raises(DiffmemError, match="^own error$"):  # the failing process keeps its own error
        parallel.run_everywhere(fail, _FakeState())
    monkeypatch.setattr(parallel, "gather_all", lambda obj, state: [obj, None])
    assert parallel.run_everywhere(lambda: 7, _FakeState()) == 7


def test_single_process_cpu_launch_is_warned(monkeypatch, caplog):
    import diffmem.parallel as parallel

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(parallel, "_warned_single_cpu", False)
    caplog.set_level(logging.WARNING, logger="diffmem")
    assert parallel.distributed_state().num_processes == 1
    assert "--mpirun_hostfile" in caplog.text and "--multi_gpu" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# two processes equal one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_pipe) -> dict[str, Path]:
    """A saved tiny model, a manifest with reference images, base statistics and a mask, in one folder."""
    from PIL import Image

    from diffmem.data import ManifestEntry, write_manifest
    from diffmem.pipelines import load_pipeline

    root = tmp_path_factory.mktemp("dist")
    model = root / "model"
    tiny_pipe.save_pretrained(model)
    files = {"root": root, "model": model}
    rng = np.random.default_rng(0)
    entries = []
    for i, prompt in enumerate(FIVE):
        ref = root / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref)
        split = "locate" if i < 2 else "heldout" if i < 4 else "nonmem"
        entries.append(ManifestEntry(prompt, split != "nonmem", 3 if split != "nonmem" else 0, split, str(ref), {}))
    files["manifest"] = write_manifest(entries, root / "manifest.jsonl")
    # statistics and a mask made in this process: the base of every `locate`, and the edit that `evaluate` applies
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    base = record_to_file(pipe, BASE, record_config({}), out=root / "base", model_id=str(model), progress=False)
    mem = record_to_file(pipe, FIVE, record_config({}), out=root / "mem", progress=False)
    files["mask"] = locate(pipe, mem, base, LOCATE).save(root / "mask")
    files["base"] = root / "base"
    return files


def _jobs(files: dict[str, Path], out: Path) -> dict:
    """The jobs compared between two processes and one, writing under ``out``."""
    manifest = str(files["manifest"])
    return {
        "model": str(files["model"]),
        "root": str(out),
        "jobs": [
            {"kind": "record", "name": "record", "prompts": FIVE, "signatures": True, "out": str(out / "stats")},
            {"kind": "record", "name": "record_one", "prompts": ONE, "signatures": True, "out": str(out / "one")},
            {"kind": "record", "name": "record_ckpt", "prompts": FIVE, "checkpoint_every": 1,
             "out": str(out / "ckpt")},
            {"kind": "detect", "name": "detect", "manifest": manifest, "calibration": CALIBRATION,
             "out": str(out / "detect.json")},
            {"kind": "evaluate", "name": "evaluate", "manifest": manifest, "edit": str(files["mask"]),
             "out": str(out / "eval.json")},
            {"kind": "attack", "name": "attack", "manifest": manifest, "calibration": CALIBRATION,
             "out": str(out / "attack")},
        ],
    }


@pytest.fixture(scope="module")
def runs(work) -> dict:
    """Every job run once in this process (``one``) and once in two launched CPU processes (``two``)."""
    one, two = work["root"] / "one", work["root"] / "two"
    one.mkdir()
    two.mkdir()
    spec_file = work["root"] / "jobs.json"
    spec_file.write_text(json.dumps(_jobs(work, two)), encoding="utf-8")
    launch = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(WORKER), str(spec_file),
    ]
    proc = subprocess.Popen(launch, env=_env(), cwd=work["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        run_jobs(_jobs(work, one))  # overlaps with the launcher's start-up
        log, _ = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return {"one": one, "two": two, "log": log}


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_every_process_gets_the_full_result(runs):
    for name in ("record", "record_one", "record_ckpt", "detect", "evaluate", "attack"):
        assert _json(runs["two"] / f"{name}.processes.json") == {"num_processes": 2, "same_on_every_process": True}
        assert _json(runs["one"] / f"{name}.processes.json")["num_processes"] == 1


@pytest.mark.slow
def test_record_two_processes_equals_one(runs, work):
    one, two = ActivationStats.load(runs["one"] / "stats"), ActivationStats.load(runs["two"] / "stats")
    assert_stats_match(two, one)
    assert two.signatures[next(iter(two.layers))].shape[0] == 5
    assert two.meta == one.meta and two.meta["num_prompts"] == 5
    # locating on either statistics gives the same mask (up to ties within the summation bound)
    from diffmem.pipelines import load_pipeline

    pipe = load_pipeline(str(work["model"]))
    base = ActivationStats.load(work["base"])
    a, b = locate(pipe, one, base, LOCATE), locate(pipe, two, base, LOCATE)
    assert a.num_masked() > 0
    weights = {name: pipe.unet.get_submodule(name).weight for name in a.layers}
    assert_same_mask(a, b, one, two, base, weights)


@pytest.mark.slow
def test_record_fewer_prompts_than_processes(runs):
    one, two = ActivationStats.load(runs["one"] / "one"), ActivationStats.load(runs["two"] / "one")
    assert_stats_match(two, one)
    assert two.signatures[next(iter(two.layers))].shape[0] == 1


@pytest.mark.slow
def test_record_checkpointed_two_processes(runs):
    # 3 + 2 prompts in rounds of one: the second process idles through the last round and its checkpoint
    assert_stats_match(ActivationStats.load(runs["two"] / "ckpt"), ActivationStats.load(runs["one"] / "ckpt"))
    assert not checkpoint_dir(runs["two"] / "ckpt").exists()


@pytest.mark.slow
def test_only_the_main_process_writes(runs):
    def names(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    assert names(runs["two"]) == names(runs["one"])
    assert "attack/attack.json" in names(runs["two"]) and "stats.safetensors" in names(runs["two"])


@pytest.mark.slow
def test_detect_two_processes_equals_one(runs):
    # each prompt is scored in its own pipeline call in both runs: the scores, and all that follows, are equal
    one, two = _json(runs["one"] / "detect.json"), _json(runs["two"] / "detect.json")
    assert two["prompts"] == one["prompts"] == FIVE
    assert two["scores"] == one["scores"]
    assert two["flagged"] == one["flagged"]
    cost_one, cost_two = one["summary"].pop("cost"), two["summary"].pop("cost")
    assert two["summary"] == one["summary"] and two["summary"]["auc"] is not None
    # the cost covers the whole run: the same denoiser work in total, however many processes shared it
    assert (cost_two["denoiser_calls"], cost_two["denoiser_rows"]) == (cost_one["denoiser_calls"],
                                                                       cost_one["denoiser_rows"])


@pytest.mark.slow
def test_evaluate_two_processes_equals_one(runs):
    # one image per pipeline call in both runs: the images, hence every similarity, are equal
    one, two = _json(runs["one"] / "eval.json"), _json(runs["two"] / "eval.json")
    for key in ("rows_before", "rows_after"):
        assert [r["index"] for r in two[key]] == list(range(5))
        assert [r["prompt"] for r in two[key]] == FIVE
    assert two == one


@pytest.mark.slow
def test_attack_two_processes_equals_one(runs):
    # one prompt's generations per pipeline call in both runs: the strengths and the threshold are equal
    one, two = (_json(runs[k] / "attack" / "attack.json") for k in ("one", "two"))
    assert [r["prompt"] for r in two["rows"]] == FIVE
    assert two == one
    assert two["calibration"]["num_prompts"] == 3


# ---------------------------------------------------------------------------------------------------------------
# resumable recording


def _many_prompts(n: int) -> list[str]:
    return [f"a {COLOURS[i % len(COLOURS)]} {THINGS[(i // len(COLOURS)) % len(THINGS)]}" for i in range(n)]


@pytest.mark.slow
def test_record_resumes_after_sigkill(work, caplog):
    root = work["root"] / "resume"
    root.mkdir()
    out = root / "stats"
    job = {"kind": "record", "name": "record", "prompts": _many_prompts(40), "checkpoint_every": 2, "out": str(out)}
    spec = {"model": str(work["model"]), "root": str(root), "jobs": [job]}
    spec_file = root / "jobs.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    progress = checkpoint_dir(out) / "progress.json"
    # each chunk of 2 prompts waits 0.25 s first, so the kill lands long before the 20th and last chunk
    proc = subprocess.Popen([sys.executable, str(WORKER), "--delay", "0.25", str(spec_file)], env=_env(),
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
    run_jobs(spec)  # the same job again, in this process
    assert f"{sum(info['done'])} of 40 prompts already recorded" in caplog.text, caplog.text
    assert not checkpoint_dir(out).exists()
    run_jobs({**spec, "jobs": [{**job, "checkpoint_every": 0, "out": str(root / "full")}]})
    resumed, full = ActivationStats.load(out), ActivationStats.load(root / "full")
    assert_stats_match(resumed, full)
    assert resumed.meta == full.meta


def test_record_ignores_checkpoint_of_other_inputs(tiny_pipe, prompts, tmp_path, caplog):
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, height=16, width=16), record_steps=2,
                          batch_size=1)
    folder = checkpoint_dir(tmp_path / "stats")
    folder.mkdir()
    (folder / "progress.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "key": "other", "done": [3],
                                                      "files": [None]}))
    caplog.set_level(logging.INFO, logger="diffmem")
    stats = record_to_file(tiny_pipe, prompts[:3], config, out=tmp_path / "stats", checkpoint_every=1,
                           progress=False)
    assert "ignoring checkpoint" in caplog.text and "resuming" not in caplog.text
    assert_stats_match(stats, record(tiny_pipe, prompts[:3], config, progress=False))
    assert not folder.exists() and stats_paths(tmp_path / "stats")[0].is_file()
    with pytest.raises(ValueError, match="checkpoint_every"):
        record_to_file(tiny_pipe, prompts[:3], config, checkpoint_every=1, progress=False)
    folder.mkdir()
    (folder / "progress.json").write_text("{broken")
    with pytest.raises(DiffmemError, match=f"cannot read checkpoint .*; delete {re.escape(str(folder))} to start over"):
        record_to_file(tiny_pipe, prompts[:3], config, out=tmp_path / "stats", checkpoint_every=1, progress=False)


def test_resumable_recording_rejects_bad_inputs(tiny_pipe):
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, height=16, width=16), record_steps=2)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        record_resumable(tiny_pipe, [], config, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every=-1"):
        record_resumable(tiny_pipe, ["a red cat"], config, checkpoint_every=-1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# mixed precision and non-finite activations


def test_bfloat16_model_records_fp32_statistics(tiny_pipe, prompts):
    # a bf16 model is another model (8 bits of mantissa), not a reordering: the tolerance is bf16's, loosely
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, height=16, width=16), record_steps=2,
                          batch_size=3)
    full = record_resumable(tiny_pipe, prompts[:3], config, progress=False)
    half = record_resumable(copy.deepcopy(tiny_pipe).to(torch.bfloat16), prompts[:3], config, progress=False)
    for name in full.layers:
        for h in full.halves:
            x, y = half.halves[h][name], full.halves[h][name]
            assert x.sum.dtype == torch.float32 and torch.equal(x.count, y.count)
            for field in ("sum", "sumsq", "normsq"):
                u, v = getattr(x, field), getattr(y, field)
                torch.testing.assert_close(u, v, rtol=0.1, atol=0.05 * float(v.abs().max()))


def test_nonfinite_activation_names_layer_and_step(fresh_tiny_pipe, prompts):
    layer = fresh_tiny_pipe.unet.get_submodule(f"{FIRST_FFN}.net.2")
    calls = []

    def poison(module, args):
        calls.append(1)
        return (torch.where(torch.arange(args[0].shape[-1]) == 3, float("inf"), args[0]),) if len(calls) == 2 else None

    layer.register_forward_pre_hook(poison)
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=3, height=16, width=16), record_steps=3,
                          batch_size=2)
    with pytest.raises(DiffmemError, match=rf"non-finite .* layer {FIRST_FFN}\.net\.2 at step 1"):
        record_resumable(fresh_tiny_pipe, prompts[:2], config, progress=False)


def test_nonfinite_weight_is_a_one_line_error_and_writes_nothing(fresh_tiny_pipe, prompts, tmp_path):
    with torch.no_grad():
        fresh_tiny_pipe.unet.get_submodule(f"{FIRST_FFN}.net.0.proj").weight[0, 0] = float("inf")
    pipe = fresh_tiny_pipe.to(torch.bfloat16)
    config = RecordConfig(sampler=SamplerConfig(num_inference_steps=2, height=16, width=16), record_steps=2,
                          batch_size=2)
    with pytest.raises(DiffmemError) as err:
        record_to_file(pipe, prompts[:1], config, out=tmp_path / "stats", progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("non-finite activations (inf/NaN)")
    assert f"layer {FIRST_FFN}.net.2 at step 0" in message
    assert list(tmp_path.iterdir()) == []
