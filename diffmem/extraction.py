"""Generate-and-filter extraction attack (Carlini et al., "Extracting Training Data from Diffusion Models", 2023).

For each prompt the attack generates ``N`` images with seeds ``seed, seed + 1, ...`` and builds a graph whose
nodes are the generations and whose edges join pairs with similarity at or above a threshold. A prompt is
flagged as memorized when the graph holds a clique of at least ``m`` near-identical generations: a model that
has memorized a training image keeps returning it whatever the initial noise.

The threshold is either given or calibrated on non-memorized prompts to a target false-flag rate. When a
reference (training) image is known, a flagged clique's generations are checked against it: a generation whose
similarity to the reference reaches the scorer's replication threshold is a *verified extraction*.

Three pure steps (:func:`clique_strength`, :func:`find_clique`, :func:`~diffmem.metrics.threshold_at_false_flag_rate`) and two drivers:
:func:`extraction_attack_images` on images generated elsewhere, and :func:`extraction_attack`, which generates
with a pipeline and calls it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import DiffmemConfig, SamplerConfig, require
from .errors import ConfigError, DiffmemError
from .files import atomic_write_text, write_json
from .metrics import threshold_at_false_flag_rate
from .parallel import is_main_process, shard_map
from .sampling import generate_images
from .score import Scorer, to_uint8_list

logger = logging.getLogger(__name__)

__all__ = [
    "ExtractionConfig",
    "AttackConfig",
    "AttackRow",
    "AttackResult",
    "clique_strength",
    "find_clique",
    "extraction_attack_images",
    "extraction_attack",
    "EXTRACTIONS_DIR",
    "EXTRACTIONS_INDEX",
]

EXTRACTIONS_DIR = "extractions"
"""Folder under ``out_dir`` that holds the verified extractions and their references."""

EXTRACTIONS_INDEX = "index.jsonl"
"""Manifest of the extractions folder: one line per verified generation (read it; do not parse file names)."""

_RESULT_FILE = "attack.json"


@dataclass
class ExtractionConfig(DiffmemConfig):
    """How to run the extraction attack.

    Args:
        num_generations: Images generated per prompt (``N``); image ``j`` uses seed ``seed + j``.
        seed: First seed.
        clique_size: Near-identical generations needed to flag a prompt (``m``), in ``[2, num_generations]``.
        threshold: Similarity at or above which two generations count as near-identical; ``None`` calibrates it
            on non-memorized prompts to ``false_flag_rate``.
        false_flag_rate: Largest fraction of non-memorized prompts the calibrated threshold may flag, in ``[0, 1)``.
        batch_size: Images per pipeline call.
        sampler: The sampler of the generations.
    """

    num_generations: int = 16
    seed: int = 0
    clique_size: int = 4
    threshold: float | None = None
    false_flag_rate: float = 0.05
    batch_size: int = 64
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def check(self) -> None:
        n = self.num_generations
        require(n >= 2, "num_generations", n, "must be >= 2")
        require(2 <= self.clique_size <= n, "clique_size", self.clique_size, f"must be in [2, num_generations={n}]")
        require(self.threshold is None or math.isfinite(self.threshold), "threshold", self.threshold,
                "must be finite or None")
        require(0.0 <= self.false_flag_rate < 1.0, "false_flag_rate", self.false_flag_rate, "must be in [0, 1)")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")

AttackConfig = ExtractionConfig  # deprecated: the name before ExtractionConfig (kept for existing code)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions


def _symmetric(sim: np.ndarray) -> np.ndarray:
    """``min(sim, sim.T)`` as float64; NaN entries stay NaN (and never form an edge)."""
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"a similarity matrix must be square [N, N], got shape {tuple(s.shape)}")
    return np.minimum(s, s.T)


def _graph(s: np.ndarray, threshold: float) -> nx.Graph:
    """Graph on ``range(N)`` with an edge ``i - j`` (``i != j``) wherever ``s[i, j] >= threshold``."""
    n = s.shape[0]
    iu, ju = np.triu_indices(n, k=1)
    with np.errstate(invalid="ignore"):
        keep = s[iu, ju] >= threshold
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(zip(iu[keep].tolist(), ju[keep].tolist()))
    return graph


def _check_m(m: int) -> None:
    require(m >= 2, "m", m, "a clique needs at least 2 members")


def _has_clique(s: np.ndarray, threshold: float, m: int) -> bool:
    # Every member of an m-clique has degree >= m - 1, so the search can be limited to the (m - 1)-core.
    core = nx.k_core(_graph(s, threshold), m - 1)
    if core.number_of_nodes() < m:
        return False
    return any(len(c) >= m for c in nx.find_cliques(core))


def clique_strength(sim: np.ndarray, m: int) -> float:
    """Largest threshold at which ``m`` generations are all pairwise near-identical.

    The graph at threshold ``t`` joins ``i != j`` when ``min(sim[i, j], sim[j, i]) >= t``. The strength is the
    largest ``t`` whose graph holds a clique of at least ``m`` nodes, i.e. the best "weakest link" over all sets
    of ``m`` generations. It is found by binary search over the distinct off-diagonal values.

    Args:
        sim: ``[N, N]`` pairwise similarities (higher = more alike); the diagonal is ignored.
        m: Clique size, >= 2.

    Returns:
        The strength, one of the (symmetrised) entries of ``sim``; ``-inf`` when no ``m``-clique exists at any
        threshold (``N < m``, or NaN entries that break every ``m``-set).
    """
    _check_m(m)
    s = _symmetric(sim)
    n = s.shape[0]
    if n < m:
        return -math.inf
    upper = s[np.triu_indices(n, k=1)]
    values = np.unique(upper[~np.isnan(upper)])  # ascending
    if values.size == 0:
        return -math.inf
    if m == 2:
        return float(values[-1])
    if not _has_clique(s, float(values[0]), m):
        return -math.inf
    lo, hi = 0, values.size - 1  # invariant: the graph at values[lo] has an m-clique
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _has_clique(s, float(values[mid]), m):
            lo = mid
        else:
            hi = mid - 1
    return float(values[lo])


def find_clique(sim: np.ndarray, threshold: float, m: int) -> list[int] | None:
    """Largest set of generations whose pairwise similarities all reach ``threshold``, if it has ``m`` or more.

    Ties between largest cliques go to the highest mean pairwise similarity, then to the smallest indices.

    Args:
        sim: ``[N, N]`` pairwise similarities; symmetrised by ``min(sim, sim.T)``, diagonal ignored.
        threshold: Edge threshold (``sim >= threshold``).
        m: Smallest clique that counts, >= 2.

    Returns:
        Sorted member indices, or ``None`` when the largest clique has fewer than ``m`` members.
    """
    _check_m(m)
    s = _symmetric(sim)
    core = nx.k_core(_graph(s, threshold), m - 1)
    best: list[int] | None = None
    best_key: tuple[int, float, list[int]] | None = None
    for clique in nx.find_cliques(core):
        if len(clique) < m:
            continue
        members = sorted(clique)
        block = s[np.ix_(members, members)]
        mean = float(block[np.triu_indices(len(members), k=1)].mean())
        key = (len(members), mean, [-i for i in members])  # larger is better
        if best_key is None or key > best_key:
            best, best_key = members, key
    return best


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class AttackRow:
    """The attack's outcome for one prompt.

    Args:
        index: Position of the prompt in the attacked list.
        prompt: The prompt.
        strength: Clique strength of its generations (:func:`clique_strength`); ``None`` in JSON when ``-inf``.
        flagged: Whether ``strength >= threshold`` (a clique of at least ``clique_size`` near-identical images).
        clique: Members of the largest clique at the threshold (generation indices); empty when not flagged.
        verified: Clique members whose similarity to the reference reaches the scorer's threshold.
        has_reference: Whether a reference image was given for this prompt.
        max_reference_similarity: Largest similarity of any of its generations (clique or not) to the reference;
            ``None`` without a reference.
    """

    index: int
    prompt: str
    strength: float
    flagged: bool
    clique: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    has_reference: bool = False
    max_reference_similarity: float | None = None

    @property
    def num_verified(self) -> int:
        """Number of verified extractions among this prompt's generations."""
        return len(self.verified)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strength"] = _finite_or_none(self.strength)
        d["num_verified"] = self.num_verified
        return d


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class AttackResult:
    """Outcome of :func:`extraction_attack` / :func:`extraction_attack_images`.

    Args:
        rows: One row per attacked prompt, in order.
        threshold: Similarity threshold used for the clique graphs.
        calibration: ``calibrated`` (whether the threshold was calibrated), ``num_prompts``, ``strengths`` and
            ``false_flag_rate_achieved`` (the fraction of calibration prompts the threshold flags; ``None`` without
            calibration prompts).
        scorer: ``scorer.describe()``.
        config: The attack configuration.
        sampler: The pipeline call arguments the generations used (``None`` for images generated elsewhere).
    """

    rows: list[AttackRow]
    threshold: float
    calibration: dict[str, Any]
    scorer: dict[str, Any]
    config: ExtractionConfig
    sampler: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """Headline numbers: prompts flagged and verified, extraction rate, threshold and false-flag rates."""
        n = len(self.rows)
        verified_prompts = sum(1 for r in self.rows if r.num_verified > 0)
        return {
            "num_prompts": n,
            "num_flagged": sum(1 for r in self.rows if r.flagged),
            "num_verified_prompts": verified_prompts,
            "num_verified_generations": sum(r.num_verified for r in self.rows),
            "extraction_rate": verified_prompts / n if n else 0.0,
            "threshold": self.threshold,
            "false_flag_rate_target": self.config.false_flag_rate,
            "false_flag_rate_achieved": self.calibration.get("false_flag_rate_achieved"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "threshold": self.threshold,
            "calibration": self.calibration,
            "scorer": self.scorer,
            "config": self.config.to_dict(),
            "sampler": self.sampler,
            "summary": self.summary(),
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as JSON with sorted keys.

        Args:
            path: Output file; its folder is created if missing.

        Returns:
            The path written.
        """
        return write_json(Path(path).expanduser(), self.to_dict())


# ----------------------------------------------------------------------------------------------------------------
# Drivers


def _similarity(scorer: Scorer, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``scorer.similarity(a, b)`` as a float64 numpy array (float32 values, widened exactly)."""
    sim = scorer.similarity(a, b)
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().cpu().numpy()
    return np.asarray(sim, dtype=np.float64)


def _check_prompt_images(images: np.ndarray, i: int, n: int, what: str) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] != n:
        raise ValueError(
            f"{what} {i}: expected [num_generations={n}, H, W, 3] images, got shape {tuple(arr.shape)}"
        )
    return arr


def _strengths(images: Iterable[np.ndarray], config: ExtractionConfig, scorer: Scorer, progress: bool) -> list[float]:
    """Clique strength of each calibration prompt's generations."""
    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    out = []
    for i, imgs in enumerate(tqdm(images, desc="attack: calibrate", total=total, disable=not progress)):
        imgs = _check_prompt_images(imgs, i, config.num_generations, "calibration prompt")
        out.append(clique_strength(_similarity(scorer, imgs, imgs), config.clique_size))
    return out


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path)


def _calibrate(cal: list[float], config: ExtractionConfig) -> tuple[float, dict[str, Any]]:
    """The threshold (given, or calibrated on the strengths ``cal``) and the calibration record."""
    calibration: dict[str, Any] = {
        "calibrated": config.threshold is None,
        "num_prompts": len(cal),
        "strengths": [_finite_or_none(s) for s in cal],
        "false_flag_rate_achieved": None,
    }
    if not cal:
        return float(config.threshold), calibration  # type: ignore[arg-type]
    if config.threshold is None:
        threshold, achieved = threshold_at_false_flag_rate(cal, config.false_flag_rate)
    else:
        threshold = float(config.threshold)
        achieved = sum(1 for s in cal if s >= threshold) / len(cal)
    calibration["false_flag_rate_achieved"] = achieved
    logger.info(
        "attack threshold %.6g (%s; flags %.3f of %d calibration prompts, target %.3f)", threshold,
        "calibrated" if config.threshold is None else "given", achieved, len(cal), config.false_flag_rate,
    )
    return threshold, calibration


def _attack_prompt(
    i: int, prompt: str, imgs: np.ndarray, threshold: float, reference: Any | None, config: ExtractionConfig,
    scorer: Scorer,
) -> tuple[AttackRow, dict[int, np.ndarray], np.ndarray | None, list[float]]:
    """One prompt's row, its verified generations by index, its reference and the similarities to it."""
    imgs = _check_prompt_images(imgs, i, config.num_generations, "prompt")
    sim = _similarity(scorer, imgs, imgs)
    strength = clique_strength(sim, config.clique_size)
    clique = find_clique(sim, threshold, config.clique_size) if strength >= threshold else None
    row = AttackRow(index=i, prompt=prompt, strength=strength, flagged=clique is not None, clique=clique or [])
    if reference is None:
        return row, {}, None, []
    ref = to_uint8_list([reference])[0]
    ref_sim = _similarity(scorer, imgs, ref[None])[:, 0]
    row.has_reference = True
    row.max_reference_similarity = float(ref_sim.max())
    row.verified = [j for j in row.clique if ref_sim[j] >= scorer.threshold]
    return row, {j: np.ascontiguousarray(imgs[j]) for j in row.verified}, ref, [float(x) for x in ref_sim]


def _finish(
    outcomes: list[tuple[AttackRow, dict[int, np.ndarray], np.ndarray | None, list[float]]],
    threshold: float,
    calibration: dict[str, Any],
    config: ExtractionConfig,
    scorer: Scorer,
    out_dir: str | os.PathLike[str] | None,
    sampler: dict[str, Any] | None = None,
) -> AttackResult:
    """Assemble the result; with ``out_dir`` write ``attack.json`` and the verified extractions."""
    rows = [o[0] for o in outcomes]
    result = AttackResult(rows=rows, threshold=threshold, calibration=calibration, scorer=scorer.describe(),
                          config=config, sampler=sampler)
    if out_dir is not None and is_main_process():
        ext_dir = Path(out_dir).expanduser() / EXTRACTIONS_DIR
        ext_dir.mkdir(parents=True, exist_ok=True)
        index_lines: list[str] = []
        for row, verified, ref, ref_sim in outcomes:
            if not verified:
                continue
            ref_name = f"{row.index}_reference.png"
            _save_png(ref, ext_dir / ref_name)
            for j, image in verified.items():
                name = f"{row.index}_{j}.png"
                _save_png(image, ext_dir / name)
                entry = {
                    "prompt_index": row.index, "prompt": row.prompt, "generation_index": j, "seed": config.seed + j,
                    "image": name, "reference": ref_name, "similarity": ref_sim[j],
                    "strength": _finite_or_none(row.strength), "clique": row.clique,
                }
                index_lines.append(json.dumps(entry, sort_keys=True, ensure_ascii=False))
        atomic_write_text(ext_dir / EXTRACTIONS_INDEX, "".join(line + "\n" for line in index_lines))
        result.to_json(Path(out_dir).expanduser() / _RESULT_FILE)
    s = result.summary()
    logger.info("attack: %d of %d prompts flagged, %d verified (%d generations)", s["num_flagged"],
                s["num_prompts"], s["num_verified_prompts"], s["num_verified_generations"])
    return result


def _check_inputs(prompts: list[str], config: ExtractionConfig, has_calibration: bool, references: Any) -> None:
    if config.threshold is None and not has_calibration:
        raise DiffmemError("config.threshold is None and no calibration prompts were given; set one of them")
    if references is not None and len(references) != len(prompts):
        raise ConfigError(f"references has {len(references)} entries for {len(prompts)} prompts")


def extraction_attack_images(
    images: np.ndarray | Iterable[np.ndarray],
    prompts: Sequence[str],
    config: ExtractionConfig,
    scorer: Scorer,
    *,
    references: Sequence[Any | None] | None = None,
    calibration_images: np.ndarray | Iterable[np.ndarray] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AttackResult:
    """Run the attack on images that are already generated.

    Args:
        images: uint8 ``[P, N, H, W, 3]`` (``N = config.num_generations``; image ``j`` made with seed
            ``config.seed + j``), or an iterable yielding one ``[N, H, W, 3]`` array per prompt, so that
            generations can be streamed.
        prompts: The ``P`` prompts, for the report.
        config: Attack configuration.
        scorer: Similarity scorer (e.g. ``get_scorer("sscd")``); its ``threshold`` verifies extractions.
        references: One reference image (PIL or uint8 ``[H, W, 3]``) or ``None`` per prompt.
        calibration_images: Generations of non-memorized prompts, shaped like ``images``; required when
            ``config.threshold`` is ``None``, otherwise used only to report the achieved false-flag rate.
        out_dir: When given, write ``attack.json`` and, under ``extractions/``, every verified extraction as
            ``<prompt_index>_<gen_index>.png``, each prompt's reference as ``<prompt_index>_reference.png`` and the
            manifest ``index.jsonl`` (one line per verified generation, sorted keys, paths relative to it).
        progress: Show progress bars.

    Returns:
        The :class:`AttackResult`.

    Raises:
        DiffmemError: ``config.threshold`` is ``None`` and no calibration images were given.
        ValueError: Images of the wrong shape, or ``references`` / ``images`` not matching ``prompts``.
    """
    prompts = list(prompts)
    _check_inputs(prompts, config, calibration_images is not None, references)
    cal = _strengths(calibration_images, config, scorer, progress) if calibration_images is not None else []
    if calibration_images is not None and not cal:
        raise DiffmemError("calibration_images holds no prompts")
    threshold, calibration = _calibrate(cal, config)
    outcomes = []
    for i, imgs in enumerate(tqdm(images, desc="attack: score", total=len(prompts), disable=not progress)):
        if i >= len(prompts):
            raise ValueError(f"images holds more prompts than the {len(prompts)} prompts given")
        ref = None if references is None else references[i]
        outcomes.append(_attack_prompt(i, prompts[i], imgs, threshold, ref, config, scorer))
    if len(outcomes) != len(prompts):
        raise ValueError(f"images holds {len(outcomes)} prompts, but {len(prompts)} prompts were given")
    return _finish(outcomes, threshold, calibration, config, scorer, out_dir)


def _generations(pipe: Any, prompts: Sequence[str], config: ExtractionConfig) -> Iterator[np.ndarray]:
    """Each prompt's ``[N, H, W, 3]`` generations, made a few prompts per pipeline call while iterating."""
    n = config.num_generations
    per_call = max(1, config.batch_size // n)
    prompts = list(prompts)
    for start in range(0, len(prompts), per_call):
        yield from generate_images(pipe, prompts[start : start + per_call], num_seeds=n, seed=config.seed,
                                   batch_size=config.batch_size, progress=False, sampler=config.sampler)


def extraction_attack(
    pipe: Any,
    prompts: Sequence[str],
    config: ExtractionConfig,
    scorer: Scorer,
    *,
    references: Sequence[Any | None] | None = None,
    calibration_prompts: Sequence[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AttackResult:
    """Generate ``config.num_generations`` images per prompt with ``pipe`` and run the attack on them.

    Generation is streamed a few prompts at a time (about ``config.batch_size`` images per call), so memory does
    not grow with the number of prompts; under ``accelerate launch`` the prompts are sharded over processes and
    only the rows (and the verified generations) travel. Calibration prompts are generated and scored first.

    Args:
        pipe: A text-to-image pipeline that accepts ``latents=`` (see :func:`diffmem.sampling.generate_images`).
        prompts: Prompts to attack.
        config: Attack configuration.
        scorer: Similarity scorer; its ``threshold`` verifies extractions.
        references: One reference image or ``None`` per prompt.
        calibration_prompts: Non-memorized prompts to calibrate the threshold on (required when
            ``config.threshold`` is ``None``); keep them apart from ``prompts``.
        out_dir: Output folder, see :func:`extraction_attack_images`.
        progress: Show progress bars.

    Returns:
        The :class:`AttackResult`.
    """
    prompts = list(prompts)
    calibration_prompts = list(calibration_prompts or [])
    _check_inputs(prompts, config, bool(calibration_prompts), references)
    overlap = set(prompts) & set(calibration_prompts)
    if overlap:
        logger.warning("%d calibration prompts are also attacked; calibrate on separate prompts", len(overlap))
    cal = shard_map(lambda ps: _strengths(_generations(pipe, ps, config), config, scorer, False),
                    calibration_prompts)
    threshold, calibration = _calibrate(cal, config)

    def attack(indices: list[int]) -> list:
        gens = _generations(pipe, [prompts[i] for i in indices], config)
        bar = tqdm(gens, desc="attack", total=len(indices), disable=not progress)
        return [_attack_prompt(i, prompts[i], imgs, threshold, None if references is None else references[i],
                               config, scorer) for i, imgs in zip(indices, bar)]

    outcomes = shard_map(attack, list(range(len(prompts))))
    sampler = {**config.sampler.call_kwargs(pipe), "scheduler": type(getattr(pipe, "scheduler", None)).__name__}
    return _finish(outcomes, threshold, calibration, config, scorer, out_dir, sampler=sampler)
