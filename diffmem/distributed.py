"""Scale-out with accelerate: shard prompts over processes, reduce statistics, gather results in prompt order.

Every function here also works in a plain single process (no launcher), where it just runs the library call.
Under ``accelerate launch --multi_gpu --num_processes N -m diffmem ...`` (or ``torchrun --nproc_per_node N -m
diffmem ...``) each process takes a contiguous shard of the prompts. Recording sums the streaming statistics
(counts, sums, sums of squares, normalised sums of squares) over processes with ``torch.distributed.reduce``;
detection, evaluation and the extraction attack gather their per-prompt results on the main process in prompt
order. Only the main process writes files and returns results; the others return ``None``.

On a machine without a visible accelerator (or with ``ACCELERATE_USE_CPU=1``) the processes join a gloo group
on the CPU, so ``CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 -m diffmem record ...``
runs two CPU processes. Note that ``accelerate launch --cpu --num_processes N`` starts a single process unless
it is given ``--mpirun_hostfile``; diffmem warns when it sees that.

A failure in any process (a non-finite activation, a bad reference, ...) is raised on every process, so none of
them waits forever in a later collective: the failing process re-raises its own error, the others raise a
:class:`~diffmem.errors.DiffmemError` that names the failing process.

Recording is resumable: with ``checkpoint_every=N`` the processes record ``N`` prompts each per round and the
main process saves every process's partial statistics into a checkpoint folder beside the output after each
round. A restart with the same prompts, settings, model and number of processes continues after the last
checkpoint, so no prompt is counted twice; a checkpoint is made current by an atomic rename of its
``progress.json``, so a run killed at any moment resumes from a complete checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DiffmemError

logger = logging.getLogger(__name__)

__all__ = [
    "distributed_state",
    "shard_bounds",
    "checkpoint_dir",
    "record_resumable",
    "record_distributed",
    "detect_distributed",
    "evaluate_distributed",
    "attack_distributed",
]

CHECKPOINT_FORMAT = "diffmem.record_checkpoint"
_PROGRESS_FILE = "progress.json"
_MOMENT_FIELDS = ("sum", "sumsq", "normsq")
_warned_single_cpu = False


# ---------------------------------------------------------------------------------------------------------------
# process state and collectives


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def distributed_state():
    """The accelerate ``PartialState`` of this process, initialising the process group on first use.

    Processes started by ``accelerate launch`` or ``torchrun`` use gloo on the CPU when no accelerator is visible
    or ``ACCELERATE_USE_CPU`` is set, and the launcher's backend (NCCL on GPUs) otherwise.

    Returns:
        The shared ``accelerate.PartialState``.
    """
    global _warned_single_cpu
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not _accelerator_available()
    state = PartialState(cpu=cpu)
    if (
        state.num_processes == 1
        and parse_flag_from_env("ACCELERATE_USE_CPU")
        and os.environ.get("MASTER_ADDR")
        and not _warned_single_cpu
    ):
        _warned_single_cpu = True
        logger.warning(
            "running as a single process: `accelerate launch --cpu --num_processes N` starts N processes only with "
            "--mpirun_hostfile; use `accelerate launch --multi_gpu --num_processes N` (gloo on the CPU when no GPU "
            "is visible) or torchrun instead"
        )
    return state


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous shard of ``n`` items for one process; shard sizes differ by at most one.

    Args:
        n: Number of items.
        rank: Index of the process, in ``[0, world)``.
        world: Number of processes.

    Returns:
        ``(start, stop)``; empty (``start == stop``) for the last ranks when ``n < world``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank!r} is invalid for world={world!r}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _shard(items: Sequence, state) -> list:
    start, stop = shard_bounds(len(items), state.process_index, state.num_processes)
    return list(items[start:stop])


def _gather(obj: Any, state) -> list | None:
    """``obj`` of every process, in rank order, on the main process; ``None`` on the others."""
    if state.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(obj, out, dst=0)
    return out


def _all_gather(obj: Any, state) -> list:
    """``obj`` of every process, in rank order, on every process."""
    if state.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * state.num_processes
    dist.all_gather_object(out, obj)
    return out


def _scatter(objs: list | None, state) -> Any:
    """Entry ``rank`` of the main process's list ``objs``, on each process."""
    if state.num_processes == 1:
        return objs[0]  # type: ignore[index]
    import torch.distributed as dist

    out: list = [None]
    dist.scatter_object_list(out, objs if state.is_main_process else None, src=0)
    return out[0]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (DiffmemError, ValueError, FileNotFoundError)):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _run(fn: Callable[[], Any], state) -> Any:
    """Run ``fn`` on every process; if it failed on any of them, raise on all of them.

    The failing process re-raises its own exception; the others raise a :class:`DiffmemError` naming the first
    failing process and its one-line message.
    """
    try:
        result, error = fn(), None
    except Exception as err:  # any failure must reach the other processes
        result, error = None, err
    if state.num_processes == 1:
        if error is not None:
            raise error
        return result
    messages = _all_gather(None if error is None else _one_line(error), state)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise DiffmemError(f"process {rank} failed: {message}")
    return result


def _place(pipe, state) -> None:
    """Move the pipeline to this process's device when several processes share a machine's accelerators."""
    if state.num_processes == 1 or state.device.type == "cpu":
        return
    current = pipe.device
    if current.type == "cpu" or (current.type == state.device.type and current != state.device):
        logger.info("process %d: moving the pipeline from %s to %s", state.process_index, current, state.device)
        pipe.to(state.device)


# ---------------------------------------------------------------------------------------------------------------
# recording


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Folder of the partial statistics of a resumable recording into ``out``.

    Args:
        out: The output path given to :func:`record_distributed`.

    Returns:
        ``<out>.partial`` beside the statistics files.
    """
    from .stats import stats_paths

    tensor_path, _ = stats_paths(out)
    return tensor_path.with_name(tensor_path.name[: -len(".safetensors")] + ".partial")


def _run_key(pipe, prompts: list[str], config, model_id: str | None, pipe_kwargs: dict | None, world: int) -> str:
    """Hash of everything a checkpoint depends on: prompts, settings, model, dtype and number of processes."""
    from .stats import prompts_sha256
    from .targets import get_denoiser

    dtype = next(get_denoiser(pipe).parameters()).dtype
    head = json.dumps(
        {"config": config.to_dict(), "pipe_kwargs": pipe_kwargs or {}, "model_id": model_id, "dtype": str(dtype),
         "num_processes": world},
        sort_keys=True, default=str,
    )
    return prompts_sha256([head, *prompts])


def _load_checkpoint(folder: Path, key: str, world: int) -> list[tuple[int, Any]] | None:
    """Per-process ``(done, stats)`` of the current checkpoint in ``folder``, or ``None`` to start afresh."""
    from .stats import ActivationStats

    progress_file = folder / _PROGRESS_FILE
    if not progress_file.is_file():
        return None
    try:
        info = json.loads(progress_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffmemError(f"cannot read checkpoint {progress_file}: {err}; delete {folder} to start over") from None
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise DiffmemError(f"{progress_file} is not a diffmem checkpoint; delete {folder} to start over")
    if info.get("key") != key:
        logger.warning("ignoring checkpoint %s: it belongs to other prompts, settings, model or process count", folder)
        return None
    out = []
    for done, name in zip(info["done"], info["files"]):
        out.append((int(done), None if name is None else ActivationStats.load(folder / name)))
    if len(out) != world:
        raise DiffmemError(f"checkpoint {folder} holds {len(out)} processes, expected {world}")
    return out


def _save_checkpoint(folder: Path, key: str, parts: list[tuple[int, Any]], num_prompts: int) -> None:
    """Write every process's partial statistics, then make them current by replacing ``progress.json``."""
    from .utils import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    world = len(parts)
    serial = sum(done for done, _ in parts)
    files: list[str | None] = []
    for rank, (_, stats) in enumerate(parts):
        if stats is None:
            files.append(None)
            continue
        name = f"rank{rank}-of-{world}.{serial}"
        stats.save(folder / name)
        files.append(name)
    info = {"format": CHECKPOINT_FORMAT, "key": key, "num_prompts": num_prompts, "done": [d for d, _ in parts],
            "files": files}
    atomic_write_text(folder / _PROGRESS_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    keep = {name for name in files if name is not None}
    for path in folder.glob("rank*"):
        base = path.name.removesuffix(".safetensors").removesuffix(".json")
        if base not in keep:
            path.unlink(missing_ok=True)
    logger.info("checkpoint %s: %d of %d prompts recorded", folder, serial, num_prompts)


def _structure(stats) -> tuple:
    from .stats import HALVES

    return (tuple(stats.layers.items()), stats.steps, tuple(h for h in HALVES if h in stats.halves),
            stats.signatures is not None)


def _reduce_stats(stats, state):
    """Sum every process's statistics on the main process and concatenate signatures in rank order.

    A process without prompts (``stats is None``) contributes zeros of the same layout.

    Returns:
        The reduced statistics on the main process; ``None`` on the others.
    """
    if state.num_processes == 1:
        return stats
    import torch.distributed as dist

    from .stats import ActivationStats

    layouts = _all_gather(None if stats is None else _structure(stats), state)
    known = [s for s in layouts if s is not None]
    if any(s != known[0] for s in known):
        raise DiffmemError("processes recorded different layers, steps or CFG halves; check that all load one model")
    layers, steps, halves, has_signatures = known[0]
    if stats is None:
        stats = ActivationStats(dict(layers), steps)
        for half in halves:
            stats.ensure_half(half)
        if has_signatures:
            stats.signatures = {name: torch.zeros(0, shape[1]) for name, shape in layers}
    stats.to("cpu")
    blocks = [stats.halves[half][name] for half in halves for name, _ in layers]
    comm = torch.device("cpu") if state.backend in ("gloo", "mpi") else state.device
    moments = torch.cat([getattr(b, f).flatten() for b in blocks for f in _MOMENT_FIELDS]).to(comm)
    counts = torch.cat([b.count for b in blocks]).to(comm)
    dist.reduce(moments, dst=0, op=dist.ReduceOp.SUM)
    dist.reduce(counts, dst=0, op=dist.ReduceOp.SUM)
    signatures = _gather(stats.signatures, state) if has_signatures else None
    if not state.is_main_process:
        return None
    moments, counts = moments.cpu(), counts.cpu()
    offset = 0
    for i, block in enumerate(blocks):
        block.count = counts[i * steps : (i + 1) * steps].clone()
        for f in _MOMENT_FIELDS:
            size = getattr(block, f).numel()
            setattr(block, f, moments[offset : offset + size].view_as(getattr(block, f)).clone())
            offset += size
    if signatures is not None:
        stats.signatures = {name: torch.cat([part[name] for part in signatures]) for name, _ in layers}
    return stats


def _record_more(pipe, part: list[str], config, stats, model_id: str | None, pipe_kwargs: dict | None):
    """``stats`` with the statistics of ``part`` added (``stats`` itself when ``part`` is empty)."""
    from .hooks import record

    if not part:
        return stats
    new = record(pipe, part, config, progress=False, model_id=model_id, pipe_kwargs=pipe_kwargs)
    return new if stats is None else stats.merge_(new)


def record_resumable(pipe, prompts: Sequence[str], config, *, partial: str | os.PathLike | None = None,
                     checkpoint_every: int = 0, model_id: str | None = None, pipe_kwargs: dict | None = None,
                     progress: bool = True):
    """Record ``prompts`` over all processes in rounds of ``checkpoint_every`` prompts per process, resumably.

    Each process records its contiguous shard. After every round but the last, the main process gathers every
    process's partial statistics and saves them into ``partial`` with how many prompts of each shard they hold
    and a hash of the prompts, settings, model, dtype and process count. A restart with the same inputs loads
    them and continues after the last saved round, so nothing is counted twice. A checkpoint of other inputs
    is ignored with a warning.

    Args:
        pipe: The pipeline (each process holds its own copy).
        prompts: All prompts, in order.
        config: Recording settings (:class:`~diffmem.config.RecordConfig`).
        partial: Checkpoint folder (``None``: no checkpoints); only the main process writes to it.
        checkpoint_every: Prompts per process and round (0: one round).
        model_id: Model id for the metadata and the checkpoint hash.
        pipe_kwargs: Extra pipeline call arguments.
        progress: Show the main process's progress.

    Returns:
        On the main process, the statistics of all ``prompts``, equal (to fp32 summation order) to a single
        uninterrupted :func:`~diffmem.hooks.record`; ``None`` on the others.

    Raises:
        ValueError: ``prompts`` is empty or ``checkpoint_every`` is negative.
        DiffmemError: Recording failed on some process, or the checkpoint is unreadable.
    """
    from tqdm.auto import tqdm

    from . import __version__
    from .stats import prompts_sha256

    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every!r} is invalid: must be >= 0")
    state = distributed_state()
    _place(pipe, state)
    world, rank = state.num_processes, state.process_index
    shards = [shard_bounds(len(prompts), r, world) for r in range(world)]
    mine = prompts[shards[rank][0] : shards[rank][1]]
    folder = Path(partial) if partial is not None else None
    key = _run_key(pipe, prompts, config, model_id, pipe_kwargs, world) if folder is not None else ""

    resumed = None
    if folder is not None:
        loaded = _run(lambda: _load_checkpoint(folder, key, world) if state.is_main_process else None, state)
        resumed = _scatter(loaded or [None] * world, state)
        dones = _all_gather(0 if resumed is None else resumed[0], state)
        if state.is_main_process and any(dones):
            logger.info("resuming from %s: %d of %d prompts already recorded", folder, sum(dones), len(prompts))
    else:
        dones = [0] * world
    done, stats = (0, None) if resumed is None else resumed

    chunk = checkpoint_every if checkpoint_every > 0 else max(1, max(b - a for a, b in shards))
    rounds = max(math.ceil((b - a - d) / chunk) for (a, b), d in zip(shards, dones))
    if world > 1:
        logger.info("process %d of %d records prompts %d..%d", rank, world, shards[rank][0] + done, shards[rank][1])
    with tqdm(total=len(mine), initial=done, desc="record prompts",
              disable=not (progress and state.is_main_process)) as bar:
        for k in range(rounds):
            part = mine[done : done + chunk]
            stats = _run(functools.partial(_record_more, pipe, part, config, stats, model_id, pipe_kwargs), state)
            done += len(part)
            bar.update(len(part))
            if folder is not None and k + 1 < rounds:
                gathered = _gather((done, stats), state)
                if gathered is None:  # the other processes join the main process's check of its save
                    _run(lambda: None, state)
                else:
                    _run(functools.partial(_save_checkpoint, folder, key, gathered, len(prompts)), state)

    stats = _reduce_stats(stats, state)
    if stats is None:
        return None
    recorded = stats.meta
    stats.meta = {
        "model_id": model_id or recorded.get("model_id"),
        "denoiser": recorded.get("denoiser"),
        "record_config": config.to_dict(),
        "prompts_sha256": prompts_sha256(prompts),
        "num_prompts": len(prompts),
        "diffmem_version": __version__,
    }
    return stats


def record_distributed(pipe, prompts: Sequence[str], config, *, out: str | os.PathLike | None = None,
                       model_id: str | None = None, pipe_kwargs: dict | None = None, checkpoint_every: int = 0,
                       progress: bool = True):
    """Record over all processes and, on the main process, save and return the reduced statistics.

    Args:
        pipe: The pipeline (each process holds its own copy; it is moved to the process's accelerator).
        prompts: All prompts; each process records a contiguous shard.
        config: Recording settings.
        out: Where the main process writes the statistics (``None``: don't write).
        model_id: Model id for the metadata.
        pipe_kwargs: Extra pipeline call arguments.
        checkpoint_every: Checkpoint partial statistics every N prompts per process into
            :func:`checkpoint_dir` ``(out)`` and resume from there on a restart; the folder is removed once
            ``out`` is written. Needs ``out``.
        progress: Show progress on the main process.

    Returns:
        The statistics on the main process; ``None`` on the others.
    """
    if checkpoint_every > 0 and out is None:
        raise ValueError("checkpoint_every needs an output path (out) to keep the checkpoints beside")
    partial = checkpoint_dir(out) if out is not None and checkpoint_every > 0 else None
    stats = record_resumable(pipe, prompts, config, partial=partial, checkpoint_every=checkpoint_every,
                             model_id=model_id, pipe_kwargs=pipe_kwargs, progress=progress)
    if stats is None:
        return None
    if out is not None:
        stats.save(out)
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# detection, evaluation, attack


def detect_distributed(pipe, prompts: Sequence[str], config, *, labels: Sequence[bool] | None = None,
                       calibration_prompts: Sequence[str] | None = None, m: float = 3.0, progress: bool = True):
    """Wen et al. detection (:func:`diffmem.detect.detect`) with prompts sharded over processes.

    Args:
        pipe: The pipeline to audit.
        prompts: Prompts to score.
        config: Detection settings (:class:`~diffmem.detect.DetectConfig`).
        labels: Optional ground truth (True = memorized) for AUC and TPR at 1% FPR.
        calibration_prompts: Known non-memorized prompts (at least 2); flags prompts above ``mean + m * std``.
        m: Width of the calibrated threshold in standard deviations.
        progress: Show the main process's progress.

    Returns:
        On the main process, the :class:`~diffmem.detect.DetectionResult` with scores in prompt order;
        ``None`` on the others.
    """
    from .detect import DetectionResult, flag_calibrated, noise_norm_scores
    from .metrics import roc_auc, tpr_at_fpr

    prompts, calibration = list(prompts), list(calibration_prompts or [])
    if labels is not None and len(labels) != len(prompts):
        raise ValueError(f"labels has {len(labels)} entries for {len(prompts)} prompts")
    if len(calibration) == 1:
        raise ValueError("calibration needs at least 2 non-memorized prompts")
    state = distributed_state()
    _place(pipe, state)
    show = progress and state.is_main_process

    def work() -> tuple[np.ndarray, np.ndarray]:
        mine, mine_ref = _shard(prompts, state), _shard(calibration, state)
        scores = noise_norm_scores(pipe, mine, config, progress=show) if mine else np.zeros(0)
        ref = noise_norm_scores(pipe, mine_ref, config, progress=show) if mine_ref else np.zeros(0)
        return scores, ref

    parts = _gather(_run(work, state), state)
    if parts is None:
        return None
    scores = np.concatenate([s for s, _ in parts])
    res = DetectionResult(prompts, scores)
    if labels is not None:
        lab = np.asarray(labels, dtype=bool)
        res.labels = lab
        if lab.any() and (~lab).any():
            res.auc, res.tpr_at_1fpr = roc_auc(scores, lab), tpr_at_fpr(scores, lab, 0.01)
    if calibration:
        res.flagged, res.threshold = flag_calibrated(scores, np.concatenate([r for _, r in parts]), m)
    return res


def evaluate_distributed(pipe, entries, config, scorer, edit=None, *, clip_scorer=None, progress: bool = True):
    """:func:`~diffmem.evaluate.evaluate_edit` (or :func:`~diffmem.evaluate.evaluate` without an edit) sharded
    over processes; only the per-prompt rows travel to the main process, never the images.

    Args:
        pipe: The pipeline.
        entries: Manifest entries.
        config: Evaluation settings (:class:`~diffmem.evaluate.EvalConfig`).
        scorer: Similarity scorer.
        edit: A ``Mask`` or direction basis applied reversibly for the "after" run; ``None`` evaluates as is.
        clip_scorer: Optional CLIP scorer for the CLIP score.
        progress: Show the main process's progress.

    Returns:
        On the main process a JSON-ready report: ``scorer``, ``config``, ``before`` (summary by split and
        duplication), ``rows_before`` (per-prompt rows in manifest order, ``index`` global) and, with an edit,
        ``after`` and ``rows_after``; ``None`` on the others.
    """
    from .evaluate import EvalResult, evaluate, evaluate_edit

    entries = list(entries)
    if not entries:
        raise ValueError("entries is empty: nothing to evaluate")
    state = distributed_state()
    _place(pipe, state)
    show = progress and state.is_main_process

    def work() -> tuple[list | None, list | None]:
        mine = _shard(entries, state)
        if not mine:
            return None, None
        if edit is None:
            return evaluate(pipe, mine, config, scorer, clip_scorer=clip_scorer, progress=show).rows, None
        before, after = evaluate_edit(pipe, mine, config, scorer, edit, clip_scorer=clip_scorer, progress=show)
        return before.rows, after.rows

    parts = _gather(_run(work, state), state)
    if parts is None:
        return None

    def merged(k: int) -> EvalResult | None:
        got = [p[k] for p in parts if p[k] is not None]
        if not got:
            return None
        rows = [dict(r, index=i) for i, r in enumerate(r for rs in got for r in rs)]
        return EvalResult(rows=rows, scorer=scorer.describe(), config=config.to_dict())

    before, after = merged(0), merged(1)
    report: dict[str, Any] = {"scorer": scorer.describe(), "config": config.to_dict(),
                              "before": before.summary(), "rows_before": before.rows}
    if after is not None:
        report["after"] = after.summary()
        report["rows_after"] = after.rows
    return report


def attack_distributed(pipe, prompts: Sequence[str], config, scorer, *, references: Sequence[Any] | None = None,
                       calibration_prompts: Sequence[str] | None = None, call_kwargs: dict | None = None,
                       out_dir: str | os.PathLike | None = None, progress: bool = True):
    """The extraction attack (:func:`~diffmem.attack.extraction_attack`) with generation sharded over processes.

    Every process generates the images of its shard of the prompts and of the calibration prompts; the main
    process gathers them (``P * num_generations`` images) and runs the clique filter, calibration and
    verification, and writes ``out_dir``.

    Args:
        pipe: A text-to-image pipeline.
        prompts: Prompts to attack.
        config: Attack settings (:class:`~diffmem.attack.AttackConfig`).
        scorer: Similarity scorer; its ``threshold`` verifies extractions.
        references: One reference image or ``None`` per prompt (used on the main process).
        calibration_prompts: Non-memorized prompts that calibrate the threshold.
        call_kwargs: Pipeline arguments (``num_inference_steps``, ``guidance_scale``, ``height``, ...).
        out_dir: Output folder (``attack.json``, ``extractions/``), written by the main process.
        progress: Show the main process's progress.

    Returns:
        On the main process the :class:`~diffmem.attack.AttackResult`; ``None`` on the others.
    """
    from .attack import extraction_attack_images
    from .sampling import generate_images

    prompts, calibration = list(prompts), list(calibration_prompts or [])
    if config.threshold is None and not calibration:
        raise DiffmemError("config.threshold is None and no calibration prompts were given; set one of them")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"references has {len(references)} entries for {len(prompts)} prompts")
    overlap = set(prompts) & set(calibration)
    if overlap:
        logger.warning("%d calibration prompts are also attacked; calibrate on separate prompts", len(overlap))
    state = distributed_state()
    _place(pipe, state)
    show = progress and state.is_main_process

    def gen(items: list[str], desc: str) -> np.ndarray | None:
        mine = _shard(items, state)
        if not mine:
            return None
        return generate_images(pipe, mine, num_seeds=config.num_generations, seed=config.seed,
                               batch_size=config.batch_size, progress=show, desc=desc, **dict(call_kwargs or {}))

    parts = _gather(_run(lambda: (gen(prompts, "attack: generate"), gen(calibration, "attack: calibrate")), state),
                    state)
    if parts is None:
        return None
    images = np.concatenate([g for g, _ in parts if g is not None])
    calib = [c for _, c in parts if c is not None]
    return extraction_attack_images(images, prompts, config, scorer, references=references,
                                    calibration_images=np.concatenate(calib) if calib else None, out_dir=out_dir,
                                    progress=progress)
