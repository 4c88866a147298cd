"""Run diffmem's library stages, one job after another, in each process of one launched process group.

Test helper for ``tests/test_parallel.py``: starting ``accelerate launch`` costs far more than the tiny jobs
themselves, so the test launches this script once and every process runs the same list of jobs. Each job calls
one library function directly (:func:`diffmem.resume.record_to_file`, :func:`diffmem.detection.detect`,
:func:`diffmem.evaluation.evaluate_edit`, :func:`diffmem.extraction.extraction_attack`); the functions shard the
work over the processes themselves and every process gets the full result. The test runs the very same jobs in
its own single process through :func:`run_jobs`, so the two runs differ only in the number of processes.

After each job the processes compare digests of what they got, and the main process writes
``<job>.processes.json`` saying whether all agreed. Every other file is written by the library, or by the main
process here, exactly as an application would.

Usage: ``[accelerate launch ...] tests/_dist_worker.py [--delay SECONDS] jobs.json``, where ``jobs.json`` holds
``{"model": <pipeline folder>, "jobs": [{"kind": ..., "name": ..., ...}, ...]}``. ``--delay`` makes every recorded
chunk of prompts wait that long first, so that a test can kill a run between its checkpoints without racing it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

SAMPLER = {"num_inference_steps": 2, "height": 16, "width": 16}  # SamplerConfig fields of every job
"""Sampler settings of every job (the tiny pipeline's 16 px images: 8x8 latents)."""


def slow_down_recording(delay: float) -> None:
    """Make :func:`diffmem.recording.record` sleep ``delay`` seconds before each call.

    Args:
        delay: Seconds to wait per call.
    """
    import diffmem.recording

    record = diffmem.recording.record

    def slow_record(*args, **kwargs):
        time.sleep(delay)
        return record(*args, **kwargs)

    diffmem.recording.record = slow_record


def record_config(job: dict[str, Any]):
    """The :class:`~diffmem.config.RecordConfig` of a record job: one prompt per pipeline call, 2 steps recorded."""
    from diffmem.config import RecordConfig, SamplerConfig

    return RecordConfig(sampler=SamplerConfig(**SAMPLER), record_steps=2, batch_size=1,
                        signatures=bool(job.get("signatures", False)))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _stats_digest(stats) -> str:
    """sha256 of every tensor's bytes and of the metadata."""
    import torch

    digest = hashlib.sha256(_digest(stats.meta).encode("utf-8"))
    for name, tensor in sorted(stats.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_job(pipe, model: str, job: dict[str, Any]) -> str:
    """Run one job; the main process writes its outputs under ``job["out"]``.

    Args:
        pipe: The pipeline (each process holds its own).
        model: The pipeline's folder (its model id in the statistics).
        job: ``kind`` (``record``, ``detect``, ``evaluate`` or ``attack``), ``out`` and the job's inputs.

    Returns:
        A digest of the result this process got.
    """
    from diffmem.files import write_json
    from diffmem.parallel import is_main_process

    kind, out = job["kind"], Path(job["out"])
    if kind == "record":
        from diffmem.resume import record_to_file

        stats = record_to_file(pipe, job["prompts"], record_config(job), out=out, model_id=model,
                               checkpoint_every=int(job.get("checkpoint_every", 0)), progress=False)
        return _stats_digest(stats)

    from diffmem.config import SamplerConfig
    from diffmem.data import load_reference, read_manifest
    from diffmem.score import get_scorer

    entries = read_manifest(job["manifest"])
    prompts = [e.prompt for e in entries]
    if kind == "detect":
        from diffmem.detection import DetectConfig, detect

        config = DetectConfig(sampler=SamplerConfig(**SAMPLER), score_steps=2, num_seeds=2, batch_size=1)
        res = detect(pipe, prompts, config, labels=[e.memorized for e in entries],
                     calibration_prompts=job["calibration"], progress=False)
        result = {"prompts": res.prompts, "scores": [float(s) for s in res.scores],
                  "flagged": [bool(f) for f in res.flagged], "summary": res.summary()}
    elif kind == "evaluate":
        from diffmem.edits import load_edit
        from diffmem.evaluation import EvalConfig, evaluate_edit

        config = EvalConfig(sampler=SamplerConfig(**SAMPLER), num_seeds=2, batch_size=1)
        before, after = evaluate_edit(pipe, entries, config, get_scorer("ssim"), load_edit(job["edit"]),
                                      progress=False)
        result = {"rows_before": before.rows, "rows_after": after.rows, "summary_after": after.summary()}
    elif kind == "attack":
        from diffmem.extraction import ExtractionConfig, extraction_attack

        config = ExtractionConfig(num_generations=3, clique_size=2, batch_size=3, sampler=SamplerConfig(**SAMPLER))
        references = [None if e.reference is None else load_reference(e.reference, (16, 16)) for e in entries]
        res = extraction_attack(pipe, prompts, config, get_scorer("ssim"), references=references,
                                calibration_prompts=job["calibration"], out_dir=out,
                                progress=False)
        return _digest(res.to_dict())
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    if is_main_process():
        write_json(out, result)
    return _digest(result)


def run_jobs(spec: dict[str, Any]) -> None:
    """Load the pipeline and run every job of ``spec`` in order; see the module docstring."""
    from diffmem.files import write_json
    from diffmem.parallel import distributed_state, gather_all, is_main_process
    from diffmem.pipelines import load_pipeline

    pipe = load_pipeline(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    state = distributed_state()
    for job in spec["jobs"]:
        digests = gather_all(run_job(pipe, spec["model"], job), state)
        if is_main_process():
            report = {"num_processes": state.num_processes, "same_on_every_process": len(set(digests)) == 1}
            write_json(Path(spec["root"]) / f"{job['name']}.processes.json", report)


def shut_down() -> None:
    """Leave the process group together: a process that exits with its gloo group still alive can abort
    ("terminate called without an active exception") while the others are still at work."""
    from diffmem.parallel import distributed_state

    state = distributed_state()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # as the test process: the same kernels, whatever the machine
    args = sys.argv[1:]
    if args[:1] == ["--delay"]:
        slow_down_recording(float(args[1]))
        args = args[2:]
    run_jobs(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    shut_down()  # not after a failure: a process that failed alone would leave the others at the barrier
