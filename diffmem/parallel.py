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
import time
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
    "idle_cpus",
    "choose_num_threads",
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




PROC_STAT = "/proc/stat"
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def _cpu_times(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(idle jiffies, total jiffies, online CPUs)`` from a ``/proc/stat`` file, or ``None`` when unreadable.

    Idle counts ``idle + iowait``; the total is ``user + nice + system + idle + iowait + irq + softirq + steal``
    (``guest`` time is already inside ``user``).
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    total_line = next((line.split() for line in lines if line.startswith("cpu ")), None)
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    if total_line is None or len(total_line) < 6 or not cpus:
        return None
    try:
        fields = [int(v) for v in total_line[1:9]]
    except ValueError:
        return None
    return fields[3] + fields[4], sum(fields), cpus


def _cgroup_cpus(path: str | os.PathLike) -> float | None:
    """The CPU quota of a cgroup v2 ``cpu.max`` file (``"200000 100000"`` is 2 CPUs); ``None`` without a limit."""
    try:
        with open(path, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def idle_cpus(interval: float = 0.3) -> float | None:
    """How many CPUs were idle over the next ``interval`` seconds, measured from ``/proc/stat``.

    Unlike the load average, which trails by a minute, this sees the machine as it is now.

    Returns:
        Idle CPUs (``idle fraction x online CPUs``), or ``None`` where ``/proc/stat`` cannot be read.
    """
    first = _cpu_times(PROC_STAT)
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times(PROC_STAT)
    if second is None or second[1] <= first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * second[2]


def choose_num_threads(interval: float = 0.3) -> tuple[int | None, str]:
    """The number of torch threads that fits the CPUs free right now, and why, in words.

    ``OMP_NUM_THREADS`` set by the user always wins (``None`` is returned: torch already follows it). Otherwise
    the idle CPUs measured over ``interval`` seconds (:func:`idle_cpus`), capped by the CPUs this process may run
    on and the cgroup quota, shared among the processes of this machine under ``accelerate launch``; without
    ``/proc/stat``, ``os.cpu_count()``.

    Returns:
        ``(threads or None, reason)``.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus(CGROUP_CPU_MAX)
    if quota is not None:
        cores = max(1, min(cores, int(quota)))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    idle = idle_cpus(interval)
    if idle is None:
        threads = max(1, cores // local)
        return threads, f"{cores} CPUs (idle time unknown)"
    threads = max(1, min(cores, round(idle)) // local)
    share = f", shared by {local} processes" if local > 1 else ""
    return threads, f"{idle:.1f} of {cores} CPUs idle over {interval:g} s{share}"
