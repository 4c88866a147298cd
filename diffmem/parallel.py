"""A thin layer on accelerate: shard items over processes, gather results in order, reduce statistics.

Every library stage (record, detect, evaluate, the attacks) calls these helpers, so a plain single process and a
run under ``accelerate launch --multi_gpu --num_processes N -m diffmem ...`` (or ``torchrun``) go through the same
code. :func:`shard_map` gives each process a contiguous shard (``PartialState.split_between_processes``) and
returns the results of all shards, in item order, on every process (``gather_object``); :func:`reduce_stats` sums
streaming statistics (``accelerate.utils.reduce``). Only the main process writes files.

On a machine without a visible accelerator (or with ``ACCELERATE_USE_CPU=1``) the processes join a gloo group
on the CPU, so ``CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 -m diffmem record ...``
runs two CPU processes. ``accelerate launch --cpu --num_processes N`` starts a single process unless it is given
``--mpirun_hostfile``; diffmem warns when it sees that.

A failure in any process is raised on every process, so none of them waits forever in a later collective: the
failing process re-raises its own error, the others raise a :class:`~diffmem.errors.DiffmemError` naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from .errors import DiffmemError
from .stats import HALVES

logger = logging.getLogger(__name__)

__all__ = [
    "distributed_state",
    "is_main_process",
    "shard_map",
    "shard_bounds",
    "gather_all",
    "run_everywhere",
    "reduce_stats",
    "place",
]

T = TypeVar("T")
R = TypeVar("R")
_warned_single_cpu = False


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


def is_main_process() -> bool:
    """Whether this process writes the outputs (always ``True`` without a launcher)."""
    return distributed_state().is_main_process


def gather_all(obj: Any, state: Any) -> list:
    """``obj`` of every process, in rank order, on every process."""
    if state.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (DiffmemError, FileNotFoundError)):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_everywhere(fn: Callable[[], Any], state) -> Any:
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
    messages = gather_all(None if error is None else _one_line(error), state)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise DiffmemError(f"process {rank} failed: {message}")
    return result


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous shard of ``n`` items for one process; shard sizes differ by at most one, larger shards first.

    This is the split of ``PartialState.split_between_processes``, for callers that need the bounds themselves.

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


def shard_map(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """Run ``fn`` on this process's contiguous shard of ``items``; return every shard's results in item order.

    Args:
        fn: Maps a list of items to one result per item (called with an empty list on a process without items).
        items: All items.

    Returns:
        ``len(items)`` results, on every process.
    """
    state = distributed_state()
    items = list(items)
    if state.num_processes == 1:
        return fn(items)
    with state.split_between_processes(items) as mine:
        mine = list(mine)
    part = run_everywhere(lambda: fn(mine) if mine else [], state)
    out = [r for chunk in gather_all(part, state) for r in chunk]
    if len(out) != len(items):
        raise DiffmemError(f"gathered {len(out)} results for {len(items)} items")
    return out


def place(pipe: Any, state: Any = None) -> None:
    """Move a pipeline to this process's device when several processes share a machine's accelerators."""
    state = state or distributed_state()
    if state.num_processes == 1 or state.device.type == "cpu":
        return
    current = pipe.device
    if current.type == "cpu" or (current.type == state.device.type and current != state.device):
        logger.info("process %d: moving the pipeline from %s to %s", state.process_index, current, state.device)
        pipe.to(state.device)


def _structure(stats) -> tuple:
    return (tuple(stats.layers.items()), stats.steps, tuple(h for h in HALVES if h in stats.halves),
            stats.signatures is not None)


def reduce_stats(stats: Any, state: Any = None) -> Any:
    """Sum every process's statistics and concatenate signatures in rank order, on every process.

    A process without prompts (``stats is None``) contributes zeros of the same layout. Sums are reduced in
    fp32, so they equal a single process's to fp32 summation-order tolerance; counts are exact.

    Returns:
        The reduced statistics (``stats`` itself in a single process).
    """
    from .stats import ActivationStats

    state = state or distributed_state()
    if state.num_processes == 1:
        return stats
    from accelerate.utils import reduce

    layouts = gather_all(None if stats is None else _structure(stats), state)
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
    moments = torch.cat([getattr(b, f).flatten() for b in blocks for f in ("sum", "sumsq", "normsq")]).to(comm)
    counts = torch.cat([b.count for b in blocks]).to(comm)
    moments, counts = reduce(moments, reduction="sum").cpu(), reduce(counts, reduction="sum").cpu()
    signatures = gather_all(stats.signatures, state) if has_signatures else None
    offset = 0
    for i, block in enumerate(blocks):
        block.count = counts[i * steps : (i + 1) * steps].clone()
        for f in ("sum", "sumsq", "normsq"):
            size = getattr(block, f).numel()
            setattr(block, f, moments[offset : offset + size].view_as(getattr(block, f)).clone())
            offset += size
    if signatures is not None:
        stats.signatures = {name: torch.cat([part[name] for part in signatures]) for name, _ in layers}
    return stats


