"""Before / after comparisons for a mitigation report: :func:`quality_report` and :func:`memorized_becomes`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..score.base import EmbeddingScorer, Images
from .clip import _clip_scorer, clip_score
from .distances import default_subset_size, frechet_distance, kernel_inception_distance
from .features import Extractor, FeatureExtractor, ImageFeatures, _resolve_extractor

__all__ = ["quality_report", "memorized_becomes", "SMALL_N_FD_NOTE"]

SMALL_N_FD_NOTE = (
    "FD is biased upward at small n (two samples of one distribution give FD > 0, less as n grows): compare FD "
    "values only between sets of equal size; KID is unbiased at any n"
)


def _as_features(x: Images | ImageFeatures, extractor: FeatureExtractor | None, arg: str) -> ImageFeatures:
    if isinstance(x, ImageFeatures):
        if extractor is not None and x.name != extractor.name:
            raise ValueError(f"{arg} holds {x.name!r} features, but the extractor makes {extractor.name!r}")
        return x
    assert extractor is not None
    return extractor.features(x)


def _distances(
    fa: ImageFeatures, fb: ImageFeatures, subsets: int, subset_size: int | None, seed: int, names: tuple[str, str]
) -> dict[str, Any]:
    if fa.name != fb.name:
        raise ValueError(f"{names[0]} and {names[1]} hold different features: {fa.name!r} and {fb.name!r}")
    size = default_subset_size(fa.n, fb.n) if subset_size is None else int(subset_size)
    kid_mean, kid_std = kernel_inception_distance(fa, fb, subsets=subsets, subset_size=size, seed=seed)
    notes = [SMALL_N_FD_NOTE + f" (here n = {fa.n} and {fb.n})"]
    if fa.random_weights:
        notes.append(f"the {fa.name!r} features have random weights: the distances are plumbing only")
    if fa.is_inception:
        notes.append(
            "FID on these Inception weights is comparable within this report; published FIDs use the TensorFlow "
            "Inception weights"
        )
    elif not fa.random_weights:
        notes.append(f"{fa.fd_name} is a Fréchet distance on {fa.name} features, not FID: it is not on FID's scale")
    return {
        "features": fa.name,
        "features_source": fa.source,
        "random_weights": fa.random_weights,
        "fd_name": fa.fd_name,
        "fd": frechet_distance(fa, fb),
        "kid_name": fa.kid_name,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subsets": subsets,
        "kid_subset_size": size,
        "seed": seed,
        "notes": notes,
    }


def _compare(
    images_a: Images | ImageFeatures,
    images_b: Images | ImageFeatures,
    extractor: Extractor,
    subsets: int,
    subset_size: int | None,
    seed: int,
    names: tuple[str, str],
) -> tuple[ImageFeatures, ImageFeatures, dict[str, Any]]:
    """The features of two image sets and the distance fields between them.

    Both sets are embedded by one extractor (see :func:`~diffmem.quality.image_features`), which is built only when
    one of them is images rather than features.

    Args:
        images_a: The first set: images or :class:`ImageFeatures`.
        images_b: The second set.
        extractor: Features for the distances (default SSCD).
        subsets: KID subsets.
        subset_size: KID subset size; default half the smaller set.
        seed: Seed of the KID subsets.
        names: The argument names of the two sets, for error messages.

    Returns:
        The two feature sets and the distance fields (see :func:`quality_report`).
    """
    needs_extractor = not (isinstance(images_a, ImageFeatures) and isinstance(images_b, ImageFeatures))
    ext = _resolve_extractor(extractor) if needs_extractor else None
    fa = _as_features(images_a, ext, names[0])
    fb = _as_features(images_b, ext, names[1])
    return fa, fb, _distances(fa, fb, subsets, subset_size, seed, names)


def quality_report(
    before_images: Images | ImageFeatures,
    after_images: Images | ImageFeatures,
    prompts: Sequence[str] | None = None,
    extractor: str | Path | FeatureExtractor | EmbeddingScorer | None = None,
    clip: Any = None,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
    after_prompts: Sequence[str] | None = None,
    clip_arch: str = "ViT-B-32",
) -> dict[str, Any]:
    """Quality after an edit: distances between the images before and after it, and their CLIP scores.

    The distances say how far the edited model's generations moved from the original model's. Reports have a few
    dozen small images, and the two distances behave differently there:

    * KID is unbiased at any n; its ``kid_std`` (over subsets of ``kid_subset_size`` images) shows how much it
      moves. Small negative values mean "no measurable difference".
    * FD is biased upward at small n: two samples of one model give FD > 0, by an amount that shrinks as n
      grows. Compare FD only between reports of the same n, which the result records.

    Args:
        before_images: Generations of the original model (images, or :class:`ImageFeatures` already computed).
        after_images: Generations of the edited model for the same prompts and seeds.
        prompts: The prompts of ``before_images`` (one per image); enables the CLIP scores.
        extractor: Features for the distances, see :func:`image_features` (default SSCD).
        clip: CLIP model for the CLIP scores, see :func:`clip_score`; ``None`` skips them with a note.
        subsets: KID subsets.
        subset_size: KID subset size; default half the smaller set.
        seed: Seed of the KID subsets.
        after_prompts: The prompts of ``after_images`` when they differ from ``prompts``.
        clip_arch: open_clip architecture when ``clip`` is a weights file, a tag or ``"random"``.

    Returns:
        A JSON-ready dict: ``features``, ``features_source``, ``random_weights``, ``fd_name`` (``FID`` or
        ``FD_<features>``), ``fd``, ``kid_name``, ``kid_mean``, ``kid_std``, ``kid_subsets``, ``kid_subset_size``,
        ``seed``, ``n_before``, ``n_after``, ``clip_score_before`` and ``clip_score_after`` (dicts of
        :func:`clip_score`, or ``None``) and ``notes`` (lines the report should show).
    """
    fa, fb, report = _compare(before_images, after_images, extractor, subsets, subset_size, seed,
                              ("before_images", "after_images"))
    report["n_before"], report["n_after"] = fa.n, fb.n
    report["clip_score_before"] = report["clip_score_after"] = None
    if prompts is None:
        report["notes"].append("CLIP score not computed: no prompts given")
    elif isinstance(before_images, ImageFeatures) or isinstance(after_images, ImageFeatures):
        report["notes"].append("CLIP score not computed: pass images, not features")
    else:
        scorer, reason = _clip_scorer(clip, clip_arch, "cpu", 32)
        if scorer is None:
            before = after = {"clip_score": None, "reason": reason}
        else:
            before = clip_score(before_images, prompts, model=scorer)
            after = clip_score(after_images, list(after_prompts or prompts), model=scorer)
        report["clip_score_before"], report["clip_score_after"] = before, after
        if before["clip_score"] is None:
            report["notes"].append(f"CLIP score not computed: {before['reason']}")
        elif before.get("note"):
            report["notes"].append(before["note"])
    return report


def memorized_becomes(
    edited_mem_images: Images | ImageFeatures,
    ordinary_images: Images | ImageFeatures,
    extractor: str | Path | FeatureExtractor | EmbeddingScorer | None = None,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """What memorized prompts render after an edit, measured against the model's ordinary generations.

    KID and FD between the edited model's images for memorized prompts and the same model's images for ordinary
    (non-memorized) prompts, on the same features. Small means the memorized prompts now render as plausible
    ordinary images; large means something unlike them, e.g. dark, structureless noise. As a yardstick, the result
    also gives the KID between two random halves of the ordinary images (``baseline_kid_mean``): what a distance
    between two samples of ordinary images looks like at this size (at least 8 ordinary images).

    Args:
        edited_mem_images: Generations of the edited model for memorized prompts (or their features).
        ordinary_images: Generations of the same model for ordinary prompts (or their features).
        extractor: Features, see :func:`image_features` (default SSCD).
        subsets: KID subsets.
        subset_size: KID subset size; default half the smaller set.
        seed: Seed of the KID subsets and of the baseline split.

    Returns:
        The distance fields of :func:`quality_report` (``features``, ``fd_name``, ``fd``, ``kid_name``,
        ``kid_mean``, ``kid_std``, ...), ``n_memorized``, ``n_ordinary``, ``baseline_kid_mean``,
        ``baseline_kid_std`` (``None`` below 8 ordinary images) and ``notes``.
    """
    fm, fo, report = _compare(edited_mem_images, ordinary_images, extractor, subsets, subset_size, seed,
                              ("edited_mem_images", "ordinary_images"))
    report["n_memorized"], report["n_ordinary"] = fm.n, fo.n
    report["baseline_kid_mean"] = report["baseline_kid_std"] = None
    if fo.n >= 8:
        order = np.random.default_rng(seed).permutation(fo.n)
        half = fo.n // 2
        first, second = fo.values[order[:half]], fo.values[order[half : 2 * half]]
        size = min(report["kid_subset_size"], default_subset_size(half, half))
        mean, std = kernel_inception_distance(first, second, subsets=subsets, subset_size=size, seed=seed)
        report["baseline_kid_mean"], report["baseline_kid_std"] = mean, std
        report["baseline_kid_subset_size"] = size
    else:
        report["notes"].append(f"no baseline KID: it needs at least 8 ordinary images, got {fo.n}")
    return report

