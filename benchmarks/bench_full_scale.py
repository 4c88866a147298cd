"""Record, locate and prune full-size denoisers with random weights on the CPU.

For each architecture (the published configs of ``tests/test_full_scale.py``): materialise the denoiser with seeded
random fp32 weights, time a bare forward against a recorded one (side by side, interleaved), record a memorized
and a base prompt set for a few steps at a small latent size (classifier-free guidance, seeded random text
embeddings standing in for prompts), locate a Wanda mask, check ``mask.apply``, export the denoiser with
``export_edited``, free it, reload the export with a plain ``from_pretrained`` and check that exactly the masked
weights are zero. Each architecture runs in its own process (unless ``--in-process``) so that only one
full-size model is in memory at a time and its peak memory is reported on its own.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_full_scale.py --arch sd15 sd2 pixart sd3
    OMP_NUM_THREADS=1 python benchmarks/bench_full_scale.py --arch sdxl --latent 16 --steps 4

Every result line is ``[<arch>] key=value ...``; for SD-1.5 a separate ``record_cost_ratio=<x>`` line gives the
recorded step time over the bare forward time.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_full_scale import (  # noqa: E402  (the configs live with their tests)
    ARCHS,
    FullScaleArch,
    check_apply_mask,
    check_mask,
    check_reloaded,
    denoiser_inputs,
    materialise,
    record_bare,
)

from diffmem.config import LocateConfig, RecordConfig, SamplerConfig  # noqa: E402
from diffmem.edits import MANIFEST_NAME, export_edited  # noqa: E402
from diffmem.recording import ActivationRecorder  # noqa: E402
from diffmem.localization import locate  # noqa: E402
from diffmem.targets import find_targets  # noqa: E402

MEM_SEEDS = [0, 1]
BASE_SEEDS = [2, 3]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _emit(key: str, **values: object) -> None:
    parts = []
    for name, value in values.items():
        parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
    print(f"[{key}] " + " ".join(parts), flush=True)


def time_forward(model: torch.nn.Module, arch: FullScaleArch, args: argparse.Namespace) -> dict[str, float]:
    """Time a bare and a recorded denoiser call on the same inputs, side by side.

    The pairs are interleaved (alternating which side goes first) so that a busy machine slows both sides alike;
    the ratios are medians of the per-pair ratios, in wall-clock and in process CPU time.

    Returns:
        ``bare_s`` and ``recorded_s`` (median wall seconds), ``ratio`` and ``ratio_cpu``.
    """
    inputs = denoiser_inputs(arch, MEM_SEEDS, step=0, num_steps=1, latent=args.latent, text_len=args.text_len)
    recorder = ActivationRecorder(
        model, RecordConfig(sampler=SamplerConfig(num_inference_steps=1, guidance_scale=5.0), record_steps=1),
        stop_generation=False
    )

    def call(recorded: bool) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        if recorded:
            with recorder:
                recorder.start_batch(len(MEM_SEEDS), cfg=True)
                model(**inputs)
        else:
            model(**inputs)
        return time.perf_counter() - wall, time.process_time() - cpu

    bare: list[tuple[float, float]] = []
    recorded: list[tuple[float, float]] = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for rep in range(args.reps):
            for side in ((False, True) if rep % 2 == 0 else (True, False)):
                (recorded if side else bare).append(call(side))
    return {
        "bare_s": statistics.median(b[0] for b in bare),
        "recorded_s": statistics.median(r[0] for r in recorded),
        "ratio": statistics.median(r[0] / b[0] for b, r in zip(bare, recorded)),
        "ratio_cpu": statistics.median(r[1] / b[1] for b, r in zip(bare, recorded)),
    }


def run_arch(arch: FullScaleArch, args: argparse.Namespace, workdir: Path) -> None:
    """Benchmark one architecture and print its result lines."""
    key = arch.key
    t0 = time.perf_counter()
    model = materialise(arch, seed=args.seed)
    materialise_s = time.perf_counter() - t0
    total_params = sum(p.numel() for p in model.parameters())
    targets = find_targets(model)
    widths = Counter(t.in_features for t in targets.values())
    ffn_params = sum(t.weight.numel() for t in targets.values())
    _emit(
        key,
        title=repr(arch.title),
        source=arch.source,
        denoiser=arch.class_name,
        params_M=round(total_params / 1e6, 2),
        materialise_s=materialise_s,
    )
    _emit(
        key,
        targets=len(targets),
        widths=",".join(f"{w}x{n}" for w, n in sorted(widths.items())),
        ffn_out_params_M=round(ffn_params / 1e6, 2),
        ffn_out_share=ffn_params / total_params,
    )

    timing = time_forward(model, arch, args)
    rows = 2 * len(MEM_SEEDS)
    _emit(key, latent=args.latent, text_len=args.text_len, rows=rows, bare_forward_s=timing["bare_s"],
          recorded_forward_s=timing["recorded_s"], record_cost_ratio=timing["ratio"],
          record_cost_ratio_cpu=timing["ratio_cpu"])
    if key == "sd15":
        print(f"record_cost_ratio={timing['ratio']:.3f}", flush=True)

    t0 = time.perf_counter()
    stats_mem = record_bare(model, arch, MEM_SEEDS, steps=args.steps, latent=args.latent, text_len=args.text_len)
    stats_base = record_bare(model, arch, BASE_SEEDS, steps=args.steps, latent=args.latent, text_len=args.text_len)
    record_s = time.perf_counter() - t0

    config = LocateConfig(method="wanda", ratio=args.ratio, record_steps=args.steps)
    t0 = time.perf_counter()
    mask = locate(model, stats_mem, stats_base, config)
    locate_s = time.perf_counter() - t0
    check_mask(mask, stats_mem, ratio=args.ratio, steps=args.steps)
    _emit(key, steps=args.steps, record_s_per_step=record_s / (2 * args.steps), locate_s=locate_s,
          ratio=args.ratio, zeroed=mask.num_masked(), frac_ffn_out=mask.fraction(),
          frac_all_params=mask.num_masked() / total_params)

    t0 = time.perf_counter()
    expected = check_apply_mask(model, mask)
    apply_check_s = time.perf_counter() - t0
    if args.no_export:
        _emit(key, apply_mask_check_s=apply_check_s, export="skipped", peak_rss_GiB=_peak_rss_gib())
        return
    out = workdir / key
    t0 = time.perf_counter()
    export_edited(model, mask, out)
    export_s = time.perf_counter() - t0
    export_gb = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["edit"]["num_params_changed"] == mask.num_masked()
    cls = arch.model_class
    del model, targets
    gc.collect()
    t0 = time.perf_counter()
    reloaded = cls.from_pretrained(out)
    reload_s = time.perf_counter() - t0
    check_reloaded(reloaded, mask, expected)
    del reloaded
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    _emit(key, apply_mask_check_s=apply_check_s, export_s=export_s, export_GB=export_gb, reload_s=reload_s,
          reload_check="ok", peak_rss_GiB=_peak_rss_gib())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=["sd15", "sd2", "pixart", "sd3"],
                        help="architectures to run (sdxl needs about 13 GiB of RAM)")
    parser.add_argument("--latent", type=int, default=8, help="latent height and width (8 = 64 px for the UNets)")
    parser.add_argument("--text-len", type=int, default=77, help="text tokens per prompt")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps recorded per prompt set (tau)")
    parser.add_argument("--ratio", type=float, default=0.01, help="wanda ratio")
    parser.add_argument("--reps", type=int, default=5, help="timed bare / recorded forward pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-export", action="store_true", help="skip export and reload")
    parser.add_argument("--in-process", action="store_true",
                        help="run every architecture in this process (default: one child process each)")
    parser.add_argument("--workdir", type=Path, default=None, help="where exports go (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.in_process and len(args.arch) > 1:
        status = 0
        base = [a for a in (argv if argv is not None else sys.argv[1:])]
        for key in args.arch:
            child = [sys.executable, __file__, *base, "--in-process", "--arch", key]
            status |= subprocess.call(child)
        return status
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="diffmem-bench-"))
    try:
        for key in args.arch:
            run_arch(ARCHS[key], args, workdir)
            gc.collect()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
