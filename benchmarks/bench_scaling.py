"""Benchmark how the wall time of :func:`diffmem.record` scales with the number of prompts and with tau.

Two sweeps on the model at its sampler defaults: the number of prompts (at a fixed tau) and tau, the number of
recorded leading steps (at a fixed number of prompts). Every configuration of both sweeps runs once per
repetition, in a freshly shuffled order, so that a change in machine load spreads over all points instead of
bending one end of a curve; the median per configuration is used. A least-squares line is fitted to each sweep
and its R^2 and slope (seconds per prompt, seconds per step) are reported. The plot is saved as a PNG.

The script ends with one machine-readable line::

    scaling_r2_prompts=<r2> scaling_r2_tau=<r2>

Run ``python benchmarks/bench_scaling.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger("bench_scaling")

DEFAULT_PLOT = Path(__file__).resolve().parent / "results" / "scaling.png"


@dataclass
class LineFit:
    """A least-squares line ``y = slope * x + intercept``.

    Args:
        slope: Seconds per unit of ``x``.
        intercept: Seconds at ``x = 0``.
        r2: Coefficient of determination.
    """

    slope: float
    intercept: float
    r2: float


def fit_line(x: Sequence[float], y: Sequence[float]) -> LineFit:
    """Fit a line by least squares.

    Args:
        x: Abscissae (at least two distinct values).
        y: Ordinates.

    Returns:
        The fit and its R^2 (1.0 when ``y`` is constant and fitted exactly).
    """
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(xa, ya, 1)
    residual = float(((ya - (slope * xa + intercept)) ** 2).sum())
    total = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return LineFit(float(slope), float(intercept), r2)


def parse_grid(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if len(values) < 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two positive integers, got {text!r}")
    return values


def save_plot(
    path: Path,
    sweeps: dict[str, tuple[list[int], list[list[float]], LineFit]],
    labels: dict[str, tuple[str, str]],
    title: str,
) -> None:
    """Plot each sweep's timings (median and range) with its fitted line, one panel per sweep.

    Args:
        path: Output PNG.
        sweeps: Sweep name -> (x values, times per x, fit).
        labels: Sweep name -> (x-axis label, unit of x for the slope, e.g. ``"prompt"``).
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4))
    for ax, (name, (xs, times, fit)) in zip(np.atleast_1d(axes), sweeps.items()):
        med = [statistics.median(t) for t in times]
        lo = [m - min(t) for m, t in zip(med, times)]
        hi = [max(t) - m for m, t in zip(med, times)]
        ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=3, label="median (min-max)")
        grid = np.linspace(0, max(xs), 50)
        ax.plot(grid, fit.slope * grid + fit.intercept, "--",
                label=f"fit: {fit.slope * 1000:.1f} ms/{labels[name][1]} + {fit.intercept:.2f} s, R²={fit.r2:.4f}")
        ax.set_xlabel(labels[name][0])
        ax.set_ylabel("record() wall time (s)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    from diffmem.zoo import default_model_path

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=default_model_path(), help="checkpoint folder")
    p.add_argument("--prompts-grid", type=parse_grid, default=[8, 16, 32, 64], help="numbers of prompts")
    p.add_argument("--tau-grid", type=parse_grid, default=[2, 5, 10, 20], help="recorded steps (tau)")
    p.add_argument("--tau", type=int, default=10, help="tau of the prompt sweep")
    p.add_argument("--prompts", type=int, default=16, help="number of prompts of the tau sweep")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of every configuration")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled run order")
    p.add_argument("--out", type=Path, default=DEFAULT_PLOT, help="output PNG")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (3-point grids, 1 run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts_grid, args.tau_grid, args.tau, args.prompts, args.repeats = [1, 2, 3], [1, 2, 3], 1, 2, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run both sweeps, fit lines, save the plot and print the result line.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    from diffmem.config import RecordConfig, SamplerConfig
    from diffmem.data import read_manifest, read_prompts
    from diffmem.recording import record
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(**sampling_defaults(args.model))
    steps = sampler.num_inference_steps
    if max(args.tau_grid + [args.tau]) > steps:
        raise SystemExit(f"tau values must be <= the model's {steps} sampler steps")
    pool = [e.prompt for e in read_manifest(args.model / "memorization.jsonl")]
    if (args.model / "base_prompts.txt").is_file():
        pool += read_prompts(args.model / "base_prompts.txt")
    need = max(args.prompts_grid + [args.prompts])
    prompts = [pool[i % len(pool)] for i in range(need)]

    def config(tau: int) -> Any:
        return RecordConfig(sampler=sampler, record_steps=tau, batch_size=args.batch_size)

    points = [("prompts", n, n, args.tau) for n in args.prompts_grid]
    points += [("tau", t, args.prompts, t) for t in args.tau_grid]
    times: dict[tuple[str, int], list[float]] = {(kind, x): [] for kind, x, _, _ in points}
    logger.info(
        "prompts %s at tau=%d; tau %s at %d prompts; %d of %d steps max, batch %d, %d repeats, torch threads %d",
        args.prompts_grid, args.tau, args.tau_grid, args.prompts, max(args.tau_grid), steps, args.batch_size,
        args.repeats, torch.get_num_threads(),
    )
    record(pipe, prompts[:1], config(1), progress=False)  # warm-up, not timed
    rng = random.Random(args.seed)
    schedule = []
    for _ in range(args.repeats):
        schedule += rng.sample(points, len(points))
    for kind, x, n_prompts, tau in tqdm(schedule, desc="scaling", unit="run", disable=args.no_progress):
        start = time.perf_counter()
        record(pipe, prompts[:n_prompts], config(tau), progress=False)
        times[(kind, x)].append(time.perf_counter() - start)

    sweeps: dict[str, tuple[list[int], list[list[float]], LineFit]] = {}
    for kind, grid in (("prompts", args.prompts_grid), ("tau", args.tau_grid)):
        runs = [times[(kind, x)] for x in grid]
        fit = fit_line(grid, [statistics.median(t) for t in runs])
        sweeps[kind] = (grid, runs, fit)
        for x, t in zip(grid, runs):
            logger.info("%-7s %4d: median %.3f s (runs %s)", kind, x, statistics.median(t),
                        ", ".join(f"{v:.3f}" for v in t))
    fit_p, fit_t = sweeps["prompts"][2], sweeps["tau"][2]
    logger.info("per prompt: %.1f ms (intercept %.3f s, R^2 %.4f) at tau=%d",
                fit_p.slope * 1000, fit_p.intercept, fit_p.r2, args.tau)
    logger.info("per step: %.1f ms (intercept %.3f s, R^2 %.4f) at %d prompts",
                fit_t.slope * 1000, fit_t.intercept, fit_t.r2, args.prompts)
    title = (f"diffmem record() on {args.model.name}: {steps}-step schedule, batch {args.batch_size}, "
             f"{args.threads} thread(s), median of {args.repeats}")
    labels = {"prompts": (f"prompts (tau = {args.tau})", "prompt"), "tau": (f"tau ({args.prompts} prompts)", "step")}
    save_plot(args.out, sweeps, labels, title)
    logger.info("plot saved to %s", args.out)
    print(f"scaling_r2_prompts={fit_p.r2:.4f} scaling_r2_tau={fit_t.r2:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
