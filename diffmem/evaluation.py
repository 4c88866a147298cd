"""Before/after evaluation of an edit (a mask or a direction basis) on a prompt manifest.

The edit is applied reversibly to the *same* loaded pipeline, so "before" and "after" differ only by the edit,
and every image of a prompt uses the same seed in both runs. With ``EvalConfig(region="bright-ending")`` replication
is also measured on each generation's memorized region only (its Bright Ending mask, :mod:`diffmem.detectors.region`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .config import DiffmemConfig, SamplerConfig, require
from .data import load_reference
from .edits import Edit, apply_edit
from .errors import ConfigError
from .parallel import distributed_state, shard_map
from .sampling import generate_images
from .score import EmbeddingScorer

logger = logging.getLogger(__name__)

__all__ = ["EvalConfig", "EvalResult", "evaluate", "evaluate_edit"]


@dataclass
class EvalConfig(DiffmemConfig):
    """Evaluation settings.

    Args:
        num_seeds: Generations per prompt.
        seed: First seed (image ``j`` of every prompt uses ``seed + j``, before and after).
        batch_size: Images per pipeline call.
        strict_threshold: A second, stricter replication threshold reported beside the scorer's own
            (0.7 for SSCD, as in the literature); ``None`` skips it.
        sampler: The sampler of every generation, before and after.
        region: Where replication is also measured: ``"full"`` (the scorer on the whole image only) or
            ``"bright-ending"``: each generation's Bright Ending mask (Chen et al. 2025; the end-token attention at
            its own last step, :mod:`diffmem.detectors.region`), for template or local memorization. Rows then add
            ``region``, ``mask_fraction`` and, with a reference, ``region_max_similarity``,
            ``region_mean_similarity`` and ``region_replication_rate`` beside the whole-image figures.
        mask_threshold: A pixel is in the mask where its min-max normalised end-token map reaches this value.
        end_tokens: ``"first"`` (the end token after the prompt, the paper's) or ``"all"`` (with the padding).
        region_metric: Similarity on the mask (:func:`diffmem.detectors.masked_similarity`): ``"ssim"``,
            ``"psnr"``, ``"mse"`` or ``"l2"``.
        region_threshold: A generation is a regional copy at a masked similarity at or above this (at or below for
            ``"mse"``); ``None``: 0.6 for ``"ssim"`` (the SSIM scorer's threshold), required for the others.
    """

    num_seeds: int = 8
    seed: int = 0
    batch_size: int = 64
    strict_threshold: float | None = 0.7
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    region: str = "full"
    mask_threshold: float = 0.5
    end_tokens: str = "first"
    region_metric: str = "ssim"
    region_threshold: float | None = None

    def check(self) -> None:
        from .detectors.local import MASKED_METRICS
        from .detectors.region import REGIONS

        require(self.region in REGIONS, "region", self.region, f"choose one of {', '.join(REGIONS)}")
        require(0 < self.mask_threshold < 1, "mask_threshold", self.mask_threshold, "must be in (0, 1)")
        require(self.end_tokens in ("first", "all"), "end_tokens", self.end_tokens, "choose 'first' or 'all'")
        require(self.region_metric in MASKED_METRICS, "region_metric", self.region_metric,
                f"choose one of {', '.join(MASKED_METRICS)}")
        if self.region_threshold is None and self.region == "bright-ending" and self.region_metric == "ssim":
            self.region_threshold = 0.6
        require(self.region_threshold is not None or self.region != "bright-ending", "region_threshold", None,
                f"region_metric={self.region_metric!r} needs an explicit threshold")
        require(self.strict_threshold is None or -1.0 <= self.strict_threshold <= 1.0, "strict_threshold",
                self.strict_threshold, "must be in [-1, 1] or None")
        require(self.num_seeds >= 1, "num_seeds", self.num_seeds, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


def _pairwise_mean(sim: np.ndarray) -> float:
    n = sim.shape[0]
    if n < 2:
        return float("nan")
    off = sim[~np.eye(n, dtype=bool)]
    return float(off.mean())


@dataclass
class EvalResult:
    """Per-prompt rows and aggregates of one evaluation run."""

    rows: list[dict]
    scorer: dict
    config: dict
    images: np.ndarray | None = None  # uint8 [P, S, H, W, 3]
    embeddings: torch.Tensor | None = None  # [P, S, D] for embedding scorers
    masks: np.ndarray | None = None  # bool [P, S, H, W], each generation's Bright Ending mask (region mode)

    def aggregate(self, rows: list[dict] | None = None) -> dict:
        rows = self.rows if rows is None else rows
        if not rows:
            return {"num_prompts": 0}
        keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)
                and k not in ("duplicates", "index")]
        out: dict = {"num_prompts": len(rows)}
        for k in keys:
            vals = [r[k] for r in rows if r.get(k) is not None and not (isinstance(r[k], float) and np.isnan(r[k]))]
            out[k] = float(np.mean(vals)) if vals else None
        return out

    def summary(self) -> dict:
        """Aggregates by split (``locate`` / ``heldout`` / ``nonmem``) and by duplication count."""
        by_split: dict[str, list[dict]] = defaultdict(list)
        by_dup: dict[str, list[dict]] = defaultdict(list)
        for r in self.rows:
            by_split[r["split"]].append(r)
            if r.get("duplicates") is not None:
                by_dup[str(r["duplicates"])].append(r)
        out = {s: self.aggregate(v) for s, v in sorted(by_split.items())}
        out["by_duplicates"] = {d: self.aggregate(v) for d, v in sorted(by_dup.items(), key=lambda x: int(x[0]))}
        return out


def evaluate(pipe, entries, config: EvalConfig, scorer, *, baseline: EvalResult | None = None,
             clip_scorer=None, progress: bool = True, desc: str = "evaluate") -> EvalResult:
    """Generate and score every manifest entry.

    Args:
        pipe: The pipeline (edited or not, as the caller arranged).
        entries: Manifest entries (``prompt``, ``split``, ``reference``, ``duplicates``, ``memorized``).
        config: Evaluation settings.
        scorer: A similarity scorer from :func:`diffmem.score.get_scorer`.
        baseline: The unedited run of the same entries; adds per-prompt drift (similarity of each image to the
            unedited image of the same seed) next to the seed-to-seed similarity of the unedited images.
        clip_scorer: A CLIP scorer with real weights; adds the CLIP score (image vs prompt).
        progress: Show progress bars.
        desc: Progress label.

    Returns:
        An :class:`EvalResult` holding the images too.
    """
    prompts = [e.prompt for e in entries]
    masks = None
    if config.region == "bright-ending":
        from .detectors.region import generate_with_end_token_maps

        images, maps = generate_with_end_token_maps(pipe, prompts, num_seeds=config.num_seeds, seed=config.seed,
                                                    batch_size=config.batch_size, end_tokens=config.end_tokens,
                                                    progress=progress, desc=desc, sampler=config.sampler)
        masks = maps >= config.mask_threshold
    else:
        images = generate_images(pipe, prompts, num_seeds=config.num_seeds, seed=config.seed,
                                 batch_size=config.batch_size, progress=progress, desc=desc, sampler=config.sampler)
    h, w = images.shape[2:4]
    thr = float(scorer.threshold)
    strict = config.strict_threshold if scorer.name == "sscd" else None
    n_seeds = images.shape[1]
    # embedding scorers: embed every image once and compare embeddings
    embeddings = None
    if isinstance(scorer, EmbeddingScorer):
        embeddings = scorer.embed(list(images.reshape(-1, h, w, 3))).view(len(entries), n_seeds, -1)
    rows = []
    for i, (e, imgs) in enumerate(zip(entries, images)):
        gens = embeddings[i] if embeddings is not None else list(imgs)
        row: dict = {"index": i, "prompt": e.prompt, "split": e.split, "duplicates": e.duplicates,
                     "memorized": bool(e.memorized)}
        if e.reference is not None:
            ref = load_reference(e.reference, (h, w), row=e)
            s = scorer.similarity(gens, [ref]).float().numpy()[:, 0]
            row.update(max_similarity=float(s.max()), mean_similarity=float(s.mean()),
                       replication_rate=float((s >= thr).mean()))
            if strict is not None:
                row["replication_rate_strict"] = float((s >= strict).mean())
        if masks is not None:
            row.update(_region_row(imgs, masks[i], e, (h, w), config))
        pair = scorer.similarity(gens, gens).float().numpy()
        row["diversity_similarity"] = _pairwise_mean(pair)
        if baseline is not None:
            base = baseline.embeddings[i] if baseline.embeddings is not None else list(baseline.images[i])
            cross = scorer.similarity(gens, base).float().numpy()
            row["drift_similarity"] = float(np.diag(cross).mean())
            row["seed_similarity_before"] = baseline.rows[i]["diversity_similarity"]
            row["drift_within_seed_spread"] = bool(row["drift_similarity"] >= row["seed_similarity_before"])
            row["pixel_drift"] = float(np.abs(imgs.astype(np.float32) - baseline.images[i].astype(np.float32)).mean() / 255)
        if clip_scorer is not None:
            row["clip_score"] = float(clip_scorer.clip_score(list(imgs), [e.prompt] * len(imgs)).mean())
        rows.append(row)
    return EvalResult(rows=rows, scorer=scorer.describe(), config=config.to_dict(), images=images,
                      embeddings=embeddings, masks=masks)


def _region_row(images: np.ndarray, masks: np.ndarray, entry, size: tuple[int, int], config: EvalConfig) -> dict:
    """The region fields of one prompt's row: mask fraction, and the masked similarity to its reference."""
    from .detectors.region import is_regional_copy, region_similarities

    row: dict = {"region": config.region, "mask_fraction": float(masks.mean())}
    if entry.reference is not None:
        ref = load_reference(entry.reference, size, row=entry)
        s = region_similarities(list(images), ref, list(masks), config.region_metric)
        row.update(region_max_similarity=float(s.min() if config.region_metric == "mse" else s.max()),
                   region_mean_similarity=float(s.mean()),
                   region_replication_rate=float(is_regional_copy(s, config.region_threshold,
                                                                  config.region_metric).mean()))
    return row


def evaluate_edit(pipe, entries, config: EvalConfig, scorer, edit: Edit | None, *, clip_scorer=None,
                  progress: bool = True) -> tuple[EvalResult, EvalResult | None]:
    """Evaluate without and (when ``edit`` is given) with ``edit`` on the same loaded pipeline.

    Under ``accelerate launch`` the entries are sharded over processes and only the per-prompt rows are gathered
    (the results then hold no images); in a single process the images are kept for reports.

    Returns:
        ``(before, after)``; ``after`` carries the drift fields and is ``None`` without an edit.
    """
    entries = list(entries)
    if not entries:
        raise ConfigError("entries is empty: nothing to evaluate")

    def run(part: list) -> tuple[EvalResult, EvalResult | None]:
        before = evaluate(pipe, part, config, scorer, clip_scorer=clip_scorer, progress=progress, desc="before")
        if edit is None:
            return before, None
        with apply_edit(pipe, edit), torch.no_grad():
            after = evaluate(pipe, part, config, scorer, baseline=before, clip_scorer=clip_scorer,
                             progress=progress, desc="after")
        return before, after

    if distributed_state().num_processes == 1:
        return run(entries)

    def work(indices: list[int]) -> list[tuple[dict, dict | None]]:
        before, after = run([entries[i] for i in indices])
        return list(zip(before.rows, after.rows if after is not None else [None] * len(indices)))

    pairs = shard_map(work, list(range(len(entries))))
    before_rows = [dict(b, index=i) for i, (b, _) in enumerate(pairs)]
    before = EvalResult(rows=before_rows, scorer=scorer.describe(), config=config.to_dict())
    if edit is None:
        return before, None
    after_rows = [dict(a, index=i) for i, (_, a) in enumerate(pairs)]
    return before, EvalResult(rows=after_rows, scorer=scorer.describe(), config=config.to_dict())
