"""Benchmark peak memory of :func:`diffmem.record` on many prompts against few.

Streaming statistics should make memory depend on the model only, not on the number of prompts. The benchmark
records ``--large`` prompts and ``--small`` prompts (default 1,000 and 100), each run in a fresh Python
subprocess, alternating the order across repetitions.

Method: each child loads the pipeline and builds its prompt list, runs ``gc.collect()``, then resets the kernel's
peak-RSS mark by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and reads its current RSS
(``VmRSS``, the baseline). After :func:`diffmem.record` returns it reads the peak RSS since the reset (``VmHWM``,
which also backs ``getrusage().ru_maxrss``). The growth ``VmHWM - baseline`` is the memory the recording itself
took at its peak, everything it allocated through torch, Python or the C libraries included, without the cost of
importing torch and loading the model, and without being hidden by an earlier peak (e.g. during loading).
Where ``clear_refs`` cannot be written, the child falls back to ``ru_maxrss`` minus the baseline and says so.

The result is the ratio of the median growths (large over small); the ratio of total peak RSS is logged too.
The script ends with one machine-readable line::

    peak_memory_ratio=<ratio>

Run ``python benchmarks/bench_memory.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("bench_memory")

_RESULT_PREFIX = "bench_memory_child="


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS; ``False`` where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def make_prompts(model: Path, count: int) -> list[str]:
    """``count`` prompts cycled from the model's manifest and base prompts.

    Args:
        model: Checkpoint folder.
        count: Number of prompts.

    Returns:
        The prompts.
    """
    from diffmem.data import read_manifest, read_prompts

    pool = [e.prompt for e in read_manifest(model / "memorization.jsonl")]
    base = model / "base_prompts.txt"
    if base.is_file():
        pool += read_prompts(base)
    return [pool[i % len(pool)] for i in range(count)]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Record ``args.num_prompts`` prompts in this process and measure the peak RSS growth.

    Args:
        args: Parsed flags (``model``, ``num_prompts``, ``record_steps``, ``batch_size``, ``threads``).

    Returns:
        ``baseline_kib``, ``peak_kib``, ``growth_kib``, ``method`` and the statistics' size in bytes.
    """
    import torch

    from diffmem.config import RecordConfig, SamplerConfig
    from diffmem.recording import record
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo import sampling_defaults

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(**sampling_defaults(args.model))
    steps = sampler.num_inference_steps
    config = RecordConfig(sampler=sampler, record_steps=min(args.record_steps, steps), batch_size=args.batch_size)
    prompts = make_prompts(args.model, args.num_prompts)
    gc.collect()
    reset = _reset_peak_rss()
    baseline = _status_kib("VmRSS")
    stats = record(pipe, prompts, config, progress=not args.no_progress)
    if reset:
        peak, method = _status_kib("VmHWM"), "VmHWM after clear_refs"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (clear_refs unavailable)"
    stats_bytes = sum(t.numel() * t.element_size() for t in stats.state_dict().values())
    return {"baseline_kib": baseline, "peak_kib": peak, "growth_kib": peak - baseline, "method": method,
            "stats_bytes": stats_bytes, "num_prompts": args.num_prompts}


def run_child(args: argparse.Namespace, num_prompts: int) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and return its measurement.

    Args:
        args: The parent's flags, passed on.
        num_prompts: Prompts the child records.

    Returns:
        The child's result dictionary.
    """
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(args.model),
        "--num-prompts", str(num_prompts), "--record-steps", str(args.record_steps),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child for {num_prompts} prompts failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise RuntimeError(f"child for {num_prompts} prompts printed no result:\n{proc.stdout[-2000:]}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    from diffmem.zoo import default_model_path

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=default_model_path(), help="checkpoint folder")
    p.add_argument("--small", type=int, default=100, help="prompts of the small run")
    p.add_argument("--large", type=int, default=1000, help="prompts of the large run")
    p.add_argument("--record-steps", type=int, default=2, help="leading steps recorded (tau)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--repeats", type=int, default=5, help="runs of each size, in alternating order")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the children")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (4 vs 40 prompts, 1 run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-prompts", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.small, args.large, args.repeats, args.record_steps = 4, 40, 1, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both sizes in fresh subprocesses and print the result line.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    if args.child:
        print(_RESULT_PREFIX + json.dumps(child(args)), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logger.info(
        "peak RSS growth of record(): %d vs %d prompts, %d recorded steps, batch %d, %d runs each, fresh process each",
        args.large, args.small, args.record_steps, args.batch_size, args.repeats,
    )
    runs: dict[int, list[dict[str, Any]]] = {args.small: [], args.large: []}
    pair = (args.small, args.large)
    jobs = [size for i in range(args.repeats) for size in (pair if i % 2 == 0 else pair[::-1])]
    for size in tqdm(jobs, desc="memory", unit="run", disable=args.no_progress):
        result = run_child(args, size)
        runs[size].append(result)
        logger.info(
            "%5d prompts: baseline %.1f MiB, peak %.1f MiB, growth %.1f MiB (%s), statistics %.1f KiB",
            size, result["baseline_kib"] / 1024, result["peak_kib"] / 1024, result["growth_kib"] / 1024,
            result["method"], result["stats_bytes"] / 1024,
        )
    growth = {size: statistics.median(r["growth_kib"] for r in rs) for size, rs in runs.items()}
    peak = {size: statistics.median(r["peak_kib"] for r in rs) for size, rs in runs.items()}
    ratio = growth[args.large] / max(growth[args.small], 1)
    logger.info(
        "median growth %.1f MiB (%d prompts) vs %.1f MiB (%d prompts); total peak RSS ratio %.3f",
        growth[args.large] / 1024, args.large, growth[args.small] / 1024, args.small,
        peak[args.large] / peak[args.small],
    )
    print(f"peak_memory_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
