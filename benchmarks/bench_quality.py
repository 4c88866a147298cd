"""How FD and KID behave at the small sizes of a mitigation report, on synthetic images.

Three pools of 64x64 px images are drawn with fixed seeds: two independent pools of plausible images (a flat
background with one to three coloured discs or rectangles and mild Gaussian noise) and one pool of dark,
structureless noise (what a broken edit can render). Every image is embedded once with the chosen features
(SSCD, the packaged ONNX model, by default). Then, for each set size ``n`` and repetition, ``n`` images are drawn
without replacement from each pool, and the script computes

* ``same``: FD and KID between the two plausible pools (one distribution: the ideal is 0);
* ``noise``: FD and KID between a plausible pool and the noise pool (what "large" looks like).

It reports the mean and the spread (std over repetitions) of each. FD between two samples of one distribution
stays above 0 and shrinks as ``n`` grows (its small-n bias); KID averages about 0 at every ``n``.

The script ends with one machine-readable line per size::

    quality_n=<n> features=<name> fd_same=<m>+-<s> kid_same=<m>+-<s> fd_noise=<m>+-<s> kid_noise=<m>+-<s>

Run ``python benchmarks/bench_quality.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from diffmem.quality.synthetic import dark_noise_images, shape_images

logger = logging.getLogger("bench_quality")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], metavar="N",
                        help="set sizes to measure (default: 8 16 32 64)")
    parser.add_argument("--pool", type=int, default=96, help="images per pool (default 96; at least max(--sizes))")
    parser.add_argument("--repeats", type=int, default=10, help="random draws per size (default 10)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--extractor", default="sscd",
                        help="features: sscd (default), clip (random weights) or an Inception .safetensors file")
    parser.add_argument("--subsets", type=int, default=100, help="KID subsets (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pools and draws (default 0)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.pool, args.repeats, args.subsets = [4, 8], 8, 2, 10
    if args.pool < max(args.sizes):
        parser.error(f"--pool {args.pool} is smaller than the largest size {max(args.sizes)}")
    if min(args.sizes) < 4:
        parser.error("every size must be at least 4 (KID subsets of at least 2)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Embed the pools, measure FD and KID per size and print the result lines.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from diffmem.quality import frechet_distance, get_feature_extractor, kernel_inception_distance

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    logger.info("load average at start: %.2f %.2f %.2f on %d CPUs", *os.getloadavg(), os.cpu_count() or 0)
    if args.extractor == "clip":
        extractor = get_feature_extractor("clip", pretrained=None)
    elif args.extractor.endswith((".safetensors", ".pth", ".pt")):
        extractor = get_feature_extractor("inception", weights=args.extractor)
    else:
        extractor = get_feature_extractor(args.extractor)
    pools = {
        "a": shape_images(args.pool, args.image_size, args.seed + 1),
        "b": shape_images(args.pool, args.image_size, args.seed + 2),
        "noise": dark_noise_images(args.pool, args.image_size, args.seed + 3),
    }
    t0 = time.perf_counter()
    feats = {name: extractor.features(images) for name, images in pools.items()}
    embed_s = time.perf_counter() - t0
    logger.info("features %s (%s): %d images in %.1f s", extractor.name, extractor.source, 3 * args.pool, embed_s)

    rng = np.random.default_rng(args.seed)
    lines = []
    for n in args.sizes:
        rows: dict[str, list[float]] = {"fd_same": [], "kid_same": [], "fd_noise": [], "kid_noise": []}
        for r in range(args.repeats):
            a, b, noise = (feats[k].values[rng.permutation(args.pool)[:n]] for k in ("a", "b", "noise"))
            rows["fd_same"].append(frechet_distance(a, b))
            rows["kid_same"].append(kernel_inception_distance(a, b, subsets=args.subsets, seed=r)[0])
            rows["fd_noise"].append(frechet_distance(a, noise))
            rows["kid_noise"].append(kernel_inception_distance(a, noise, subsets=args.subsets, seed=r)[0])
        stats = " ".join(f"{k}={np.mean(v):.4g}+-{np.std(v):.2g}" for k, v in rows.items())
        lines.append(f"quality_n={n} features={extractor.name} {stats}")
        logger.info("n=%d: %s", n, stats)
    logger.info(
        "wall %.1f s, process CPU %.1f s; load average at end: %.2f %.2f %.2f; Python %s, numpy %s, torch %s",
        time.perf_counter() - start_wall, time.process_time() - start_cpu, *os.getloadavg(),
        platform.python_version(), np.__version__, torch.__version__,
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
