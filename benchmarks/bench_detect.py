"""Benchmark memorization detection: the noise norm at k = 1, 2, 5, 10 and all steps against generate-and-compare.

Every detector scores every prompt of the model's manifest (``memorized`` true vs false) without training data:

* **noise norm** (Wen et al. 2024, :func:`diffmem.detection.noise_norm_scores`): ``||pred(x_t, c) - pred(x_t, "")||``
  averaged over the first ``k`` sampler steps (``--ks``, by default 1, 2, 5, 10 and all) and ``n`` seeds (the same
  seeds for every prompt), at the model's sampler settings. ``k`` denoiser evaluations per prompt and seed;
* **k = 1 with per-prompt seeds**: as k = 1, but prompt ``i`` draws its noises from seed ``seed + i`` (Wen et al.'s
  seeding), which isolates that one difference;
* **wen2024**: ``DetectConfig.from_preset("wen2024")``, Wen et al.'s procedure as published: all 50 steps of a
  50-step schedule at guidance 7.5 (by definition of the preset, whatever the model's own sampler), one noise per
  prompt seeded with the prompt's index; and **wen2024 at the model's sampler**: the same preset with the
  model's steps, guidance and guidance rescale;
* **generate + SSCD** (the baseline): ``n`` full generations per prompt at the model's sampler defaults (all steps
  and the VAE decode), each embedded with SSCD; the score is the mean pairwise cosine similarity of the ``n``
  embeddings (off-diagonal pairs). A memorized prompt reproduces one image whatever the seed, so its generations
  agree. The AUC of the maximum pairwise similarity is logged as well.

All detectors are timed side by side: prompts are processed in chunks, and each chunk runs every detector back to
back in an order that rotates from chunk to chunk, so a busy machine slows all alike. A pass covers every prompt;
the cost ratio of a detector in a pass is the total time of generate + SSCD over the detector's total time, and
the printed ratio is the median over ``--repeats`` passes. A forward pre-hook on the denoiser counts the rows it
evaluates (an ``[uncond; cond]`` pair is two rows) for every detector; the denoiser ratio is the baseline's rows
over the detector's. The scores and AUCs are deterministic, so every pass gives the same ones.

Cost is measured in process CPU time by default (``--clock cpu``; both clocks are always logged and printed).
``--threads`` sets torch's threads, but SSCD runs in onnxruntime with its own thread pool, which diffmem's scorer
does not expose, so in wall time the baseline's embedding step may use a second core that the noise norm never
gets. CPU time counts the work of every thread, which keeps the comparison even; it also leaves out the time spent
waiting for a core while other jobs load the machine.

The default k is chosen from the sweep: the smallest ``k`` whose AUC is at least ``--min-auc`` (0.95) at a cost
ratio of at least ``--min-cost-ratio`` (5) on the printed clock; ``none`` when no k qualifies.

Result lines::

    detect_speedup=<ratio> auc_noise_norm=<auc> auc_generate_sscd=<auc>
    detect_config=<name> score_steps=<k> auc=<auc> tpr_at_1fpr=<tpr> cost_ratio=<ratio> cost_ratio_wall=<ratio> denoiser_ratio=<ratio>
    ...
    default_k=<k or none>

The first line is the k = 1 row against generate + SSCD, as before. ``detect_config`` names are ``k1``, ``k2``,
..., ``kall``, ``k1_per_prompt_seeds``, ``wen2024`` and ``wen2024_model_sampler``. TPR at 1 % FPR with fewer than
100 non-memorized prompts allows no false positive at all.

**Every detector on every model** (``--zoo``): each registered detector variant of ``--detectors`` (Wen et al.'s
noise norm at k = 5 and k = 1, Jeon et al.'s sharpness with the exact and the finite-difference Hessian-vector
product, Chen et al.'s Bright Ending with the first and with all end tokens, Asthana & Belagiannis's anisotropy
with ``--seeds`` noises, with one noise as their released script, and its alignment term alone) on the embedded
model and on every zoo model present on disk (``diffmem.zoo.members.zoo_models``), each at its own sampler
defaults, timed side by side with generate + scorer as above (rotating order per chunk). Labels are the
manifest's ``memorized``; every split (``locate``, ``heldout``, ``nonmem``, ``never_seen``) is scored. Result
lines::

    detector_row model=<name> detector=<variant> auc=<auc> tpr_at_1fpr=<tpr> cost_ratio=<ratio> cost_ratio_wall=<ratio> denoiser_ratio=<ratio>
    ...
    baseline_row model=<name> auc=<auc> tpr_at_1fpr=<tpr>
    default_detector=<name>

The default detector is the registry name of the variant with the highest mean AUC over the models among those at
least ``--min-cost-ratio`` times cheaper than generate + scorer on every model (median over passes); ties go to the
cheaper one.

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
from dataclasses import replace
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


def parse_ks(values: Sequence[str], steps: int) -> list[int]:
    """The ``--ks`` values as step counts: ``"all"`` is ``steps``; values above ``steps`` are dropped (logged)."""
    ks: list[int] = []
    for value in values:
        k = steps if value == "all" else int(value)
        if k > steps:
            logger.info("k=%d skipped: the sampler runs only %d steps", k, steps)
        elif k not in ks:
            ks.append(k)
    return ks


def k_name(k: int, steps: int) -> str:
    """Detector name of the sweep's ``k``: ``k<k>``, or ``kall`` for every sampler step."""
    return "kall" if k == steps else f"k{k}"


def pick_default_k(
    rows: dict[str, dict[str, Any]], ks: list[int], steps: int, min_auc: float, min_cost: float
) -> int | None:
    """Smallest k of the sweep with ``auc >= min_auc`` and ``cost_ratio >= min_cost``; ``None`` if none."""
    for k in sorted(ks):
        row = rows[k_name(k, steps)]
        if row["auc"] >= min_auc and row["cost_ratio"] >= min_cost:
            return k
    return None


# --zoo: variant -> (registry name, settings beyond the model's sampler); "seeds" means --seeds, "be_seeds" --be-seeds
ZOO_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "wen_k5": ("wen", {"score_steps": 5, "num_seeds": "seeds"}),
    "wen_k1": ("wen", {"score_steps": 1, "num_seeds": "seeds"}),
    "sharpness": ("sharpness", {"num_seeds": "seeds"}),
    "sharpness_finite": ("sharpness", {"num_seeds": "seeds", "hvp": "finite"}),
    "bright_ending": ("bright_ending", {"num_seeds": "be_seeds"}),
    "bright_ending_all_tokens": ("bright_ending", {"num_seeds": "be_seeds", "end_tokens": "all"}),
    "anisotropy": ("anisotropy", {"num_seeds": "seeds"}),
    "anisotropy_one_noise": ("anisotropy", {"num_seeds": 1}),
    "anisotropy_cosine": ("anisotropy", {"num_seeds": "seeds", "score": "cosine"}),
}


def pick_default_detector(table: dict[str, dict[str, dict[str, float]]], min_cost: float) -> str | None:
    """Registry name of the variant with the highest mean AUC over models, among those at least ``min_cost`` times
    cheaper than generate + scorer on every model; ``None`` when none is.

    Args:
        table: ``table[model][variant] = {"auc": ..., "cost_ratio": ...}``.
        min_cost: The cost ratio a default must reach on every model.
    """
    variants = sorted({v for rows in table.values() for v in rows})
    best: tuple[float, float, str] | None = None
    for v in variants:
        rows = [table[m][v] for m in table if v in table[m]]
        if len(rows) != len(table) or min(r["cost_ratio"] for r in rows) < min_cost:
            continue
        key = (statistics.mean(r["auc"] for r in rows), statistics.median(r["cost_ratio"] for r in rows), v)
        best = key if best is None or key[:2] > best[:2] else best
    return None if best is None else ZOO_VARIANTS[best[2]][0] if best[2] in ZOO_VARIANTS else best[2]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    from diffmem.zoo import default_model_path

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=default_model_path(), help="checkpoint folder")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (every detector)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (n) of the k sweep and the baseline")
    p.add_argument("--ks", nargs="+", default=None,
                   help="leading steps k of the noise-norm sweep ('all': every sampler step) [default: 1 2 5 10 all; "
                        "--quick: 1 all]")
    p.add_argument("--no-presets", action="store_true", help="skip the per-prompt-seed and wen2024 rows")
    p.add_argument("--chunk", type=int, default=8, help="prompts per interleaved chunk (and per pipeline call)")
    p.add_argument("--scorer", default="sscd", help="similarity scorer of the generate-and-compare baseline")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all prompts (median of the ratios)")
    p.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu",
        help="clock of the printed cost ratios and of the choice of k: process CPU time (all threads) or wall time",
    )
    p.add_argument("--min-auc", type=float, default=0.95, help="AUC a default k must reach")
    p.add_argument("--min-cost-ratio", type=float, default=5.0,
                   help="how many times cheaper than generate + scorer a default k must be")
    p.add_argument("--limit", type=int, default=None, help="at most this many memorized and non-memorized prompts each")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for a smoke test (3 + 3 prompts, 2 seeds, k = 1 and all, 1 pass)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--zoo", action="store_true",
                   help="every detector variant on the embedded model and every zoo model on disk (see above)")
    p.add_argument("--models", nargs="+", default=None, help="--zoo: only these zoo members")
    p.add_argument("--detectors", nargs="+", default=list(ZOO_VARIANTS), choices=list(ZOO_VARIANTS),
                   help="--zoo: detector variants")
    p.add_argument("--be-seeds", type=int, default=1, help="--zoo: seeds of Bright Ending (a whole generation each)")
    p.add_argument("--json", type=Path, default=None, help="--zoo: also write the table as JSON here")
    p.add_argument("--steps-cap", type=int, default=None,
                   help="--zoo: at most this many sampler steps (a smoke test; the figures use the model's own)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be >= 2: generate-and-compare needs pairs of generations")
    if args.ks is None:
        args.ks = ["1", "all"] if args.quick else ["1", "2", "5", "10", "all"]
    for value in args.ks:
        if value != "all" and not (value.isdigit() and int(value) >= 1):
            p.error(f"--ks takes positive integers or 'all', not {value!r}")
    if args.quick:
        args.seeds, args.repeats = 2, 1
        args.limit = 3 if args.limit is None else args.limit
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Score the manifest's prompts with every detector, timed side by side, and print the result lines.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    if args.zoo:
        return run_zoo(args)

    from diffmem.config import SamplerConfig
    from diffmem.data import read_manifest
    from diffmem.detection import DetectConfig, noise_norm_scores
    from diffmem.metrics import roc_auc, tpr_at_fpr
    from diffmem.pipelines import load_pipeline
    from diffmem.sampling import generate_images
    from diffmem.score import get_scorer
    from diffmem.targets import get_denoiser
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
    sampler = SamplerConfig(**{k: v for k, v in defaults.items() if v is not None})
    steps = sampler.num_inference_steps
    ks = parse_ks(args.ks, steps)
    if 1 not in ks:
        ks.insert(0, 1)  # the k = 1 row is the first result line's detector
    common = {"seed": args.seed, "batch_size": args.chunk}
    configs: dict[str, Any] = {
        k_name(k, steps): DetectConfig(score_steps=k, num_seeds=args.seeds, sampler=sampler, **common) for k in ks
    }
    if not args.no_presets:
        configs["k1_per_prompt_seeds"] = DetectConfig(
            score_steps=1, num_seeds=args.seeds, per_prompt_seeds=True, sampler=sampler, **common
        )
        # the preset's own sampler at the model's size, and the preset's procedure at the model's sampler
        configs["wen2024"] = DetectConfig.from_preset("wen2024", DetectConfig.preset_sampler("wen2024", sampler),
                                                      **common)
        configs["wen2024_model_sampler"] = DetectConfig.from_preset("wen2024", sampler, **common)
    logger.info(
        "%d memorized + %d non-memorized prompts, %d seeds, sampler %s, scorer %s, torch threads %d",
        memorized, nonmem, args.seeds, sampler.to_dict(), args.scorer, torch.get_num_threads(),
    )
    for name, cfg in configs.items():
        logger.info("detector %s: %s", name, cfg.to_dict())

    scores = {name: np.zeros(len(prompts)) for name in configs}
    gen_mean = np.zeros(len(prompts))
    gen_max = np.zeros(len(prompts))
    # denoiser rows evaluated by each detector, counted by a pre-hook on the denoiser
    rows = dict.fromkeys([*configs, "gen"], 0)
    current = {"side": "gen"}

    def count_rows(module: torch.nn.Module, fargs: tuple, fkwargs: dict[str, Any]) -> None:
        sample = fargs[0] if fargs else fkwargs.get("sample", fkwargs.get("hidden_states"))
        rows[current["side"]] += int(sample.shape[0])

    def run_noise_norm(name: str, start: int, chunk: list[str]) -> None:
        scores[name][start : start + len(chunk)] = noise_norm_scores(
            pipe, chunk, configs[name], progress=False, first_index=start
        )

    # time spent embedding, kept apart to show how the baseline's cost splits
    embed_time = {"wall": 0.0, "cpu": 0.0}

    def run_generate(start: int, chunk: list[str]) -> None:
        images = generate_images(
            pipe, chunk, num_seeds=args.seeds, seed=args.seed, batch_size=len(chunk) * args.seeds,
            progress=False, sampler=sampler,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        embeddings = scorer.embed(images.reshape(-1, *images.shape[2:])).view(len(chunk), args.seeds, -1)
        embed_time["cpu"] += time.process_time() - cpu
        embed_time["wall"] += time.perf_counter() - wall
        for i, emb in enumerate(embeddings):
            gen_mean[start + i], gen_max[start + i] = pairwise_agreement(emb)

    sides: list[tuple[str, Any]] = [("gen", run_generate)]
    sides += [(name, lambda start, chunk, name=name: run_noise_norm(name, start, chunk)) for name in configs]
    # warm-up on one prompt, not timed
    for _, fn in sides:
        fn(0, prompts[:1])
    embed_time.update(wall=0.0, cpu=0.0)
    handle = get_denoiser(pipe).register_forward_pre_hook(count_rows, with_kwargs=True)
    # totals[clock][side][repeat]: each repeat runs every chunk with every detector, in a rotating order
    totals = {clock: {side: [0.0] * args.repeats for side, _ in sides} for clock in ("wall", "cpu")}
    chunks = [(r, start) for r in range(args.repeats) for start in range(0, len(prompts), args.chunk)]
    try:
        for i, (repeat, start) in enumerate(tqdm(chunks, desc="detect", unit="chunk", disable=args.no_progress)):
            chunk = prompts[start : start + args.chunk]
            shift = i % len(sides)
            for side, fn in sides[shift:] + sides[:shift]:
                current["side"] = side
                wall, cpu = time.perf_counter(), time.process_time()
                fn(start, chunk)
                totals["cpu"][side][repeat] += time.process_time() - cpu
                totals["wall"][side][repeat] += time.perf_counter() - wall
    finally:
        handle.remove()

    def cost_ratio(side: str, clock: str) -> float:
        t = totals[clock]
        return statistics.median(g / s for g, s in zip(t["gen"], t[side]))

    gen_t = {clock: statistics.median(totals[clock]["gen"]) for clock in ("wall", "cpu")}
    for clock in ("wall", "cpu"):
        logger.info(
            "%s time per pass over %d prompts (median of %d): generate + %s %.2f s (%.1f ms per prompt, of which "
            "%.1f%% embedding)", clock, len(prompts), args.repeats, args.scorer, gen_t[clock],
            1000 * gen_t[clock] / len(prompts), 100 * embed_time[clock] / sum(totals[clock]["gen"]),
        )
    results: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        row = {
            "score_steps": cfg.score_steps,
            "auc": roc_auc(scores[name], labels),
            "tpr": tpr_at_fpr(scores[name], labels, 0.01),
            "cost_ratio": cost_ratio(name, args.clock),
            "cost_ratio_wall": cost_ratio(name, "wall"),
            "cost_ratio_cpu": cost_ratio(name, "cpu"),
            "denoiser_ratio": rows["gen"] / rows[name] if rows[name] else float("nan"),
        }
        results[name] = row
        logger.info(
            "%s: AUC %.4f, TPR@1%%FPR %.4f; %.1f ms CPU / %.1f ms wall per prompt; cost ratio CPU %.2f (passes %s), "
            "wall %.2f; denoiser rows %d vs %d for generate (ratio %.2f)",
            name, row["auc"], row["tpr"], 1000 * statistics.median(totals["cpu"][name]) / len(prompts),
            1000 * statistics.median(totals["wall"][name]) / len(prompts), row["cost_ratio_cpu"],
            ", ".join(f"{g / s:.2f}" for g, s in zip(totals["cpu"]["gen"], totals["cpu"][name])),
            row["cost_ratio_wall"], rows[name], rows["gen"], row["denoiser_ratio"],
        )
    auc_gen = roc_auc(gen_mean, labels)
    auc_gen_max = roc_auc(gen_max, labels)
    logger.info(
        "generate + %s: AUC mean pairwise %.4f (TPR@1%%FPR %.4f), max pairwise %.4f",
        args.scorer, auc_gen, tpr_at_fpr(gen_mean, labels, 0.01), auc_gen_max,
    )
    for group, index in groups.items():
        parts = [f"{name} {scores[name][index].mean():.3f} +- {scores[name][index].std():.3f}" for name in configs]
        line = f"{group:<28} " + ", ".join(parts)
        line += f", generate + {args.scorer} mean pairwise {gen_mean[index].mean():.3f} +- {gen_mean[index].std():.3f}"
        if labels[index].all() and (~labels).any():
            # this memorized group against every non-memorized prompt
            subset = index | ~labels
            aucs = [f"{name} {roc_auc(scores[name][subset], labels[subset]):.4f}" for name in configs]
            line += f"; AUC vs non-memorized: {', '.join(aucs)}, generate + {args.scorer} "
            line += f"{roc_auc(gen_mean[subset], labels[subset]):.4f}"
        logger.info(line)
    k1 = results[k_name(1, steps)]
    print(f"detect_speedup={k1['cost_ratio']:.1f} auc_noise_norm={k1['auc']:.4f} auc_generate_sscd={auc_gen:.4f}")
    for name, row in results.items():
        print(
            f"detect_config={name} score_steps={row['score_steps']} auc={row['auc']:.4f} "
            f"tpr_at_1fpr={row['tpr']:.4f} cost_ratio={row['cost_ratio']:.2f} "
            f"cost_ratio_wall={row['cost_ratio_wall']:.2f} denoiser_ratio={row['denoiser_ratio']:.2f}"
        )
    default_k = pick_default_k(results, ks, steps, args.min_auc, args.min_cost_ratio)
    logger.info(
        "default k: smallest k with AUC >= %g and cost ratio >= %g (%s clock): %s",
        args.min_auc, args.min_cost_ratio, args.clock, default_k if default_k is not None else "none",
    )
    print(f"default_k={default_k if default_k is not None else 'none'}")
    return 0


def zoo_model_paths(names: Sequence[str] | None) -> dict[str, Path]:
    """The embedded model and every zoo model on disk (or only ``names``), by name."""
    from diffmem.zoo import default_model_path
    from diffmem.zoo.members import zoo_models

    found = {"tiny-sd-memorizer": default_model_path(), **zoo_models()}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            logger.warning("not on disk (yet): %s", ", ".join(missing))
        found = {n: p for n, p in found.items() if n in names}
    return found


def bench_model(args: argparse.Namespace, name: str, path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every detector variant of ``args.detectors`` and generate + scorer on one model, timed side by side.

    Returns:
        The per-variant rows and the baseline's row.
    """
    from diffmem.config import SamplerConfig
    from diffmem.data import read_manifest
    from diffmem.detection import detect, detector_config
    from diffmem.metrics import roc_auc, tpr_at_fpr
    from diffmem.pipelines import load_pipeline
    from diffmem.sampling import generate_images
    from diffmem.score import get_scorer
    from diffmem.targets import get_denoiser
    from diffmem.zoo import sampling_defaults

    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    defaults = sampling_defaults(path)
    entries = read_manifest(path / "memorization.jsonl")
    chosen = [e for e in entries if e.memorized][: args.limit] + [e for e in entries if not e.memorized][: args.limit]
    prompts = [e.prompt for e in chosen]
    labels = np.array([e.memorized for e in chosen])
    scorer = get_scorer(args.scorer, fallback="ssim") if args.scorer == "sscd" else get_scorer(args.scorer)
    sampler = SamplerConfig(**{k: v for k, v in defaults.items() if v is not None})
    if args.steps_cap:
        sampler = replace(sampler, num_inference_steps=min(sampler.num_inference_steps, args.steps_cap))
    seeds = {"seeds": args.seeds, "be_seeds": args.be_seeds}
    configs = {}
    for variant in args.detectors:
        registry, extra = ZOO_VARIANTS[variant]
        settings = {k: seeds.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
        if settings.get("score_steps", 1) > sampler.num_inference_steps:
            settings["score_steps"] = sampler.num_inference_steps
        configs[variant] = detector_config(registry, sampler=sampler, seed=args.seed, batch_size=args.chunk,
                                           **settings)
    logger.info("%s: %d memorized + %d non-memorized prompts, sampler %s, scorer %s", name, int(labels.sum()),
                int((~labels).sum()), sampler.to_dict(), scorer.describe().get("name", args.scorer))
    for variant, cfg in configs.items():
        logger.info("%s %s: %s", name, variant, cfg.to_dict())

    scores = {v: np.zeros(len(prompts)) for v in configs}
    gen_mean = np.zeros(len(prompts))
    rows = dict.fromkeys([*configs, "gen"], 0)
    current = {"side": "gen"}

    def count_rows(module: torch.nn.Module, fargs: tuple, fkwargs: dict[str, Any]) -> None:
        sample = fargs[0] if fargs else fkwargs.get("sample", fkwargs.get("hidden_states"))
        rows[current["side"]] += int(sample.shape[0])

    def run_detector(variant: str, start: int, chunk: list[str]) -> None:
        scores[variant][start : start + len(chunk)] = detect(pipe, chunk, configs[variant], progress=False).scores

    def run_generate(start: int, chunk: list[str]) -> None:
        images = generate_images(pipe, chunk, num_seeds=args.seeds, seed=args.seed,
                                 batch_size=len(chunk) * args.seeds, progress=False, sampler=sampler)
        emb = scorer.embed(images.reshape(-1, *images.shape[2:])).view(len(chunk), args.seeds, -1)
        for i, e in enumerate(emb):
            gen_mean[start + i] = pairwise_agreement(e)[0]

    sides: list[tuple[str, Any]] = [("gen", run_generate)]
    sides += [(v, lambda start, chunk, v=v: run_detector(v, start, chunk)) for v in configs]
    for _, fn in sides:  # warm-up, not timed
        fn(0, prompts[:1])
    totals = {clock: {side: [0.0] * args.repeats for side, _ in sides} for clock in ("wall", "cpu")}
    chunks = [(r, start) for r in range(args.repeats) for start in range(0, len(prompts), args.chunk)]
    handle = get_denoiser(pipe).register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        for i, (repeat, start) in enumerate(tqdm(chunks, desc=name, unit="chunk", disable=args.no_progress)):
            chunk = prompts[start : start + args.chunk]
            shift = i % len(sides)
            for side, fn in sides[shift:] + sides[:shift]:
                current["side"] = side
                wall, cpu = time.perf_counter(), time.process_time()
                fn(start, chunk)
                totals["cpu"][side][repeat] += time.process_time() - cpu
                totals["wall"][side][repeat] += time.perf_counter() - wall
    finally:
        handle.remove()

    def ratio(side: str, clock: str) -> float:
        t = totals[clock]
        return statistics.median(g / s for g, s in zip(t["gen"], t[side]))

    out: dict[str, dict[str, Any]] = {}
    for variant in configs:
        out[variant] = {
            "detector": ZOO_VARIANTS[variant][0], "auc": roc_auc(scores[variant], labels),
            "tpr": tpr_at_fpr(scores[variant], labels, 0.01), "cost_ratio": ratio(variant, args.clock),
            "cost_ratio_wall": ratio(variant, "wall"), "cost_ratio_cpu": ratio(variant, "cpu"),
            "denoiser_ratio": rows["gen"] / rows[variant] if rows[variant] else float("nan"),
            "seconds_cpu": statistics.median(totals["cpu"][variant]),
            "mean_memorized": float(scores[variant][labels].mean()),
            "mean_nonmem": float(scores[variant][~labels].mean()),
        }
        logger.info("%s %s: %s", name, variant, out[variant])
    base = {"auc": roc_auc(gen_mean, labels), "tpr": tpr_at_fpr(gen_mean, labels, 0.01),
            "seconds_cpu": statistics.median(totals["cpu"]["gen"]), "memorized": int(labels.sum()),
            "nonmem": int((~labels).sum())}
    logger.info("%s generate + %s: %s", name, args.scorer, base)
    return out, base


def run_zoo(args: argparse.Namespace) -> int:
    """``--zoo``: the detector table over the embedded model and the zoo models on disk, and the default detector."""
    import json

    models = zoo_model_paths(args.models)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    baselines: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        table[name], baselines[name] = bench_model(args, name, path)
        for variant, row in table[name].items():
            print(f"detector_row model={name} detector={variant} auc={row['auc']:.4f} tpr_at_1fpr={row['tpr']:.4f} "
                  f"cost_ratio={row['cost_ratio']:.2f} cost_ratio_wall={row['cost_ratio_wall']:.2f} "
                  f"denoiser_ratio={row['denoiser_ratio']:.2f}", flush=True)
        b = baselines[name]
        print(f"baseline_row model={name} auc={b['auc']:.4f} tpr_at_1fpr={b['tpr']:.4f}", flush=True)
    default = pick_default_detector(table, args.min_cost_ratio)
    if args.json:
        args.json.write_text(json.dumps({"table": table, "baselines": baselines, "default_detector": default,
                                         "settings": {k: str(v) for k, v in vars(args).items()}}, indent=2,
                                        sort_keys=True))
    print(f"default_detector={default if default is not None else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
