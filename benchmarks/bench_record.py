"""Benchmark the cost of recording and the speed of diffmem's locate against a plain reference procedure.

Two measurements, each taken side by side (interleaved repetitions, medians of per-pair ratios) so that a busy
machine slows both sides alike:

1. **Hook overhead.** Full generations at the model's sampler defaults (all steps and the VAE decode), with an
   :class:`~diffmem.hooks.ActivationRecorder` attached that records every step (``record_steps`` equals
   ``num_inference_steps``, no early stop) versus without it. The ratio is hooked time over plain time.
2. **Locate speed-up.** A reference implementation of Chavhan et al.'s procedure written here from scratch: one
   full ``--steps``-step generation per prompt at batch 1 with the VAE decode, a forward hook on every GEGLU
   (``ff.net.0``) that recomputes the GEGLU output from its input (``proj`` -> value / gate -> ``value *
   gelu(gate)``) to obtain the input of ``ff.net.2``, the row-normalised statistic ``sum_rows x_j^2 / ||x||^2``
   accumulated per step over the first ``tau`` steps with both CFG halves mixed, and a dense re-implementation of
   the Wanda selection rule. The diffmem side is :func:`diffmem.record` (batched, stops after ``tau`` steps, no
   decode) on the same prompts plus :func:`diffmem.locate` with ``half="both"``, which pools the two CFG halves
   and therefore computes the same statistic. The IoU of the two masks checks that both computed the same thing;
   the IoU against diffmem's default conditional-half mask is reported as well.

Both wall-clock and process CPU time are measured for every run and logged; ``--clock`` picks the one the result
lines use (wall by default). CPU time leaves out the time spent waiting for a core, so it is the steadier
estimate while another job loads the machine.

The script ends with two machine-readable lines::

    hook_overhead=<ratio>
    locate_speedup=<ratio> mask_iou=<iou>

Run ``python benchmarks/bench_record.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

logger = logging.getLogger("bench_record")


# ------------------------------------------------------------------------------------------------------------------
# Model and prompts


@dataclass
class ModelUnderTest:
    """A loaded checkpoint with its sampler defaults and prompt sets.

    Args:
        path: Checkpoint folder.
        pipe: The loaded pipeline (CPU, fp32, progress bars off).
        defaults: Sampler settings from ``diffmem_defaults.json``.
        memorized: Memorized prompts of the manifest's ``locate`` split.
        base: Prompts of ``base_prompts.txt``.
    """

    path: Path
    pipe: Any
    defaults: dict[str, Any]
    memorized: list[str]
    base: list[str]

    def call_kwargs(self, num_inference_steps: int | None = None) -> dict[str, Any]:
        """Pipeline keyword arguments for a full generation at the model's defaults."""
        d = self.defaults
        return {
            "num_inference_steps": int(num_inference_steps or d.get("num_inference_steps", 50)),
            "guidance_scale": float(d.get("guidance_scale", 7.5)),
            "guidance_rescale": float(d.get("guidance_rescale", 0.0)),
            "height": d.get("height"),
            "width": d.get("width"),
        }


def load_model(path: Path, limit: int | None = None, base_prompts: Path | None = None) -> ModelUnderTest:
    """Load a checkpoint folder with ``memorization.jsonl``, ``base_prompts.txt`` and ``diffmem_defaults.json``.

    Args:
        path: Checkpoint folder.
        limit: Keep at most this many prompts of each set.
        base_prompts: Base prompt file (default: the folder's ``base_prompts.txt``). Where the default file is
            missing, the manifest's non-memorized split stands in, with a warning: the benchmark measures speed
            and agreement between two implementations, which any non-memorized prompts exercise.

    Returns:
        The model and its prompts.
    """
    from diffmem.data import read_manifest, read_prompts
    from diffmem.pipelines import load_pipeline
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    entries = read_manifest(path / "memorization.jsonl")
    memorized = [e.prompt for e in entries if e.memorized and e.split == "locate"]
    if base_prompts is None and not (path / "base_prompts.txt").is_file():
        logger.warning("%s has no base_prompts.txt; using the manifest's non-memorized prompts as the base set", path)
        base = [e.prompt for e in entries if not e.memorized]
    else:
        base = read_prompts(base_prompts or path / "base_prompts.txt")
    if limit is not None:
        memorized, base = memorized[:limit], base[:limit]
    return ModelUnderTest(path, pipe, sampling_defaults(path), memorized, base)


@dataclass
class Timings:
    """Wall-clock and process CPU times of repeated runs, in seconds.

    CPU time (``time.process_time``, all threads of this process) leaves out the time the process waits for a
    core, so it is the steadier figure when other jobs load the machine; wall time is what a user waits.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def get(self, clock: str) -> list[float]:
        """The times of one clock, ``"wall"`` or ``"cpu"``."""
        return self.wall if clock == "wall" else self.cpu


def interleaved(
    label_a: str, run_a: Callable[[], Any], label_b: str, run_b: Callable[[], Any], pairs: int, progress: bool
) -> tuple[Timings, Timings]:
    """Time two procedures in alternating order (AB, BA, AB, ...).

    Args:
        label_a: Name of procedure A (for the progress bar).
        run_a: Procedure A.
        label_b: Name of procedure B.
        run_b: Procedure B.
        pairs: Number of A/B pairs.
        progress: Show a progress bar.

    Returns:
        The timings of A and of B, one entry per pair.
    """
    times_a, times_b = Timings(), Timings()
    for i in tqdm(range(pairs), desc=f"{label_a} vs {label_b}", unit="pair", disable=not progress):
        order = ((run_a, times_a), (run_b, times_b))
        for fn, out in order if i % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            out.cpu.append(time.process_time() - cpu)
            out.wall.append(time.perf_counter() - wall)
    return times_a, times_b


def median_ratio(numerator: Timings, denominator: Timings, clock: str) -> float:
    """Median over pairs of ``numerator / denominator`` on one clock."""
    return statistics.median(a / b for a, b in zip(numerator.get(clock), denominator.get(clock)))


def describe(label_a: str, a: Timings, label_b: str, b: Timings) -> str:
    """One log line: medians of both sides and the median per-pair ratio, on both clocks."""
    parts = []
    for clock in ("wall", "cpu"):
        ratios = [x / y for x, y in zip(a.get(clock), b.get(clock))]
        med_a, med_b = statistics.median(a.get(clock)), statistics.median(b.get(clock))
        parts.append(
            f"{clock}: {label_a} {med_a:.3f} s, {label_b} {med_b:.3f} s, ratio median {statistics.median(ratios):.3f} "
            f"(pairs {', '.join(f'{r:.3f}' for r in ratios)})"
        )
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# 1. Hook overhead


def hook_overhead(
    model: ModelUnderTest, prompts: list[str], pairs: int, seed: int, clock: str, progress: bool
) -> float:
    """Median ratio of hooked to plain full-generation time.

    Args:
        model: The model under test.
        prompts: Prompts of one generation batch.
        pairs: Interleaved repetitions.
        seed: Seed of the first image.
        clock: ``"wall"`` or ``"cpu"``, the clock of the returned ratio.
        progress: Show a progress bar.

    Returns:
        The median of the per-pair ratios (hooked / plain).
    """
    from diffmem.config import RecordConfig
    from diffmem.hooks import ActivationRecorder
    from diffmem.sampling import generate_images

    kwargs = model.call_kwargs()
    steps = kwargs["num_inference_steps"]
    config = RecordConfig(
        num_inference_steps=steps,
        record_steps=steps,
        guidance_scale=kwargs["guidance_scale"],
        height=kwargs["height"],
        width=kwargs["width"],
    )

    def plain() -> None:
        generate_images(model.pipe, prompts, seed=seed, batch_size=len(prompts), progress=False, **kwargs)

    last: dict[str, ActivationRecorder] = {}

    def hooked() -> None:
        recorder = ActivationRecorder(model.pipe, config, stop_generation=False)
        with recorder:
            recorder.start_batch(len(prompts))
            generate_images(model.pipe, prompts, seed=seed, batch_size=len(prompts), progress=False, **kwargs)
        last["recorder"] = recorder

    logger.info("hook overhead: %d prompts per generation, %d steps, %d pairs", len(prompts), steps, pairs)
    plain()  # warm-up of both paths, not timed
    hooked()
    t_hooked, t_plain = interleaved("hooked", hooked, "plain", plain, pairs, progress)
    stats = last["recorder"].stats
    counts = next(iter(stats.halves["cond"].values())).count
    if not bool((counts > 0).all()):
        raise RuntimeError(f"the recorder missed steps: token rows per step {counts.tolist()}")
    logger.info("hook overhead: %s", describe("hooked", t_hooked, "plain", t_plain))
    return median_ratio(t_hooked, t_plain, clock)


# ------------------------------------------------------------------------------------------------------------------
# 2. Reference locate procedure


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise in products such as ``0.07 * 100``."""
    return math.ceil(round(x, 9))


class GegluRecomputeHooks:
    """Forward hooks on every GEGLU ``ff.net.0`` that recompute its output and accumulate the Chavhan statistic.

    For each denoiser call (one step) below ``tau`` the GEGLU output ``x = value * gelu(gate)`` is recomputed
    from the hook's input and every token row of the whole batch (both CFG halves) is added to
    ``normsq[t] += sum_rows x^2 / ||x||^2`` and ``count[t] += rows``.

    Args:
        denoiser: The UNet.
        tau: Number of leading steps to accumulate.
    """

    def __init__(self, denoiser: nn.Module, tau: int) -> None:
        from diffusers.models.activations import GEGLU

        self.denoiser = denoiser
        self.tau = tau
        self.step = 0
        self.geglus: dict[str, nn.Module] = {}
        for name, module in denoiser.named_modules():
            if isinstance(module, GEGLU) and name.endswith("ff.net.0"):
                self.geglus[name[: -len("net.0")] + "net.2"] = module
        if not self.geglus:
            raise RuntimeError(f"no GEGLU ff.net.0 modules in {type(denoiser).__name__}")
        self.normsq: dict[str, Tensor] = {}
        self.count: dict[str, Tensor] = {}
        for name, module in self.geglus.items():
            self.normsq[name] = torch.zeros(tau, module.proj.out_features // 2, dtype=torch.float64)
            self.count[name] = torch.zeros(tau, dtype=torch.float64)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> GegluRecomputeHooks:
        self._handles.append(self.denoiser.register_forward_pre_hook(self._count_step))
        for name, module in self.geglus.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start_generation(self) -> None:
        """Restart the step counter before each pipeline call."""
        self.step = -1

    def _count_step(self, module: nn.Module, args: tuple) -> None:
        self.step += 1

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            step = self.step
            if step >= self.tau:
                return
            value, gate = module.proj(inputs[0]).chunk(2, dim=-1)
            x = (value * F.gelu(gate)).reshape(-1, value.shape[-1]).float()
            sq = x * x
            row_norm2 = sq.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            self.normsq[name][step] += (sq / row_norm2).sum(dim=0).double()
            self.count[name][step] += x.shape[0]

        return hook

    def act_norm(self) -> dict[str, Tensor]:
        """Per-step feature norms ``sqrt(normsq / count)``, fp32 ``[tau, inner]`` per ``ff.net.2`` layer name."""
        return {
            name: (s / self.count[name].clamp_min(1).unsqueeze(1)).sqrt().float() for name, s in self.normsq.items()
        }


def reference_statistics(
    model: ModelUnderTest, prompts: list[str], steps: int, tau: int, seed: int
) -> dict[str, Tensor]:
    """Full generations at batch 1 with GEGLU-recomputing hooks; returns the per-step feature norms.

    Args:
        model: The model under test.
        prompts: Prompts, one generation each.
        steps: Sampler steps of each generation.
        tau: Leading steps to accumulate.
        seed: Seed of every generation's initial noise.

    Returns:
        ``ff.net.2`` layer name -> fp32 ``[tau, inner]``.
    """
    kwargs = model.call_kwargs(steps)
    hooks = GegluRecomputeHooks(model.pipe.unet, tau)
    with torch.no_grad(), hooks:
        for prompt in prompts:
            hooks.start_generation()
            model.pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return hooks.act_norm()


def reference_wanda_mask(
    weights: dict[str, Tensor], act_mem: dict[str, Tensor], act_base: dict[str, Tensor], ratio: float, tau: int
) -> dict[str, Tensor]:
    """Chavhan et al.'s selection, densely: per step and row, the top ``ratio`` of ``|W| * a_mem`` that beat the base.

    Args:
        weights: Layer name -> ``ff.net.2`` weight ``[out, in]``.
        act_mem: Layer name -> memorized feature norms ``[tau, in]``.
        act_base: Layer name -> base feature norms ``[tau, in]``.
        ratio: Fraction of each row to consider.
        tau: Steps to unite.

    Returns:
        Layer name -> bool ``[out, in]``.
    """
    masks: dict[str, Tensor] = {}
    for name, weight in weights.items():
        absw = weight.detach().float().abs()
        k = min(absw.shape[1], max(1, _ceil(ratio * absw.shape[1])))
        selected = torch.zeros_like(absw, dtype=torch.bool)
        for t in range(tau):
            s_mem = absw * act_mem[name][t]
            s_base = absw * act_base[name][t]
            top = s_mem.topk(k, dim=1).indices
            beats = s_mem.gather(1, top) > s_base.gather(1, top)
            selected |= torch.zeros_like(selected).scatter_(1, top, beats)
        masks[name] = selected
    return masks


def locate_speedup(
    model: ModelUnderTest,
    steps: int,
    tau: int,
    ratio: float,
    batch_size: int,
    repeats: int,
    seed: int,
    clock: str,
    progress: bool,
) -> tuple[float, float, float]:
    """Time the reference procedure against diffmem's record + locate, interleaved, and compare the masks.

    Args:
        model: The model under test.
        steps: Sampler steps (the reference generates all of them).
        tau: Leading steps used by both.
        ratio: Wanda ratio.
        batch_size: diffmem's prompts per pipeline call.
        repeats: Interleaved repetitions of each side.
        seed: Seed of every generation's initial noise.
        clock: ``"wall"`` or ``"cpu"``, the clock of the returned speed-up.
        progress: Show a progress bar.

    Returns:
        ``(speedup, iou_both, iou_cond)``: the median per-pair time ratio reference / diffmem, the IoU of the
        reference mask with diffmem's ``half="both"`` mask and with its default ``half="cond"`` mask.
    """
    from diffmem.config import LocateConfig, RecordConfig
    from diffmem.hooks import record
    from diffmem.localization import locate
    from diffmem.masks import Mask, mask_iou

    kwargs = model.call_kwargs(steps)
    rcfg = RecordConfig(
        num_inference_steps=steps,
        record_steps=tau,
        guidance_scale=kwargs["guidance_scale"],
        batch_size=batch_size,
        seed=seed,
        height=kwargs["height"],
        width=kwargs["width"],
    )
    pipe_kwargs = {"guidance_rescale": kwargs["guidance_rescale"]}
    modules = dict(model.pipe.unet.named_modules())
    results: dict[str, Any] = {}

    def reference() -> None:
        act_mem = reference_statistics(model, model.memorized, steps, tau, seed)
        act_base = reference_statistics(model, model.base, steps, tau, seed)
        weights = {name: modules[name].weight for name in act_mem}
        results["reference"] = Mask(reference_wanda_mask(weights, act_mem, act_base, ratio, tau))

    def diffmem_side() -> None:
        stats_mem = record(model.pipe, model.memorized, rcfg, progress=False, pipe_kwargs=pipe_kwargs)
        stats_base = record(model.pipe, model.base, rcfg, progress=False, pipe_kwargs=pipe_kwargs)
        results["both"] = locate(model.pipe, stats_mem, stats_base, LocateConfig(ratio=ratio, record_steps=tau, half="both"))
        results["stats"] = (stats_mem, stats_base)

    logger.info(
        "locate: %d memorized + %d base prompts, reference %d steps at batch 1 with decode, diffmem batch %d, "
        "tau=%d, ratio=%g, %d repetitions",
        len(model.memorized), len(model.base), steps, batch_size, tau, ratio, repeats,
    )
    with torch.no_grad():
        t_ref, t_dm = interleaved("reference", reference, "diffmem", diffmem_side, repeats, progress)
    stats_mem, stats_base = results["stats"]
    cond_mask = locate(model.pipe, stats_mem, stats_base, LocateConfig(ratio=ratio, record_steps=tau, half="cond"))
    reference_mask: Mask = results["reference"]
    iou_both = mask_iou(reference_mask, results["both"])["overall"]
    iou_cond = mask_iou(reference_mask, cond_mask)["overall"]
    logger.info("locate: %s", describe("reference", t_ref, "diffmem", t_dm))
    logger.info(
        "masks: reference %d weights, diffmem half=both %d, diffmem half=cond %d; IoU reference/both %.4f, "
        "reference/cond %.4f",
        reference_mask.num_masked(), results["both"].num_masked(), cond_mask.num_masked(), iou_both, iou_cond,
    )
    return median_ratio(t_ref, t_dm, clock), iou_both, iou_cond


# ------------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    from diffmem.zoo import default_model_path

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=default_model_path(), help="checkpoint folder")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    p.add_argument("--base-prompts", type=Path, default=None, help="base prompt file (default: MODEL/base_prompts.txt)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="clock of the printed ratios")
    p.add_argument("--pairs", type=int, default=20, help="interleaved hooked/plain generation pairs")
    p.add_argument("--overhead-prompts", type=int, default=8, help="prompts per generation in the overhead test")
    p.add_argument("--repeats", type=int, default=3, help="interleaved reference/diffmem locate repetitions")
    p.add_argument("--steps", type=int, default=50, help="sampler steps of the locate comparison")
    p.add_argument("--tau", type=int, default=10, help="leading steps recorded (tau)")
    p.add_argument("--ratio", type=float, default=0.01, help="Wanda ratio of each row")
    p.add_argument("--batch-size", type=int, default=8, help="diffmem record batch size")
    p.add_argument("--limit", type=int, default=None, help="at most this many memorized and base prompts each")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (2 pairs, 1 repeat, 4 prompts)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.repeats, args.overhead_prompts = 2, 1, 2
        args.limit = 4 if args.limit is None else args.limit
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run both measurements and print the two result lines.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.limit, args.base_prompts)
    logger.info("model %s, defaults %s, torch threads %d", args.model, model.defaults, torch.get_num_threads())
    progress = not args.no_progress
    prompts = (model.memorized + model.base)[: args.overhead_prompts]
    overhead = hook_overhead(model, prompts, args.pairs, args.seed, args.clock, progress)
    speedup, iou_both, iou_cond = locate_speedup(
        model, args.steps, args.tau, args.ratio, args.batch_size, args.repeats, args.seed, args.clock, progress
    )
    logger.info(
        "IoU of the reference (CFG halves mixed) with diffmem's default conditional-half mask: %.4f", iou_cond
    )
    print(f"hook_overhead={overhead:.4f}")
    print(f"locate_speedup={speedup:.2f} mask_iou={iou_both:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
