"""Resumable recording: checkpoint partial statistics every N prompts per process and resume after a kill.

With ``checkpoint_every=N`` the processes record ``N`` prompts each per round and the main process saves every
process's partial statistics into a checkpoint folder beside the output after each round. A restart with the
same prompts, settings, model and number of processes continues after the last checkpoint, so no prompt is
counted twice; a checkpoint is made current by an atomic rename of its ``progress.json``, so a run killed at any
moment resumes from a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, DiffmemError
from .files import atomic_write_text, read_json
from .parallel import (
    distributed_state,
    gather_all,
    is_main_process,
    place,
    reduce_stats,
    run_everywhere,
    shard_bounds,
)
from .stats import ActivationStats, prompts_sha256, stats_paths

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_dir", "record_resumable", "record_to_file"]

CHECKPOINT_FORMAT = "diffmem.record_checkpoint"
_PROGRESS_FILE = "progress.json"


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Folder of the partial statistics of a resumable recording into ``out``.

    Args:
        out: The output path given to :func:`record_to_file`.

    Returns:
        ``<out>.partial`` beside the statistics files.
    """
    tensor_path, _ = stats_paths(out)
    return tensor_path.with_name(tensor_path.name[: -len(".safetensors")] + ".partial")


def _run_key(pipe, prompts: list[str], config, model_id: str | None, pipe_kwargs: dict | None, world: int) -> str:
    """Hash of everything a checkpoint depends on: prompts, settings, model, dtype and number of processes."""
    from .targets import get_denoiser

    dtype = next(get_denoiser(pipe).parameters()).dtype
    head = json.dumps(
        {"config": config.to_dict(), "pipe_kwargs": pipe_kwargs or {}, "model_id": model_id, "dtype": str(dtype),
         "num_processes": world, "scheduler": type(getattr(pipe, "scheduler", None)).__name__},
        sort_keys=True, default=str,
    )
    return prompts_sha256([head, *prompts])


def _load_checkpoint(folder: Path, key: str, world: int) -> list[tuple[int, Any]] | None:
    """Per-process ``(done, stats)`` of the current checkpoint in ``folder``, or ``None`` to start afresh."""
    progress_file = folder / _PROGRESS_FILE
    if not progress_file.is_file():
        return None
    info = read_json(progress_file, "checkpoint", fmt=CHECKPOINT_FORMAT, hint=f"; delete {folder} to start over")
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



def _record_more(pipe, part: list[str], config, stats, model_id: str | None, pipe_kwargs: dict | None):
    """``stats`` with the statistics of ``part`` added (``stats`` itself when ``part`` is empty)."""
    from .recording import record

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
        The statistics of all ``prompts`` on every process, equal (to fp32 summation order) to a single
        uninterrupted :func:`~diffmem.recording.record`.

    Raises:
        ValueError: ``prompts`` is empty or ``checkpoint_every`` is negative.
        DiffmemError: Recording failed on some process, or the checkpoint is unreadable.
    """
    from tqdm.auto import tqdm

    from . import __version__

    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a non-empty list of strings")
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every={checkpoint_every!r} is invalid: must be >= 0")
    state = distributed_state()
    place(pipe, state)
    world, rank = state.num_processes, state.process_index
    shards = [shard_bounds(len(prompts), r, world) for r in range(world)]
    mine = prompts[shards[rank][0] : shards[rank][1]]
    folder = Path(partial) if partial is not None else None
    key = _run_key(pipe, prompts, config, model_id, pipe_kwargs, world) if folder is not None else ""

    resumed = None
    if folder is not None:
        loaded = run_everywhere(lambda: _load_checkpoint(folder, key, world) if state.is_main_process else None, state)
        loaded = gather_all(loaded, state)[0]  # the main process's view, on every process
        resumed = None if loaded is None else loaded[rank]
        dones = [0] * world if loaded is None else [d for d, _ in loaded]
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
            stats = run_everywhere(lambda: _record_more(pipe, part, config, stats, model_id, pipe_kwargs), state)
            done += len(part)
            bar.update(len(part))
            if folder is not None and k + 1 < rounds:
                gathered = gather_all((done, stats), state)
                run_everywhere(lambda: _save_checkpoint(folder, key, gathered, len(prompts))
                               if state.is_main_process else None, state)

    # what the recorder saw of the model, from the first process that recorded anything (a process without
    # prompts has no such metadata, and every process must return the same statistics)
    own = {} if stats is None else {k: stats.meta.get(k) for k in ("model_id", "denoiser", "scheduler")}
    recorded = next((m for m in gather_all(own, state) if m), {})
    stats = reduce_stats(stats, state)
    stats.meta = {
        "model_id": model_id or recorded.get("model_id"),
        "denoiser": recorded.get("denoiser"),
        "scheduler": recorded.get("scheduler"),
        "record_config": config.to_dict(),
        "prompts_sha256": prompts_sha256(prompts),
        "num_prompts": len(prompts),
        "diffmem_version": __version__,
    }
    return stats


def record_to_file(pipe, prompts: Sequence[str], config, *, out: str | os.PathLike | None = None,
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
        The statistics (on every process; only the main process writes them).
    """
    if checkpoint_every > 0 and out is None:
        raise ConfigError("checkpoint_every needs an output path (out) to keep the checkpoints beside")
    partial = checkpoint_dir(out) if out is not None and checkpoint_every > 0 else None
    stats = record_resumable(pipe, prompts, config, partial=partial, checkpoint_every=checkpoint_every,
                             model_id=model_id, pipe_kwargs=pipe_kwargs, progress=progress)
    if out is not None and is_main_process():
        stats.save(out)
    if partial is not None and is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
    return stats


