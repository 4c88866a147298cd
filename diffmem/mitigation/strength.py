"""Choosing the edit's strength: each strength located, judged out of fold, on drift and on what the memorized
prompts become (plausible images, not noise)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import LocateConfig
from ..data import ManifestEntry
from ..edits import Edit, apply_edit
from ..errors import DiffmemError
from ..evaluation import EvalConfig, EvalResult, evaluate
from ..localization import locate
from ..quality import memorized_becomes
from .config import MitigateConfig

logger = logging.getLogger(__name__)

__all__ = ["QualityGate", "StrengthChoice", "choose_strength", "decide", "locate_config", "merged_stats"]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def locate_config(method: str, strength: float, record_steps: int) -> LocateConfig:
    """The locate settings of one strength (a ratio, or a rank for ``directions``)."""
    if method == "directions":
        return LocateConfig(method="directions", rank=int(strength), record_steps=record_steps)
    return LocateConfig(method=method, ratio=float(strength), record_steps=record_steps)


def merged_stats(parts: list[Any]) -> Any:
    """The union of several :class:`~diffmem.stats.ActivationStats` (the inputs are left unchanged)."""
    out = copy.deepcopy(parts[0])
    for other in parts[1:]:
        out.merge_(other)
    return out


def _score_strength(pipe: Any, edit: Edit, locate_rows: list[ManifestEntry], nonmem: list[ManifestEntry],
                    nonmem_before: EvalResult | None, ecfg: EvalConfig, scorer: Any) -> dict[str, Any]:
    with apply_edit(pipe, edit), torch.no_grad():
        loc = evaluate(pipe, locate_rows, ecfg, scorer, progress=False, desc="sweep")
        row: dict[str, Any] = {
            "parameters_changed": edit.num_params_changed(),
            "fraction": edit.fraction_changed(),
            "locate_replication": _mean([r["replication_rate"] for r in loc.rows if "replication_rate" in r]),
            "locate_similarity": _mean([r["mean_similarity"] for r in loc.rows if "mean_similarity" in r]),
        }
        if nonmem_before is not None and loc.images is not None and nonmem_before.images is not None:
            row["memorized_becomes"] = _becomes(loc.images, nonmem_before.images)
        if nonmem_before is not None:
            after = evaluate(pipe, nonmem, ecfg, scorer, baseline=nonmem_before, progress=False, desc="sweep drift")
            row["drift_similarity"] = _mean([r["drift_similarity"] for r in after.rows])
            row["seed_similarity_before"] = _mean([r["seed_similarity_before"] for r in after.rows])
            # one seed has no seed-to-seed spread to be within: not measured rather than "outside"
            row["drift_within_spread"] = _mean([float(r["drift_within_seed_spread"]) for r in after.rows
                                                if r.get("seed_similarity_before") is not None
                                                and np.isfinite(r["seed_similarity_before"])])
    return row


MIN_KID_IMAGES = 8  # below this many images on a side, KID subsets are (nearly) the whole set: no spread to judge by


def _becomes(memorized: np.ndarray, ordinary: np.ndarray) -> dict[str, Any] | None:
    """What the memorized prompts render under the edit: KID to the unedited model's ordinary generations (and the
    KID between two halves of those, as the yardstick); ``None`` when no feature extractor is available or either
    side has fewer than :data:`MIN_KID_IMAGES` images (the estimate would have no spread to judge it by)."""
    mem, ordi = memorized.reshape(-1, *memorized.shape[-3:]), ordinary.reshape(-1, *ordinary.shape[-3:])
    if min(len(mem), len(ordi)) < MIN_KID_IMAGES:
        logger.info("memorized-prompt quality not measured: %d memorized and %d ordinary images (needs %d each)",
                    len(mem), len(ordi), MIN_KID_IMAGES)
        return None
    try:
        res = memorized_becomes(list(mem), list(ordi), subsets=50)
    except (DiffmemError, ImportError, OSError) as err:  # optional: a missing extractor must not stop mitigation
        logger.info("memorized-prompt quality not measured: %s", str(err).splitlines()[0])
        return None
    return {k: res.get(k) for k in ("kid_name", "kid_mean", "kid_std", "baseline_kid_mean", "baseline_kid_std")}


def _plausible(row: dict[str, Any], unedited_kid: float | None) -> bool:
    """The memorized prompts render no further from ordinary generations (KID) than the memorized images themselves
    did before the edit, up to the KID estimate's own noise (two standard deviations over its subsets): they became
    something image-like, not e.g. dark noise (true when not measured).

    A strict ``kid <= unedited_kid`` would judge noise: where the memorized images resemble ordinary ones (the
    overlap member) the unedited KID is near zero and any edit's estimate scatters around it."""
    becomes = row.get("memorized_becomes") or {}
    kid = becomes.get("kid_mean")
    if kid is None or unedited_kid is None:
        return True
    return kid <= unedited_kid + 2.0 * float(becomes.get("kid_std") or 0.0)


def _acceptable(row: dict[str, Any], target: float, unedited_kid: float | None = None,
                similarity_floor: float | None = None) -> bool:
    """Replication at most ``target`` (or, with ``similarity_floor``, mean similarity at most that floor), and the
    quality vetoes of :func:`_keeps_quality` (a ``plausible`` already in the row counts, beside ``unedited_kid``)."""
    rep = _judged(row, similarity_floor is not None)
    limit = target if similarity_floor is None else similarity_floor
    plausible = bool(row.get("plausible", True)) and _plausible(row, unedited_kid)
    return rep is not None and rep <= limit and _keeps_quality({**row, "plausible": plausible})


def _judged(row: dict[str, Any], by_similarity: bool = False) -> float | None:
    """The figure a strength is judged by: replication (or mean similarity to the references), out of fold when
    measured, else on the locate rows."""
    if by_similarity:
        return row.get("out_of_fold_similarity", row.get("locate_similarity"))
    return row.get("out_of_fold_replication", row["locate_replication"])


def _out_of_fold(pipe: Any, rows: list[ManifestEntry], folds: list[list[int]], stats_parts: list[Any],
                 stats_base: Any, lcfg: LocateConfig, ecfg: EvalConfig, scorer: Any) -> dict[str, float | None]:
    """Replication and mean similarity of each fold's rows under the edit located on the other folds, averaged over
    all rows."""
    rates: list[float] = []
    sims: list[float] = []
    for k, fold in enumerate(folds):
        others = merged_stats([p for j, p in enumerate(stats_parts) if j != k])
        edit = locate(pipe, others, stats_base, lcfg)
        with apply_edit(pipe, edit), torch.no_grad():
            res = evaluate(pipe, [rows[i] for i in fold], ecfg, scorer, progress=False)
        rates += [r["replication_rate"] for r in res.rows if "replication_rate" in r]
        sims += [r["mean_similarity"] for r in res.rows if "mean_similarity" in r]
    return {"out_of_fold_replication": _mean(rates), "out_of_fold_similarity": _mean(sims)}


@dataclass
class QualityGate:
    """The sweep's quality vetoes, reusable on any later edit (a robust round's): drift of the ordinary prompts
    within the seed spread for at least half of them, and plausible renderings of the memorized prompts.

    It holds the unedited model's generations at the sweep's seeds, so that a check costs one evaluation of the
    memorized and the ordinary rows under the edit.
    """

    locate_rows: list[ManifestEntry]
    nonmem: list[ManifestEntry]
    nonmem_before: EvalResult
    mem_before_images: np.ndarray | None
    unedited_kid: float | None
    ecfg: EvalConfig
    scorer: Any

    def subset(self, indices: list[int]) -> QualityGate:
        """The gate of some ``locate`` rows only (a cross-fitting fold's training rows), with their own unedited KID."""
        images = self.mem_before_images[indices] if self.mem_before_images is not None else None
        kid = None
        if images is not None and self.nonmem_before.images is not None:
            kid = (_becomes(images, self.nonmem_before.images) or {}).get("kid_mean")
        return replace(self, locate_rows=[self.locate_rows[i] for i in indices], mem_before_images=images,
                       unedited_kid=kid)

    def measure(self, pipe: Any, edit: Edit) -> dict[str, Any]:
        """Replication of the memorized rows, what they render (KID) and the ordinary rows' drift under ``edit``;
        ``plausible`` and ``passes`` (both vetoes) are filled in."""
        row = _score_strength(pipe, edit, self.locate_rows, self.nonmem, self.nonmem_before, self.ecfg, self.scorer)
        row["plausible"] = _plausible(row, self.unedited_kid)
        row["passes"] = _keeps_quality(row)
        return row

    def holds(self, row: dict[str, Any], start: dict[str, Any]) -> bool:
        """Whether ``row`` (a candidate edit) passes; when the edit it grows from (``start``) already failed, whether it
        is no worse: KID within the start's plus two standard deviations, drift within the spread for no fewer
        ordinary prompts."""
        if start.get("passes", True):
            return bool(row["passes"])
        kid, kid0 = ((r.get("memorized_becomes") or {}).get("kid_mean") for r in (row, start))
        std = float((row.get("memorized_becomes") or {}).get("kid_std") or 0.0)
        spread, spread0 = row.get("drift_within_spread"), start.get("drift_within_spread")
        return ((kid is None or kid0 is None or kid <= kid0 + 2.0 * std)
                and (spread is None or spread0 is None or spread >= spread0))


@dataclass
class StrengthChoice:
    """The chosen strength, its edit, every strength's row, and the unedited memorized images' KID to ordinary
    generations and replication at the sweep's seeds; ``gate`` (with ordinary rows) checks later edits the same way."""

    strength: float
    edit: Edit
    sweep: list[dict[str, Any]]
    unedited_kid: float | None
    unedited_replication: float | None = None
    gate: QualityGate | None = None


def choose_strength(pipe: Any, locate_rows: list[ManifestEntry], nonmem: list[ManifestEntry], stats_mem: Any,
                    stats_parts: list[Any], stats_base: Any, folds: list[list[int]], config: MitigateConfig,
                    scorer: Any, progress: bool = True) -> StrengthChoice:
    """The strength given, or the smallest acceptable one; with folds, judged on the rows each edit was not fitted on.

    A strength is acceptable when its replication is at most ``config.target``, the non-memorized drift stays within
    the seed-to-seed spread for at least half of the ordinary prompts, and the memorized prompts still render
    image-like (:func:`_plausible`). When none is, the choice prefers plausible renderings, then lower replication.

    The first acceptable strength's figure is biased low: it is the first of several noisy measurements to pass
    the target. With ``config.margin_steps`` (default 1) the choice therefore moves that many strengths further when
    each of them still keeps drift within the spread and renders plausibly (those are measured, not the
    replication, which only falls with strength); a strength given as ``ratio`` is kept as it is.

    When the given rows do not replicate on the unedited model at the sweep's seeds (rate at most the target), a
    replication count cannot tell strengths apart: they are then judged by the mean similarity of the memorized
    rows to their training images, which must fall to the ordinary (``nonmem``) rows' similarity to theirs, the
    level of an image the model saw once.
    """
    ecfg = EvalConfig(num_seeds=config.sweep_num_seeds, seed=config.seed + 1000, sampler=config.sampler)
    strengths = [config.ratio] if config.ratio is not None else list(config.strengths)
    nonmem_before = evaluate(pipe, nonmem, ecfg, scorer, progress=False) if nonmem else None
    with torch.no_grad():
        mem_before = evaluate(pipe, locate_rows, ecfg, scorer, progress=False)
    unedited_kid = floor = None
    if nonmem_before is not None and nonmem_before.images is not None and mem_before.images is not None:
        unedited_kid = (_becomes(mem_before.images, nonmem_before.images) or {}).get("kid_mean")
    unedited_rep = _mean([r["replication_rate"] for r in mem_before.rows if "replication_rate" in r])
    if config.ratio is None and nonmem_before is not None and unedited_rep is not None and unedited_rep <= config.target:
        floor = _mean([r["mean_similarity"] for r in nonmem_before.rows if "mean_similarity" in r])
        if floor is not None:
            logger.warning("the given memorized rows replicate at rate %.3f on the unedited model at the sweep's "
                           "seeds (target %.3f): strengths are judged by their mean similarity to the training "
                           "images, against the ordinary rows' own (%.3f)", unedited_rep, config.target, floor)
    sweep: list[dict[str, Any]] = []
    edits: list[Edit] = []
    index = None
    for strength in tqdm(strengths, desc="strength", disable=not progress or len(strengths) == 1):
        lcfg = locate_config(config.method, strength, config.record_steps)
        edit = locate(pipe, stats_mem, stats_base, lcfg)
        row = {"strength": strength, **_score_strength(pipe, edit, locate_rows, nonmem, nonmem_before, ecfg, scorer)}
        if folds and len(strengths) > 1:
            row.update(_out_of_fold(pipe, locate_rows, folds, stats_parts, stats_base, lcfg, ecfg, scorer))
        if floor is not None:
            row["judged_by"], row["similarity_floor"] = "similarity", floor
        row["plausible"] = _plausible(row, unedited_kid)
        sweep.append(row)
        edits.append(edit)
        logger.info("strength %g: %d weights changed, locate replication %s (out of fold %s), drift within spread %s",
                    strength, row["parameters_changed"], row["locate_replication"],
                    row.get("out_of_fold_replication"), row.get("drift_within_spread"))
        index, done = decide(sweep, config.target, floor, 0 if config.ratio is not None else config.margin_steps)
        if done:
            break
    if index is None:
        raise DiffmemError("no strength was tried: give strengths or a ratio")
    gate = None
    if nonmem_before is not None:
        gate = QualityGate(locate_rows, nonmem, nonmem_before, mem_before.images, unedited_kid, ecfg, scorer)
    return StrengthChoice(sweep[index]["strength"], edits[index], sweep, unedited_kid, unedited_rep, gate)


def decide(sweep: list[dict[str, Any]], target: float, similarity_floor: float | None = None,
           margin_steps: int = 0) -> tuple[int | None, bool]:
    """The strength chosen from the sweep so far (its index) and whether the sweep can stop; marks each margin row.

    Each row holds its measurements and ``plausible`` (:func:`_plausible`, already decided). The first acceptable
    strength (:func:`_acceptable`) is chosen, then up to ``margin_steps`` stronger ones, each only while it keeps
    drift within the spread and renders plausibly (:func:`_keeps_quality`); a veto or the last margin step stops
    the sweep. With no acceptable strength, the best so far: plausible first, then the lowest judged figure.
    """
    first = next((i for i, r in enumerate(sweep) if _acceptable(r, target, None, similarity_floor)), None)
    if first is None:
        def key(i: int) -> tuple[bool, float]:
            judged = _judged(sweep[i], similarity_floor is not None)
            return not sweep[i].get("plausible", True), judged if judged is not None else float("inf")

        return (min(range(len(sweep)), key=key) if sweep else None), False
    chosen = first
    if margin_steps:
        sweep[first]["margin"] = "first acceptable"
    for i in range(first + 1, len(sweep)):
        if not _keeps_quality(sweep[i]):
            sweep[i]["margin"] = "rejected: drift or plausibility"
            return chosen, True
        sweep[i]["margin"] = "taken"
        chosen = i
    return chosen, chosen - first >= margin_steps


def _keeps_quality(row: dict[str, Any]) -> bool:
    """Drift within the seed spread for at least half of the ordinary prompts, and a plausible rendering of the
    memorized prompts (``row["plausible"]``): the vetoes of :func:`_acceptable` without the replication test."""
    spread = row.get("drift_within_spread")
    return (spread is None or spread >= 0.5) and bool(row.get("plausible", True))
