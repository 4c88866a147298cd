"""Benchmark detection by single-step noise norm against generate-and-compare with SSCD.

Both detectors score every prompt of the model's manifest (``memorized`` true vs false) without training data:

* **noise norm** (Wen et al. 2024, :func:`diffmem.detection.noise_norm_scores`): ``||pred(x_T, c) - pred(x_T, "")||``
  at the first sampling step (``k = 1``), averaged over ``n`` seeds. One denoiser call per prompt.
* **generate + SSCD**: ``n`` full generations per prompt at the model's sampler defaults (all steps and the VAE
  decode), each embedded with SSCD; the score is the mean pairwise cosine similarity of the ``n`` embeddings
  (off-diagonal pairs). A memorized prompt reproduces one image whatever the seed, so its generations agree.
  The AUC of the maximum pairwise similarity is logged as well.

The two are timed side by side: prompts are processed in chunks, and each chunk runs both detectors back to
back in alternating order, so a busy machine slows both alike. A pass covers every prompt; the cost ratio of a
pass is the total time of generate + SSCD over the total time of the noise norm, and the printed ratio is the
median over ``--repeats`` passes. The scores and AUCs are deterministic, so every pass gives the same ones.

Cost is measured in process CPU time by default (``--clock cpu``; both clocks are always logged). ``--threads``
sets torch's threads, but SSCD runs in onnxruntime with its own thread pool, which diffmem's scorer does not
expose, so in wall time the baseline's embedding step may use a second core that the noise norm never gets.
CPU time counts the work of every thread, which keeps the comparison even; it also leaves out the time spent
waiting for a core while other jobs load the machine.

The script ends with one machine-readable line::

    detect_speedup=<ratio> auc_noise_norm=<auc> auc_generate_sscd=<auc>

Run ``python benchmarks/bench_detect.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger("bench_detect")


def pairwise_agreement(embeddings: torch.Tensor) -> tuple[float, float]:
    """Mean and maximum cosine similarity over the distinct pairs of one prompt's generations.

    Args:
        embeddings: ``[n, D]`` L2-normalised embeddings, ``n >= 2``.

    Returns:
        ``(mean, max)`` over the ``n * (n - 1) / 2`` pairs.
    """
    n = embeddings.shape[0]
    sim = embeddings @ embeddings.T
    upper = sim[torch.triu_indices(n, n, offset=1).unbind(0)]
    return float(upper.mean()), float(upper.max())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    from diffmem.zoo import default_model_path

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=default_model_path(), help="checkpoint folder")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both detectors)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (n), the same for both detectors")
    p.add_argument("--chunk", type=int, default=8, help="prompts per interleaved chunk (and per pipeline call)")
    p.add_argument("--scorer", default="sscd", help="similarity scorer of the generate-and-compare baseline")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all prompts (median of the ratios)")
    p.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu",
        help="clock of the printed cost ratio: process CPU time (all threads) or wall time",
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many memorized and non-memorized prompts each")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (3 + 3 prompts, 2 seeds)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be >= 2: generate-and-compare needs pairs of generations")
    if args.quick:
        args.seeds, args.repeats = 2, 1
        args.limit = 3 if args.limit is None else args.limit
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Score the manifest's prompts with both detectors, timed side by side, and print the result line.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    from diffmem.data import read_manifest
    from diffmem.detection import DetectConfig, noise_norm_scores
    from diffmem.metrics import roc_auc
    from diffmem.pipelines import load_pipeline
    from diffmem.sampling import generate_images
    from diffmem.score import get_scorer
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    defaults = sampling_defaults(args.model)
    entries = read_manifest(args.model / "memorization.jsonl")
    chosen = [e for e in entries if e.memorized][: args.limit] + [e for e in entries if not e.memorized][: args.limit]
    prompts = [e.prompt for e in chosen]
    labels = np.array([e.memorized for e in chosen])
    memorized, nonmem = int(labels.sum()), int((~labels).sum())
    groups: dict[str, np.ndarray] = {}
    for key in sorted({(e.memorized, e.duplicates, str(e.extra.get("kind", ""))) for e in chosen}, reverse=True):
        name = f"{'memorized' if key[0] else 'non-memorized'} D={key[1]}{' ' + key[2] if key[2] else ''}"
        groups[name] = np.array([(e.memorized, e.duplicates, str(e.extra.get("kind", ""))) == key for e in chosen])
    scorer = get_scorer(args.scorer)
    call: dict[str, Any] = {
        "num_inference_steps": int(defaults.get("num_inference_steps", 50)),
        "guidance_scale": float(defaults.get("guidance_scale", 7.5)),
        "guidance_rescale": float(defaults.get("guidance_rescale", 0.0)),
        "height": defaults.get("height"),
        "width": defaults.get("width"),
    }
    detect_config = DetectConfig(score_steps=1, num_seeds=args.seeds, seed=args.seed, batch_size=args.chunk, **call)
    logger.info(
        "%d memorized + %d non-memorized prompts, %d seeds, sampler %s, scorer %s, torch threads %d",
        memorized, nonmem, args.seeds, call, args.scorer, torch.get_num_threads(),
    )

    nn_scores = np.zeros(len(prompts))
    gen_mean = np.zeros(len(prompts))
    gen_max = np.zeros(len(prompts))

    def run_noise_norm(start: int, chunk: list[str]) -> None:
        nn_scores[start : start + len(chunk)] = noise_norm_scores(pipe, chunk, detect_config, progress=False)

    # time spent embedding, kept apart to show how the baseline's cost splits
    embed_time = {"wall": 0.0, "cpu": 0.0}

    def run_generate(start: int, chunk: list[str]) -> None:
        images = generate_images(
            pipe, chunk, num_seeds=args.seeds, seed=args.seed, batch_size=len(chunk) * args.seeds,
            progress=False, **call,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        embeddings = scorer.embed(images.reshape(-1, *images.shape[2:])).view(len(chunk), args.seeds, -1)
        embed_time["cpu"] += time.process_time() - cpu
        embed_time["wall"] += time.perf_counter() - wall
        for i, emb in enumerate(embeddings):
            gen_mean[start + i], gen_max[start + i] = pairwise_agreement(emb)

    # warm-up on one prompt, not timed
    run_noise_norm(0, prompts[:1])
    run_generate(0, prompts[:1])
    embed_time.update(wall=0.0, cpu=0.0)
    # totals[clock][side][repeat]: each repeat runs every chunk with both detectors, alternating their order
    totals = {clock: {"nn": [0.0] * args.repeats, "gen": [0.0] * args.repeats} for clock in ("wall", "cpu")}
    chunks = [(r, start) for r in range(args.repeats) for start in range(0, len(prompts), args.chunk)]
    for i, (repeat, start) in enumerate(tqdm(chunks, desc="detect", unit="chunk", disable=args.no_progress)):
        chunk = prompts[start : start + args.chunk]
        order = (("nn", run_noise_norm), ("gen", run_generate))
        for side, fn in order if i % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn(start, chunk)
            totals["cpu"][side][repeat] += time.process_time() - cpu
            totals["wall"][side][repeat] += time.perf_counter() - wall

    ratios = {
        clock: statistics.median(g / n for g, n in zip(t["gen"], t["nn"])) for clock, t in totals.items()
    }
    for clock, t in totals.items():
        logger.info(
            "%s time per pass over %d prompts (median of %d): noise norm %.2f s (%.1f ms per prompt), "
            "generate + %s %.2f s (%.1f ms per prompt, of which %.1f%% embedding); cost ratio %.1f (per pass: %s)",
            clock, len(prompts), args.repeats, statistics.median(t["nn"]),
            1000 * statistics.median(t["nn"]) / len(prompts), args.scorer, statistics.median(t["gen"]),
            1000 * statistics.median(t["gen"]) / len(prompts), 100 * embed_time[clock] / sum(t["gen"]),
            ratios[clock], ", ".join(f"{g / n:.1f}" for g, n in zip(t["gen"], t["nn"])),
        )
    auc_nn = roc_auc(nn_scores, labels)
    auc_gen = roc_auc(gen_mean, labels)
    auc_gen_max = roc_auc(gen_max, labels)
    logger.info(
        "AUC noise norm %.4f; generate + %s: mean pairwise %.4f, max pairwise %.4f",
        auc_nn, args.scorer, auc_gen, auc_gen_max,
    )
    for group, index in groups.items():
        line = (
            f"{group:<28} noise norm {nn_scores[index].mean():.3f} +- {nn_scores[index].std():.3f}, generate + "
            f"{args.scorer} mean pairwise {gen_mean[index].mean():.3f} +- {gen_mean[index].std():.3f}"
        )
        if labels[index].all() and (~labels).any():
            # this memorized group against every non-memorized prompt
            subset = index | ~labels
            line += (
                f"; AUC vs non-memorized: noise norm {roc_auc(nn_scores[subset], labels[subset]):.4f}, "
                f"generate + {args.scorer} {roc_auc(gen_mean[subset], labels[subset]):.4f}"
            )
        logger.info(line)
    print(f"detect_speedup={ratios[args.clock]:.1f} auc_noise_norm={auc_nn:.4f} auc_generate_sscd={auc_gen:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
