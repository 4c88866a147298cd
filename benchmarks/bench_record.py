"""Benchmark the cost of recording and diffmem's locate against an independent reference of the published procedure.

Two measurements, each taken side by side (interleaved repetitions, medians of per-pair ratios) so that a busy
machine slows both sides alike:

1. **Hook overhead.** Full generations at the model's sampler defaults (all steps and the VAE decode), with an
   :class:`~diffmem.recording.ActivationRecorder` attached that records every step (``record_steps`` equals
   ``num_inference_steps``, no early stop) versus without it. The ratio is hooked time over plain time.
2. **Locate speed-up and agreement.** A reference of Chavhan et al.'s locate procedure, written here from scratch
   the way their released code runs it and sharing no code with diffmem's recorder or selection:

   * one full generation per prompt at batch 1 with the VAE decode, the global seed reset before each;
   * the empty prompt as the base, generated with the same seed right before each memorized prompt (the
     original loop pairs one base prompt with each target prompt);
   * a plain forward hook on every ``ff.net.2`` that takes its input for the whole ``[uncond; cond]`` batch (the
     CFG halves mixed), L2-normalises each token row, and adds the squared rows into a per-step column norm; a
     layer's step is the number of times it has been called in the generation;
   * per step and layer the Wanda score ``|W| * ||X||`` of the memorized and of the base generations; in each
     output row the top ``int(ratio * in)`` memorized scores (a full descending sort) are candidates, kept where
     they beat the base score at the same weight;
   * a count over the first ``tau`` steps, and a weight is masked when its count is ``> select_ratio * tau``
     (``--select-ratio``, 0 by default: a plain union).

   The diffmem side is :func:`diffmem.record` on the memorized prompts and on ``BASE_PRESETS["chavhan2024"]`` (the
   empty prompt, recorded once with the same seed: its normalised statistic equals that of the paired
   generations), batched and stopped after ``tau`` steps without a decode, then :func:`diffmem.locate` with
   ``LocateConfig.from_preset("chavhan2024", ratio=R, record_steps=tau)``. The IoU of the two masks checks that
   the preset reproduces the procedure. After the timed repetitions the script records the generic base prompt
   set as well and reports the IoU of diffmem's *default* settings with the reference at every ratio, and
   (``--factors``) the IoU when a single one of the differences is switched, either from diffmem's default to the
   original's choice or from the preset back to diffmem's default.

Both wall-clock and process CPU time are measured for every run and logged; ``--clock`` picks the one the result
lines use (wall by default). CPU time leaves out the time spent waiting for a core, so it is the steadier
estimate while another job loads the machine.

Result lines (``--no-overhead`` drops the first; ``--factors`` adds the ``factor=`` lines)::

    hook_overhead=<ratio>
    locate_speedup=<ratio> mask_iou=<iou>
    ratio=<R> mask_iou_preset=<iou> mask_iou_default=<iou> weights_reference=<n> weights_preset=<n> weights_default=<n>
    factor=<name> ratio=<R> select_ratio=<f> iou_default=<iou> iou_default_with_original=<iou> iou_preset=<iou> iou_preset_with_diffmem=<iou>

Run ``python benchmarks/bench_record.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import logging
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

    def sampler(self, num_inference_steps: int | None = None) -> Any:
        """The model's sampler settings (a ``SamplerConfig``), optionally with another number of steps."""
        from diffmem.config import SamplerConfig

        steps = {"num_inference_steps": int(num_inference_steps)} if num_inference_steps else {}
        return SamplerConfig(**{**self.defaults, **steps})

    def call_kwargs(self, num_inference_steps: int | None = None) -> dict[str, Any]:
        """Pipeline keyword arguments for a full generation at the model's defaults (for the reference code, which
        calls the pipeline itself)."""
        return self.sampler(num_inference_steps).call_kwargs(self.pipe)


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
    from diffmem.recording import ActivationRecorder
    from diffmem.sampling import generate_images

    sampler = model.sampler()
    steps = sampler.num_inference_steps
    config = RecordConfig(sampler=sampler, record_steps=steps)

    def plain() -> None:
        generate_images(model.pipe, prompts, seed=seed, batch_size=len(prompts), progress=False, sampler=sampler)

    last: dict[str, ActivationRecorder] = {}

    def hooked() -> None:
        recorder = ActivationRecorder(model.pipe, config, stop_generation=False)
        with recorder:
            recorder.start_batch(len(prompts))
            generate_images(model.pipe, prompts, seed=seed, batch_size=len(prompts), progress=False, sampler=sampler)
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
# 2. Reference locate procedure (Chavhan et al. 2024, as their released code runs it)


class ColumnNormHooks:
    """Forward hooks on every ``ff.net.2`` that accumulate the per-step column norm of its row-normalised input.

    Each call of a hooked layer is one step of that layer (the first call is step 0). For steps below ``tau`` the
    input of the whole batch (both CFG halves) is flattened to token rows, each row is L2-normalised, and the
    squared rows are added: ``colsq[t] += sum_rows (x / ||x||)^2``. The column norm is ``sqrt(colsq)``.

    Args:
        denoiser: The UNet.
        tau: Number of leading steps to accumulate.
    """

    def __init__(self, denoiser: nn.Module, tau: int) -> None:
        self.tau = tau
        self.layers = {
            name: module
            for name, module in denoiser.named_modules()
            if name.endswith("ff.net.2") and isinstance(module, nn.Linear)
        }
        if not self.layers:
            raise RuntimeError(f"no ff.net.2 linear layers in {type(denoiser).__name__}")
        self.colsq = {name: torch.zeros(tau, m.in_features, dtype=torch.float64) for name, m in self.layers.items()}
        self.calls = dict.fromkeys(self.layers, 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ColumnNormHooks:
        self.calls = dict.fromkeys(self.layers, 0)
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            step = self.calls[name]
            self.calls[name] += 1
            if step >= self.tau:
                return
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            rows = F.normalize(rows, p=2, dim=1)
            self.colsq[name][step] += (rows * rows).sum(dim=0).double()

        return hook

    def column_norms(self) -> dict[str, Tensor]:
        """``ff.net.2`` layer name -> fp32 ``[tau, in]`` column norms."""
        return {name: s.sqrt().float() for name, s in self.colsq.items()}


def reference_statistics(
    model: ModelUnderTest, prompts: list[str], steps: int, tau: int, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The original loop: for each prompt, the empty base prompt and then the prompt, each generated in full.

    Args:
        model: The model under test.
        prompts: Memorized prompts, one generation each.
        steps: Sampler steps of each generation.
        tau: Leading steps to accumulate.
        seed: Seed set before every generation.

    Returns:
        The column norms of the memorized and of the base generations (layer name -> fp32 ``[tau, in]``).
    """
    kwargs = model.call_kwargs(steps)
    mem, base = ColumnNormHooks(model.pipe.unet, tau), ColumnNormHooks(model.pipe.unet, tau)
    with torch.no_grad():
        for prompt in prompts:
            for hooks, text in ((base, ""), (mem, prompt)):
                with hooks:
                    torch.manual_seed(seed)
                    model.pipe(text, **kwargs)
                if any(calls < tau for calls in hooks.calls.values()):
                    raise RuntimeError(f"a generation ran fewer than tau={tau} denoiser calls: {hooks.calls}")
    return mem.column_norms(), base.column_norms()


def reference_step_counts(
    weights: dict[str, Tensor], norm_mem: dict[str, Tensor], norm_base: dict[str, Tensor], ratio: float, tau: int
) -> dict[str, Tensor]:
    """In how many of the first ``tau`` steps each weight is selected by the original rule.

    Per step: ``metric = |W| * norm`` for the memorized and the base norms; in each row the first
    ``int(ratio * in)`` columns of a descending sort of the memorized metric are candidates, and a candidate is
    selected where its memorized metric is greater than its base metric.

    Args:
        weights: Layer name -> ``ff.net.2`` weight ``[out, in]``.
        norm_mem: Layer name -> memorized column norms ``[tau, in]``.
        norm_base: Layer name -> base column norms ``[tau, in]``.
        ratio: Fraction of each row to consider.
        tau: Steps to count.

    Returns:
        Layer name -> int32 ``[out, in]`` counts in ``[0, tau]``.
    """
    counts: dict[str, Tensor] = {}
    for name, weight in weights.items():
        absw = weight.detach().float().abs()
        k = int(ratio * absw.shape[1])
        count = torch.zeros(absw.shape, dtype=torch.int32)
        for t in range(tau):
            metric_base = absw * norm_base[name][t]
            metric_mem = absw * norm_mem[name][t]
            order = torch.sort(metric_mem, dim=1, descending=True).indices[:, :k]
            candidate = torch.zeros(absw.shape, dtype=torch.bool).scatter_(1, order, True)
            count += (candidate & (metric_mem > metric_base)).to(torch.int32)
        counts[name] = count
    return counts


def reference_mask(counts: dict[str, Tensor], select_ratio: float, tau: int) -> dict[str, Tensor]:
    """Weights selected in more than ``select_ratio * tau`` steps (the original's strict threshold)."""
    return {name: c > select_ratio * tau for name, c in counts.items()}


def iou(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Intersection over union of two masks (layer name -> bool tensor) over all layers; 1.0 when both are empty."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def count_masked(mask: dict[str, Tensor]) -> int:
    """Number of masked weights."""
    return sum(int(m.sum()) for m in mask.values())


# ------------------------------------------------------------------------------------------------------------------
# 3. diffmem against the reference

# The differences between diffmem's defaults and the original code that locate can switch one at a time: each
# factor's (diffmem default, original) LocateConfig settings. The base prompts are the fourth locate factor.
LOCATE_FACTORS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "cfg_halves": ({"half": "cond"}, {"half": "both"}),
    "k_rounding": ({"k_rounding": "ceil"}, {"k_rounding": "floor"}),
    "step_rule": ({"strict_step_count": False}, {"strict_step_count": True}),
}


@dataclass
class Recorded:
    """Statistics recorded by diffmem and column norms of the reference, kept for the untimed comparisons."""

    norm_mem: dict[str, Tensor]
    norm_base: dict[str, Tensor]
    stats_mem: Any
    stats_empty: Any
    stats_base: Any = None


def diffmem_mask(model: ModelUnderTest, rec: Recorded, original: dict[str, bool], ratio: float, tau: int,
                 select_ratio: float) -> dict[str, Tensor]:
    """diffmem's mask with each factor at diffmem's default or the original's choice.

    Args:
        model: The model under test.
        rec: Recorded statistics.
        original: Factor name (``LOCATE_FACTORS`` and ``"base_prompts"``) -> use the original's choice.
        ratio: Wanda ratio.
        tau: Steps.
        select_ratio: ``min_step_fraction``.

    Returns:
        Layer name -> bool ``[out, in]``.
    """
    from diffmem.config import LocateConfig
    from diffmem.localization import locate

    settings: dict[str, Any] = {"ratio": ratio, "record_steps": tau, "min_step_fraction": select_ratio}
    for name, (default, orig) in LOCATE_FACTORS.items():
        settings.update(orig if original[name] else default)
    if all(original.values()):
        config = LocateConfig.from_preset("chavhan2024", **settings)
    else:
        config = LocateConfig(**settings)
    base = rec.stats_empty if original["base_prompts"] else rec.stats_base
    return dict(locate(model.pipe, rec.stats_mem, base, config).layers)


FACTOR_NAMES = ("cfg_halves", "base_prompts", "k_rounding", "step_rule")


def locate_speedup(
    model: ModelUnderTest,
    steps: int,
    tau: int,
    ratio: float,
    select_ratio: float,
    batch_size: int,
    repeats: int,
    seed: int,
    clock: str,
    progress: bool,
) -> tuple[float, float, Recorded]:
    """Time the reference procedure against diffmem's record + locate with the preset, interleaved.

    Args:
        model: The model under test.
        steps: Sampler steps (the reference generates all of them).
        tau: Leading steps used by both.
        ratio: Wanda ratio.
        select_ratio: Step-count threshold of both sides.
        batch_size: diffmem's prompts per pipeline call.
        repeats: Interleaved repetitions of each side.
        seed: Seed of every generation's initial noise.
        clock: ``"wall"`` or ``"cpu"``, the clock of the returned speed-up.
        progress: Show a progress bar.

    Returns:
        ``(speedup, iou_preset, recorded)``: the median per-pair time ratio reference / diffmem, the IoU of the
        reference mask with the preset's, and the statistics of the last repetition of both sides.
    """
    from diffmem.config import BASE_PRESETS, LocateConfig, RecordConfig
    from diffmem.recording import record
    from diffmem.localization import locate

    rcfg = RecordConfig(sampler=model.sampler(steps), record_steps=tau, batch_size=batch_size, seed=seed)
    modules = dict(model.pipe.unet.named_modules())
    base_prompts = BASE_PRESETS["chavhan2024"]
    assert base_prompts is not None
    out: dict[str, Any] = {}

    def reference() -> None:
        norm_mem, norm_base = reference_statistics(model, model.memorized, steps, tau, seed)
        weights = {name: modules[name].weight for name in norm_mem}
        counts = reference_step_counts(weights, norm_mem, norm_base, ratio, tau)
        out["reference"] = reference_mask(counts, select_ratio, tau)
        out["norms"] = (norm_mem, norm_base)

    def diffmem_side() -> None:
        stats_mem = record(model.pipe, model.memorized, rcfg, progress=False)
        stats_empty = record(model.pipe, base_prompts, rcfg, progress=False)
        config = LocateConfig.from_preset("chavhan2024", ratio=ratio, record_steps=tau, min_step_fraction=select_ratio)
        out["preset"] = dict(locate(model.pipe, stats_mem, stats_empty, config).layers)
        out["stats"] = (stats_mem, stats_empty)

    logger.info(
        "locate: %d memorized prompts, reference: %d + %d generations of %d steps at batch 1 with decode; diffmem: "
        "record batch %d and the empty prompt once, tau=%d, ratio=%g, select_ratio=%g, %d repetitions",
        len(model.memorized), len(model.memorized), len(model.memorized), steps, batch_size, tau, ratio,
        select_ratio, repeats,
    )
    with torch.no_grad():
        t_ref, t_dm = interleaved("reference", reference, "diffmem", diffmem_side, repeats, progress)
    iou_preset = iou(out["reference"], out["preset"])
    logger.info("locate: %s", describe("reference", t_ref, "diffmem", t_dm))
    logger.info(
        "masks at ratio %g: reference %d weights, preset %d; IoU %.4f",
        ratio, count_masked(out["reference"]), count_masked(out["preset"]), iou_preset,
    )
    rec = Recorded(*out["norms"], *out["stats"])
    with torch.no_grad():
        rec.stats_base = record(model.pipe, model.base, rcfg, progress=False)
    return median_ratio(t_ref, t_dm, clock), iou_preset, rec


def compare_settings(
    model: ModelUnderTest, rec: Recorded, ratio: float, tau: int, select_ratio: float
) -> dict[str, Any]:
    """Masks of the reference, the preset and diffmem's defaults at one ratio, and their IoUs."""
    modules = dict(model.pipe.unet.named_modules())
    weights = {name: modules[name].weight for name in rec.norm_mem}
    counts = reference_step_counts(weights, rec.norm_mem, rec.norm_base, ratio, tau)
    ref = reference_mask(counts, select_ratio, tau)
    preset = diffmem_mask(model, rec, dict.fromkeys(FACTOR_NAMES, True), ratio, tau, select_ratio)
    default = diffmem_mask(model, rec, dict.fromkeys(FACTOR_NAMES, False), ratio, tau, select_ratio)
    return {
        "reference": ref, "preset": preset, "default": default, "counts": counts,
        "iou_preset": iou(ref, preset), "iou_default": iou(ref, default),
    }


def factor_lines(
    model: ModelUnderTest, rec: Recorded, ratio: float, tau: int, select_ratio: float, step_select_ratio: float
) -> list[str]:
    """One result line per difference: the IoU with the reference when only that factor is switched.

    ``iou_default_with_original`` starts from diffmem's default and switches the factor to the original's choice;
    ``iou_preset_with_diffmem`` starts from the preset and switches it back to diffmem's default. The step rule
    only matters where ``select_ratio * tau`` is a whole number above 0, so its line uses ``step_select_ratio``.
    """
    modules = dict(model.pipe.unet.named_modules())
    weights = {name: modules[name].weight for name in rec.norm_mem}
    counts = reference_step_counts(weights, rec.norm_mem, rec.norm_base, ratio, tau)
    lines = []
    for factor in FACTOR_NAMES:
        f = step_select_ratio if factor == "step_rule" else select_ratio
        ref = reference_mask(counts, f, tau)
        values = {}
        for start, label in ((False, "default"), (True, "preset")):
            flags = dict.fromkeys(FACTOR_NAMES, start)
            values[f"iou_{label}"] = iou(ref, diffmem_mask(model, rec, flags, ratio, tau, f))
            flags[factor] = not start
            switched = "with_original" if label == "default" else "with_diffmem"
            values[f"iou_{label}_{switched}"] = iou(ref, diffmem_mask(model, rec, flags, ratio, tau, f))
        lines.append(
            f"factor={factor} ratio={ratio:g} select_ratio={f:g} "
            + " ".join(f"{key}={value:.4f}" for key, value in values.items())
        )
    return lines


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
    p.add_argument("--base-prompts", type=Path, default=None,
                   help="generic base prompt file of diffmem's default (default: MODEL/base_prompts.txt)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="clock of the printed ratios")
    p.add_argument("--no-overhead", action="store_true", help="skip the hook-overhead measurement")
    p.add_argument("--pairs", type=int, default=20, help="interleaved hooked/plain generation pairs")
    p.add_argument("--overhead-prompts", type=int, default=8, help="prompts per generation in the overhead test")
    p.add_argument("--repeats", type=int, default=5, help="interleaved reference/diffmem locate repetitions")
    p.add_argument("--steps", type=int, default=None, help="sampler steps of the locate comparison (model default)")
    p.add_argument("--tau", type=int, default=10, help="leading steps used (tau)")
    p.add_argument("--ratio", type=float, default=0.01, help="Wanda ratio of each row (timed)")
    p.add_argument("--extra-ratios", type=float, nargs="*", default=[0.5],
                   help="further ratios compared (untimed) on the statistics of the last repetition")
    p.add_argument("--select-ratio", type=float, default=0.0,
                   help="step-count threshold: masked when selected in more than select_ratio * tau steps")
    p.add_argument("--factors", action="store_true", help="also print the IoU with one difference switched at a time")
    p.add_argument("--step-select-ratio", type=float, default=0.5,
                   help="select_ratio of the step_rule factor line (the rules only differ where select_ratio * tau "
                        "is a whole number above 0)")
    p.add_argument("--batch-size", type=int, default=8, help="diffmem record batch size")
    p.add_argument("--limit", type=int, default=None, help="at most this many memorized and base prompts each")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (2 pairs, 1 repeat, 4 prompts)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.repeats, args.overhead_prompts = 2, 1, 2
        args.limit = 4 if args.limit is None else args.limit
    if not 0 <= args.select_ratio <= 1 or not 0 <= args.step_select_ratio <= 1:
        p.error("--select-ratio and --step-select-ratio must be in [0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements and print the result lines.

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
    steps = args.steps or int(model.defaults.get("num_inference_steps", 50))
    logger.info("model %s, defaults %s, torch threads %d", args.model, model.defaults, torch.get_num_threads())
    progress = not args.no_progress
    lines = []
    if not args.no_overhead:
        prompts = (model.memorized + model.base)[: args.overhead_prompts]
        overhead = hook_overhead(model, prompts, args.pairs, args.seed, args.clock, progress)
        lines.append(f"hook_overhead={overhead:.4f}")
    speedup, iou_preset, rec = locate_speedup(
        model, steps, args.tau, args.ratio, args.select_ratio, args.batch_size, args.repeats, args.seed, args.clock,
        progress,
    )
    lines.append(f"locate_speedup={speedup:.2f} mask_iou={iou_preset:.4f}")
    with torch.no_grad():
        for ratio in [args.ratio, *args.extra_ratios]:
            c = compare_settings(model, rec, ratio, args.tau, args.select_ratio)
            logger.info(
                "ratio %g: reference %d weights, preset %d (IoU %.4f), diffmem default %d (IoU %.4f); reference "
                "weights per step count %s", ratio, count_masked(c["reference"]), count_masked(c["preset"]),
                c["iou_preset"], count_masked(c["default"]), c["iou_default"],
                torch.bincount(torch.cat([v.flatten() for v in c["counts"].values()]).long(),
                               minlength=args.tau + 1).tolist(),
            )
            lines.append(
                f"ratio={ratio:g} mask_iou_preset={c['iou_preset']:.4f} mask_iou_default={c['iou_default']:.4f} "
                f"weights_reference={count_masked(c['reference'])} weights_preset={count_masked(c['preset'])} "
                f"weights_default={count_masked(c['default'])}"
            )
        if args.factors:
            for ratio in [args.ratio, *args.extra_ratios]:
                lines += factor_lines(model, rec, ratio, args.tau, args.select_ratio, args.step_select_ratio)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
