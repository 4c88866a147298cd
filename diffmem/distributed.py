"""Scale-out with accelerate: shard prompts over processes, reduce statistics, gather results in prompt order.

Every function here also works in a plain single process (no ``accelerate launch``), where it just runs the
library call. Under ``accelerate launch --num_processes N -m diffmem ...`` each process takes a contiguous
shard of the prompts; statistics are summed across processes (``torch.distributed.all_reduce``) and per-prompt
results are gathered in prompt order. Only the main process writes files and returns results; the others
return ``None``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "shard_bounds",
    "record_distributed",
    "record_resumable",
    "detect_distributed",
    "evaluate_distributed",
    "attack_distributed",
]


def _state():
    from accelerate import PartialState

    return PartialState()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items for process ``rank`` of ``world`` (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _gather_parts(part: Any, state) -> list:
    if state.num_processes == 1:
        return [part]
    import torch.distributed as dist

    out: list = [None] * state.num_processes
    dist.all_gather_object(out, part)
    return out


def _all_reduce_stats(stats, state):
    """Sum counts and sums across processes; gather signatures in rank order."""
    import torch.distributed as dist

    for per_layer in stats.halves.values():
        for s in per_layer.values():
            for name, t in s.tensors().items():
                t = t.contiguous()
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                setattr(s, name, t)
    if stats.signatures is not None:
        parts = _gather_parts({k: v.cpu() for k, v in stats.signatures.items()}, state)
        stats.signatures = {k: torch.cat([p[k] for p in parts if p[k].numel()]) for k in stats.signatures}
    return stats


def _empty_like_run(pipe, config, prompts: list[str]):
    """Zero statistics with the layers a recording of ``pipe`` would have (for a process with no prompts)."""
    from diffmem.hooks import record

    probe = record(pipe, prompts[:1], config, progress=False)
    for per_layer in probe.halves.values():
        for s in per_layer.values():
            for name, t in s.tensors().items():
                setattr(s, name, torch.zeros_like(t))
    if probe.signatures is not None:
        probe.signatures = {k: v[:0] for k, v in probe.signatures.items()}
    return probe


def record_resumable(pipe, prompts: list[str], config, *, partial: Path | None = None, checkpoint_every: int = 0,
                     model_id: str | None = None, pipe_kwargs: dict | None = None, progress: bool = True):
    """Record ``prompts`` in chunks, saving partial statistics after each chunk so a killed run can resume.

    The partial file records how many prompts it holds and the hash of the full prompt list and config; a restart
    with the same inputs loads it and continues after the last saved chunk, so nothing is counted twice.

    Args:
        pipe: The pipeline.
        prompts: This process's prompts.
        config: Recording settings.
        partial: Where partial statistics live (``None``: no checkpointing).
        checkpoint_every: Prompts per chunk (0: one chunk).
        model_id: Model id for the metadata.
        pipe_kwargs: Extra pipeline call arguments.
        progress: Show progress.

    Returns:
        The statistics of all ``prompts``.
    """
    from diffmem.hooks import record
    from diffmem.stats import ActivationStats, prompts_sha256

    key = prompts_sha256([json.dumps(config.to_dict(), sort_keys=True), json.dumps(pipe_kwargs or {}, sort_keys=True)] + prompts)
    stats, done = None, 0
    progress_file = partial.with_suffix(".progress.json") if partial is not None else None
    if partial is not None and progress_file.is_file():
        info = json.loads(progress_file.read_text())
        if info.get("key") == key:
            stats, done = ActivationStats.load(partial), int(info["done"])
            logger.info("resuming from %s: %d of %d prompts already recorded", partial, done, len(prompts))
        else:
            logger.warning("ignoring %s: it belongs to other prompts or settings", partial)
    chunk = checkpoint_every if checkpoint_every > 0 else max(1, len(prompts))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), initial=done, desc="record prompts", disable=not progress)
    while done < len(prompts):
        part = prompts[done : done + chunk]
        new = record(pipe, part, config, progress=False, model_id=model_id, pipe_kwargs=pipe_kwargs)
        stats = new if stats is None else stats.merge_(new)
        done += len(part)
        bar.update(len(part))
        if partial is not None and done < len(prompts):
            stats.save(partial)
            from diffmem.utils import atomic_write_text

            atomic_write_text(progress_file, json.dumps({"key": key, "done": done}))
    bar.close()
    return stats


def record_distributed(pipe, prompts: list[str], config, *, out: str | Path | None = None,
                       model_id: str | None = None, pipe_kwargs: dict | None = None, checkpoint_every: int = 0,
                       progress: bool = True):
    """Record over all processes and (on the main process) save and return the reduced statistics.

    Args:
        pipe: The pipeline (each process holds its own copy, on its own device).
        prompts: All prompts; each process records a contiguous shard.
        config: Recording settings.
        out: Where the main process writes the statistics (``None``: don't write).
        model_id: Model id for the metadata.
        pipe_kwargs: Extra pipeline call arguments.
        checkpoint_every: Save partial statistics every N prompts (per process) beside ``out``, and resume
            from them on a restart.
        progress: Show progress on the main process.

    Returns:
        The statistics on the main process; ``None`` on the others.
    """
    from diffmem.stats import prompts_sha256

    state = _state()
    if state.num_processes > 1 and str(pipe.device) == "cpu" and state.device.type != "cpu":
        pipe.to(state.device)
    start, stop = shard_bounds(len(prompts), state.process_index, state.num_processes)
    mine = prompts[start:stop]
    partial = None
    if out is not None and checkpoint_every > 0:
        partial = Path(str(out) + f".partial-{state.process_index}-of-{state.num_processes}.safetensors")
    if mine:
        stats = record_resumable(pipe, mine, config, partial=partial, checkpoint_every=checkpoint_every,
                                 model_id=model_id, pipe_kwargs=pipe_kwargs, progress=progress and state.is_main_process)
    else:
        stats = _empty_like_run(pipe, config, prompts)
    if state.num_processes > 1:
        stats = _all_reduce_stats(stats.to("cpu"), state)
    from diffmem import __version__

    stats.meta = {"model_id": model_id or stats.meta.get("model_id"), "prompts_sha256": prompts_sha256(prompts),
                  "num_prompts": len(prompts), "record_config": config.to_dict(), "diffmem_version": __version__,
                  "num_processes": state.num_processes}
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    if out is not None:
        stats.save(out)
    if partial is not None:
        for r in range(state.num_processes):
            p = Path(str(out) + f".partial-{r}-of-{state.num_processes}.safetensors")
            for f in (p, p.with_suffix(".json"), p.with_suffix(".progress.json")):
                f.unlink(missing_ok=True)
    state.wait_for_everyone()
    return stats


def detect_distributed(pipe, prompts: list[str], config, *, labels=None, calibration_prompts=None, m: float = 3.0,
                       progress: bool = True):
    """Wen et al. detection with prompts sharded over processes; the main process returns the result."""
    from diffmem.detect import DetectionResult, flag_calibrated, noise_norm_scores
    from diffmem.metrics import roc_auc, tpr_at_fpr

    state = _state()

    def scores_of(items: list[str]) -> np.ndarray:
        a, b = shard_bounds(len(items), state.process_index, state.num_processes)
        mine = noise_norm_scores(pipe, items[a:b], config, progress=progress and state.is_main_process) if b > a else np.zeros(0)
        return np.concatenate(_gather_parts(mine, state))

    scores = scores_of(list(prompts))
    ref = scores_of(list(calibration_prompts)) if calibration_prompts else None
    if not state.is_main_process:
        return None
    res = DetectionResult(list(prompts), scores)
    if labels is not None:
        lab = np.asarray(labels, dtype=bool)
        res.labels = lab
        if lab.any() and (~lab).any():
            res.auc, res.tpr_at_1fpr = roc_auc(scores, lab), tpr_at_fpr(scores, lab, 0.01)
    if ref is not None:
        res.flagged, res.threshold = flag_calibrated(scores, ref, m)
    return res


def evaluate_distributed(pipe, entries, config, scorer, edit, *, clip_scorer=None, progress: bool = True):
    """``evaluate_edit`` (or ``evaluate`` without an edit) sharded over processes.

    Returns:
        On the main process, a report with ``before`` (and ``after``) summaries and per-prompt rows.
    """
    from diffmem.evaluate import EvalResult, evaluate, evaluate_edit

    state = _state()
    a, b = shard_bounds(len(entries), state.process_index, state.num_processes)
    mine = list(entries)[a:b]
    show = progress and state.is_main_process
    if not mine:
        part = (None, None)
    elif edit is None:
        part = (evaluate(pipe, mine, config, scorer, clip_scorer=clip_scorer, progress=show), None)
    else:
        part = evaluate_edit(pipe, mine, config, scorer, edit, clip_scorer=clip_scorer, progress=show)
    parts = _gather_parts([(None if r is None else (r.rows, r.images)) for r in part], state)
    if not state.is_main_process:
        return None

    def merge(k: int) -> EvalResult | None:
        got = [p[k] for p in parts if p[k] is not None]
        if not got:
            return None
        rows = [dict(r) for rs, _ in got for r in rs]
        for i, r in enumerate(rows):
            r["index"] = i
        return EvalResult(rows=rows, scorer=scorer.describe(), config=config.to_dict(),
                          images=np.concatenate([im for _, im in got]))

    before, after = merge(0), merge(1)
    report: dict[str, Any] = {"scorer": scorer.describe(), "config": config.to_dict(),
                              "before": before.summary(), "rows_before": before.rows}
    if after is not None:
        report["after"] = after.summary()
        report["rows_after"] = after.rows
    report["_results"] = (before, after)
    return report


def attack_distributed(pipe, prompts: list[str], config, scorer, *, references=None, calibration_prompts=None,
                       call_kwargs: dict | None = None, out_dir: Path | None = None, progress: bool = True):
    """The extraction attack with generation sharded over processes; filtering runs on the main process."""
    from diffmem.attack import extraction_attack_images
    from diffmem.sampling import generate_images

    state = _state()
    call_kwargs = dict(call_kwargs or {})

    def gen(items: list[str], desc: str) -> np.ndarray | None:
        if not items:
            return None
        a, b = shard_bounds(len(items), state.process_index, state.num_processes)
        mine = generate_images(pipe, items[a:b], num_seeds=config.num_generations, seed=config.seed,
                               batch_size=config.batch_size, progress=progress and state.is_main_process,
                               desc=desc, **call_kwargs) if b > a else None
        parts = [p for p in _gather_parts(mine, state) if p is not None]
        return np.concatenate(parts)

    images = gen(list(prompts), "attack: generate")
    calib = gen(list(calibration_prompts or []), "attack: calibrate")
    if not state.is_main_process:
        return None
    res = extraction_attack_images(images, list(prompts), config, scorer, references=references,
                                   calibration_images=calib, out_dir=out_dir, progress=progress)
    if out_dir is not None:
        res.to_json(Path(out_dir) / "attack.json")
    return res
