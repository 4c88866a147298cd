"""Memorization detection without training data, behind a registry of detectors.

The default detector, ``wen`` (Wen et al., ICLR 2024), scores a prompt by the magnitude of the text-conditional
part of the denoiser's prediction, ``||pred(x_t, c) - pred(x_t, empty)||``, averaged over the first ``k`` denoiser
evaluations and ``n`` seeds. Memorized prompts pull the prediction hard towards one image, so their score is large.
``k = 1`` is the cheap mode: one denoiser call per prompt and seed.

Every detector is a config dataclass paired with a scoring function, registered by name
(:func:`register_detector`); :func:`detect` runs any of them and returns the same :class:`DetectionResult`, with
AUC and TPR at 1 % FPR when labels are given and the cost of the run (seconds, denoiser calls). The built-in
detectors besides ``wen`` live in :mod:`diffmem.detectors`: ``bright_ending`` (Chen et al., ICLR 2025: end-token
cross-attention at the last step, with a per-pixel mask), ``sharpness`` (Jeon et al., ICML 2025: the
Hessian-score product at the first step) and ``anisotropy`` (Asthana & Belagiannis, ICLR 2026: the first-step norm
plus the low-noise alignment of the guidance with the unconditional prediction, on pure noise).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import DiffmemConfig, SamplerConfig, require
from .errors import ConfigError, DiffmemError
from .metrics import roc_auc, threshold_mean_std, tpr_at_fpr
from .parallel import shard_map
from .recording.clock import SamplerClock, batch_rows, call_pipeline
from .sampling import image_size, initial_latents, latent_shape
from .targets import get_denoiser

logger = logging.getLogger(__name__)

__all__ = [
    "DetectConfig",
    "DetectorConfig",
    "DETECT_PRESETS",
    "noise_norm_scores",
    "detect",
    "DetectionResult",
    "DetectorOutput",
    "DetectorSpec",
    "flag_calibrated",
    "register_detector",
    "get_detector",
    "list_detectors",
    "detector_config",
    "DEFAULT_DETECTOR",
    "check_score_steps",
]


@dataclass
class DetectorConfig(DiffmemConfig):
    """The settings every detector shares; each detector's config subclasses it (and may change the defaults).

    Args:
        num_seeds: Initial noises per prompt (n); noise ``j`` of every prompt uses seed ``seed + j``, whatever the
            batching.
        seed: First seed.
        sampler: The sampler the pipeline runs with (the scored steps are taken from its schedule). Its guidance
            must be > 1: detectors compare the conditional and unconditional predictions.
        batch_size: Prompts per pipeline call (each call holds ``2 * batch_size * num_seeds`` rows).
    """

    num_seeds: int = 4
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    batch_size: int = 8

    def check(self) -> None:
        require(self.num_seeds >= 1, "num_seeds", self.num_seeds, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.sampler.guidance_scale > 1, "sampler.guidance_scale", self.sampler.guidance_scale,
                "detection needs > 1 (CFG)")

    def image_size(self, pipe: Any) -> tuple[int, int]:
        """``(height, width)`` of the generations: the sampler's, else the pipeline's default."""
        return image_size(pipe, self.sampler.height, self.sampler.width)

    def call_kwargs(self, pipe: Any, height: int, width: int) -> dict[str, Any]:
        """Arguments of the detector's pipeline calls besides the prompts and noise: the sampler's, the size, the
        ``num_seeds`` generations per prompt, and latents out (nothing is decoded)."""
        return {**self.sampler.call_kwargs(pipe), "height": height, "width": width,
                "num_images_per_prompt": self.num_seeds, "output_type": "latent"}


@dataclass
class DetectConfig(DetectorConfig):
    """How to compute the Wen et al. score (and the settings of :class:`DetectorConfig`).

    Args:
        score_steps: Leading denoiser evaluations to average over (k), at most ``sampler.num_inference_steps``; the
            sampler's guidance advances the latent between them. The default 5 was chosen by measurement
            (``benchmarks/bench_detect.py``, ``docs/faithfulness.md``): on the embedded memorizer AUC 0.999 at k = 5
            against 0.885 at k = 1, still 6x cheaper than generating and scoring images; 1 is the cheapest mode.
        per_prompt_seeds: Seed each prompt with its own index, as Wen et al.'s code does: prompt ``i`` draws its
            ``num_seeds`` noises from one generator seeded ``seed + i``.
        space: ``"model"`` compares the raw denoiser outputs (epsilon, v or flow velocity, as the model
            predicts); ``"epsilon"`` converts v-predictions to epsilon first. With a zero-terminal-SNR schedule the
            first step's epsilon carries no text signal, so ``"model"`` is the default.
        preset: Name of the preset these settings came from.
    """

    score_steps: int = 5
    per_prompt_seeds: bool = False
    space: str = "model"
    preset: str | None = None

    def check(self) -> None:
        super().check()
        check_score_steps(self.score_steps, self.sampler)
        require(self.space in ("model", "epsilon"), "space", self.space, "choose 'model' or 'epsilon'")

    @staticmethod
    def preset_sampler(name: str, sampler: SamplerConfig | None = None) -> SamplerConfig:
        """``sampler`` (default: ``SamplerConfig()``) with the sampler settings of preset ``name`` (``wen2024``: 50
        steps at guidance 7.5, no rescale); its size and scheduler stay."""
        require(name in DETECT_PRESETS, "preset", name, f"choose one of {', '.join(DETECT_PRESETS)}")
        return replace(sampler or SamplerConfig(), **DETECT_PRESETS[name].get("sampler", {}))

    @classmethod
    def from_preset(cls, name: str, sampler: SamplerConfig | None = None, **overrides: Any) -> DetectConfig:
        """Settings that reproduce a published procedure (``DETECT_PRESETS``), then ``overrides``.

        ``wen2024``: the noise-difference norm averaged over every sampler step, 50 DDIM-style steps at guidance
        7.5, and each prompt seeded with its own index.

        Args:
            name: The preset.
            sampler: The sampler to run it with (default: :meth:`preset_sampler`); a preset's ``score_steps`` of
                ``"all"`` follows its number of steps.
            **overrides: Other fields that replace the preset's.
        """
        require(name in DETECT_PRESETS, "preset", name, f"choose one of {', '.join(DETECT_PRESETS)}")
        sampler = sampler or cls.preset_sampler(name)
        settings = {k: v for k, v in DETECT_PRESETS[name].items() if k != "sampler"}
        settings.update(overrides)
        if settings.get("score_steps") == "all":
            settings["score_steps"] = sampler.num_inference_steps
        return cls(**settings, sampler=sampler, preset=name)


DETECT_PRESETS: dict[str, dict[str, Any]] = {
    "wen2024": {"score_steps": "all", "per_prompt_seeds": True, "num_seeds": 1,
                "sampler": {"num_inference_steps": 50, "guidance_scale": 7.5, "guidance_rescale": 0.0}},
}


def check_score_steps(score_steps: int, sampler: SamplerConfig) -> None:
    """Raise ``ConfigError`` unless ``score_steps`` lies in ``[1, sampler.num_inference_steps]``."""
    n = sampler.num_inference_steps
    require(1 <= score_steps <= n, "score_steps", score_steps, f"must be in [1, sampler.num_inference_steps={n}]")


def _batch_noise(pipe, prompt_index: list[int], config: Any, height: int, width: int) -> torch.Tensor:
    """Initial noise of every generation of the batch: ``num_seeds`` per prompt.

    Noise ``j`` of every prompt uses seed ``config.seed + j``; with ``config.per_prompt_seeds`` (a field only some
    detector configs have) prompt ``i`` draws its noises from one generator seeded ``config.seed + i``.
    """
    n = config.num_seeds
    if not getattr(config, "per_prompt_seeds", False):
        return initial_latents(pipe, [config.seed + j for _ in prompt_index for j in range(n)], height, width)
    shape = latent_shape(pipe, height, width)
    out = []
    for i in prompt_index:
        generator = torch.Generator().manual_seed(config.seed + i)
        out.append(torch.randn((n, *shape), generator=generator, dtype=torch.float32))
    return torch.cat(out)


def denoiser_prediction(output: Any, channels: int) -> Tensor:
    """The prediction in a denoiser's output (a tuple, an output class with ``sample``, or a tensor), cut to the
    latent's ``channels`` (PixArt's learned-sigma output carries a variance after them)."""
    pred = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
    return pred[:, :channels]


ScoreFn = Callable[[nn.Module, tuple, dict, Any], Tensor]
"""``score(module, args, kwargs, output)`` of one ``[uncond; cond]`` denoiser call: ``float64 [R]`` values of its
``R`` generations, on the CPU."""


@torch.no_grad()
def score_first_steps(pipe, prompts: list[str], config: Any, score: ScoreFn, *, desc: str = "detect",
                      progress: bool = True, first_index: int = 0) -> np.ndarray:
    """Average ``score`` over the first ``config.score_steps`` denoiser evaluations and the seeds of each prompt.

    The pipeline runs on batches of ``config.batch_size`` prompts with ``config.num_seeds`` generations each; a
    :class:`~diffmem.recording.clock.SamplerClock` (one step per denoiser call, ``[uncond; cond]`` batches of twice
    the generations) hands each of the first ``score_steps`` calls to ``score`` and stops the call after them.
    Denoiser calls that ``score`` makes itself are not counted.

    Args:
        pipe: A text-to-image pipeline with classifier-free guidance.
        prompts: Prompts to score.
        config: A :class:`DetectorConfig` with ``score_steps`` (and optionally ``per_prompt_seeds``).
        score: The value of one evaluation per generation (:data:`ScoreFn`).
        desc: Label of the progress bar.
        progress: Show a progress bar.
        first_index: Global index of ``prompts[0]`` (for per-prompt seeds when the prompts are a shard).

    Returns:
        ``float64 [len(prompts)]`` scores, in prompt order.
    """
    denoiser = get_denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    height, width = config.image_size(pipe)
    n = config.num_seeds
    out = np.zeros(len(prompts), dtype=np.float64)
    totals: list[Tensor] = []
    clock = SamplerClock(denoiser, steps=config.score_steps,
                         on_output=lambda *call: totals.append(score(*call)))
    with clock:
        for start in tqdm(range(0, len(prompts), config.batch_size), desc=desc, disable=not progress):
            batch = prompts[start : start + config.batch_size]
            index = [first_index + start + i for i in range(len(batch))]
            latents = _batch_noise(pipe, index, config, height, width).to(device, dtype)
            totals.clear()
            clock.start_batch(len(batch) * n, cfg=True)
            call_pipeline(pipe, {**config.call_kwargs(pipe, height, width), "prompt": batch, "latents": latents})
            if len(totals) < config.score_steps:
                raise DiffmemError(f"the pipeline ran {len(totals)} denoiser calls, fewer than score_steps="
                                   f"{config.score_steps}")
            total = torch.stack(totals).mean(0)
            out[start : start + len(batch)] = total.view(len(batch), n).mean(1).numpy()
    return out


def noise_norm_scores(pipe, prompts: list[str], config: DetectConfig | None = None, progress: bool = True,
                      *, first_index: int = 0) -> np.ndarray:
    """Wen et al.'s text-conditional prediction magnitude ``||pred(x_t, c) - pred(x_t, empty)||`` per prompt.

    The pipeline itself runs (any text-to-image pipeline with classifier-free guidance: Stable Diffusion, SDXL,
    PixArt, SD3, ...); :func:`score_first_steps` reads the ``[uncond; cond]`` prediction of the first
    ``score_steps`` evaluations and stops the call after the last one.

    Args:
        pipe: The pipeline to audit.
        prompts: Prompts to score.
        config: Detection settings.
        progress: Show a progress bar.
        first_index: Global index of ``prompts[0]`` (for per-prompt seeds when the prompts are a shard).

    Returns:
        ``float64 [len(prompts)]`` scores, in prompt order.
    """
    config = config or DetectConfig()
    channels = latent_shape(pipe, *config.image_size(pipe))[0]
    pred_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    def norm(module, args, kwargs, output) -> Tensor:
        pred_u, pred_c = denoiser_prediction(output, channels).float().chunk(2)
        diff = pred_c - pred_u
        if config.space == "epsilon" and pred_type == "v_prediction":
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            a = pipe.scheduler.alphas_cumprod.to(diff.device)[torch.as_tensor(t).long().flatten()[0]].float()
            diff = diff * a.sqrt()
        return diff.flatten(1).norm(dim=1).double().cpu()

    return score_first_steps(pipe, prompts, config, norm, desc="detect", progress=progress, first_index=first_index)


@dataclass
class DetectorOutput:
    """What a detector function returns for its prompts (a plain score array is accepted too).

    Args:
        scores: ``float64 [P]`` scores; larger means more likely memorized.
        maps: Optional ``float32 [P, H, W]`` per-pixel maps in [0, 1] at image size (e.g. Bright Ending's
            end-token attention).
        masks: Optional ``bool [P, H, W]`` per-pixel memorization masks at image size.
    """

    scores: np.ndarray
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None


@dataclass
class DetectionResult:
    """Scores and, with labels, the detection quality; the same table for every detector.

    Args:
        prompts: The scored prompts.
        scores: ``float64 [P]`` scores.
        labels: Ground truth (True = memorized), when given.
        auc: ROC AUC of the scores against the labels.
        tpr_at_1fpr: TPR at 1 % FPR.
        threshold: Calibrated flagging threshold.
        flagged: Prompts above the threshold.
        method: Registered name of the detector.
        cost: ``seconds`` (wall), ``cpu_seconds``, ``denoiser_calls`` and ``denoiser_rows`` of the scoring run
            (calibration excluded).
        maps: Per-pixel maps of detectors that make them (``float32 [P, H, W]``).
        masks: Per-pixel memorization masks of detectors that make them (``bool [P, H, W]``).
    """

    prompts: list[str]
    scores: np.ndarray
    labels: np.ndarray | None = None
    auc: float | None = None
    tpr_at_1fpr: float | None = None
    threshold: float | None = None
    flagged: np.ndarray | None = None
    method: str = "wen"
    cost: dict[str, float] = field(default_factory=dict)
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None

    def ranked(self) -> list[dict]:
        """Rows sorted by decreasing score."""
        order = np.argsort(-self.scores, kind="stable")
        rows = []
        for rank, i in enumerate(order):
            row = {"rank": rank + 1, "prompt": self.prompts[i], "score": float(self.scores[i])}
            if self.labels is not None:
                row["memorized"] = bool(self.labels[i])
            if self.flagged is not None:
                row["flagged"] = bool(self.flagged[i])
            if self.masks is not None:
                row["mask_fraction"] = float(self.masks[i].mean())
            rows.append(row)
        return rows

    def top(self, k: int) -> list[int]:
        """Indices of the ``k`` highest-scoring prompts, best first."""
        return [int(i) for i in np.argsort(-self.scores, kind="stable")[:k]]

    def summary(self) -> dict:
        return {
            "method": self.method,
            "num_prompts": len(self.prompts),
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1fpr,
            "threshold": self.threshold,
            "num_flagged": None if self.flagged is None else int(self.flagged.sum()),
            "cost": dict(self.cost),
        }


def flag_calibrated(scores: np.ndarray, reference_scores: np.ndarray, m: float = 3.0) -> tuple[np.ndarray, float]:
    """Flag scores above ``mean + m * std`` of scores of known non-memorized prompts.

    Returns:
        The boolean flags and the threshold.
    """
    thr = threshold_mean_std(reference_scores, m)
    return np.asarray(scores) > thr, thr


# ------------------------------------------------------------------------------------------------ the registry
DetectorFn = Callable[..., "np.ndarray | DetectorOutput"]


@dataclass(frozen=True)
class DetectorSpec:
    """A registered detector: its config dataclass, its scoring function and a one-line description.

    The function is called as ``fn(pipe, prompts, config, progress=..., first_index=...)`` and returns
    ``float64 [P]`` scores or a :class:`DetectorOutput`; ``first_index`` is the global index of ``prompts[0]``
    when the prompts are a shard.
    """

    name: str
    config_cls: type
    fn: DetectorFn
    description: str = ""


DEFAULT_DETECTOR = "wen"
"""The detector of ``diffmem detect`` and ``diffmem audit`` unless ``--method`` says otherwise (chosen by
``benchmarks/bench_detect.py``; see ``docs/faithfulness.md``)."""

_DETECTORS: dict[str, DetectorSpec] = {}
_BUILTIN_MODULES = ("diffmem.detectors.bright_ending", "diffmem.detectors.sharpness", "diffmem.detectors.anisotropy")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)  # each registers its detector on import


def register_detector(name: str, config_cls: type, fn: DetectorFn, description: str = "") -> DetectorSpec:
    """Register a detector under ``name``: a config dataclass and the function that scores prompts with it.

    Args:
        name: Registry name (``diffmem detect --method NAME``).
        config_cls: A dataclass whose instances configure ``fn``; it validates itself in ``__post_init__``. Each
            config class belongs to one detector, so :func:`detect` finds the detector from the config.
        fn: ``fn(pipe, prompts, config, progress=..., first_index=...)`` returning ``float64 [P]`` scores or a
            :class:`DetectorOutput`.
        description: One line for ``--help`` and reports.

    Returns:
        The registered :class:`DetectorSpec`.

    Raises:
        ValueError: ``name`` or ``config_cls`` is already registered to another detector.
    """
    if not isinstance(config_cls, type) or "__dataclass_fields__" not in vars(config_cls):
        raise ValueError(f"detector {name!r}: config_cls must be a dataclass, not {config_cls!r}")
    old = _DETECTORS.get(name)
    if old is not None and (old.config_cls is not config_cls or old.fn is not fn):
        raise ValueError(f"detector {name!r} is already registered")
    for other in _DETECTORS.values():
        if other.name != name and other.config_cls is config_cls:
            raise ValueError(f"{config_cls.__name__} already configures detector {other.name!r}")
    spec = DetectorSpec(name, config_cls, fn, description)
    _DETECTORS[name] = spec
    return spec


def list_detectors() -> list[str]:
    """Names of the registered detectors, the default first."""
    _load_builtins()
    return sorted(_DETECTORS, key=lambda n: (n != DEFAULT_DETECTOR, n))


def get_detector(name_or_config: str | object) -> DetectorSpec:
    """The registered detector of a name or of a config instance.

    Raises:
        ValueError: Nothing is registered under that name or for that config type.
    """
    _load_builtins()
    if isinstance(name_or_config, str):
        if name_or_config not in _DETECTORS:
            raise ValueError(f"detector {name_or_config!r} is unknown: choose one of {', '.join(list_detectors())}")
        return _DETECTORS[name_or_config]
    for spec in _DETECTORS.values():
        if type(name_or_config) is spec.config_cls:
            return spec
    raise ValueError(f"no detector is registered for {type(name_or_config).__name__}; use register_detector")


def detector_config(name: str, sampler: SamplerConfig | None = None, **settings: Any) -> Any:
    """Build the config of detector ``name`` from settings shared by all detectors.

    Settings the config has no field for, and ``None`` values, are left out, so one set of settings (``sampler``,
    ``num_seeds``, ``seed``, ``batch_size``, ``score_steps``, ...) configures any detector.

    Args:
        name: A registered detector.
        sampler: The sampler (default: the config's).
        **settings: Other settings; a sampler setting given here (``num_inference_steps``, ...) is an error.
    """
    loose = sorted(k for k, v in settings.items() if v is not None and k in {f.name for f in fields(SamplerConfig)})
    require(not loose, "settings", loose, "sampler settings travel in sampler=SamplerConfig(...)")
    cls = get_detector(name).config_cls
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in settings.items() if k in names and v is not None}
    return cls(**given) if sampler is None else cls(**given, sampler=sampler)


def _register_wen(pipe, prompts, config, progress=True, first_index=0):
    return noise_norm_scores(pipe, prompts, config, progress=progress, first_index=first_index)


register_detector("wen", DetectConfig, _register_wen,
                  "Wen et al. (ICLR 2024): text-conditional noise-prediction norm over the first k steps")


# ------------------------------------------------------------------------------------------------ running one
def _as_output(value: np.ndarray | DetectorOutput, count: int, name: str) -> DetectorOutput:
    out = value if isinstance(value, DetectorOutput) else DetectorOutput(np.asarray(value, dtype=np.float64))
    out.scores = np.asarray(out.scores, dtype=np.float64)
    if out.scores.shape != (count,):
        raise DiffmemError(f"detector {name!r} returned scores of shape {out.scores.shape} for {count} prompts")
    return out


def _sharded_run(pipe, prompts: list[str], config: Any, spec: DetectorSpec, progress: bool) -> DetectorOutput:
    """Run a detector with the prompts sharded over processes (one process: a plain call)."""
    def work(indices: list[int]) -> list[tuple]:
        if not indices:
            return []
        part = [prompts[i] for i in indices]
        res = _as_output(spec.fn(pipe, part, config, progress=progress, first_index=indices[0]), len(part),
                         spec.name)
        return [(float(res.scores[j]), None if res.maps is None else res.maps[j],
                 None if res.masks is None else res.masks[j]) for j in range(len(part))]

    rows = shard_map(work, list(range(len(prompts))))
    scores = np.asarray([r[0] for r in rows], dtype=np.float64)
    maps = np.stack([r[1] for r in rows]) if rows and rows[0][1] is not None else None
    masks = np.stack([r[2] for r in rows]) if rows and rows[0][2] is not None else None
    return DetectorOutput(scores, maps, masks)


def _sharded_scores(pipe, prompts: list[str], config: DetectConfig, progress: bool) -> np.ndarray:
    """:func:`noise_norm_scores` with the prompts sharded over processes (one process: a plain call)."""
    return _sharded_run(pipe, prompts, config, get_detector(config), progress).scores


class _CallCounter:
    """Counts denoiser calls and rows (an ``[uncond; cond]`` pair is two rows) with a scoped pre-hook."""

    def __init__(self, pipe) -> None:
        self.denoiser = get_denoiser(pipe)
        self.calls = 0
        self.rows = 0
        self._handle = None

    def _hook(self, module, args, kwargs) -> None:
        self.calls += 1
        self.rows += batch_rows(args, kwargs) or 0

    def __enter__(self) -> _CallCounter:
        self._handle = self.denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _total_cost(cost: dict[str, float]) -> dict[str, float]:
    """The cost of the whole run: summed over processes (CPU time, denoiser calls and rows), wall time the longest;
    every process gets the same totals."""
    from .parallel import distributed_state, gather_all

    state = distributed_state()
    if state.num_processes == 1:
        return cost
    parts = gather_all(cost, state)
    total = {k: round(sum(p[k] for p in parts), 4) for k in ("cpu_seconds", "denoiser_calls", "denoiser_rows")}
    return {"seconds": max(p["seconds"] for p in parts), **total}


def detect(pipe, prompts: list[str], config: Any = None, labels: list[bool] | None = None,
           calibration_prompts: list[str] | None = None, m: float = 3.0, progress: bool = True) -> DetectionResult:
    """Score prompts with any registered detector; report AUC/TPR@1%FPR with labels, or flag with calibration.

    Under ``accelerate launch`` the prompts are sharded over processes; every process returns the full result.

    Args:
        pipe: The pipeline to audit.
        prompts: Prompts to score.
        config: Settings of the detector to run: a :class:`DetectConfig` (``wen``, the default), a config of
            another registered detector (``detector_config(name, ...)``), or a registered name for its defaults.
        labels: Optional ground truth (True = memorized) for AUC and TPR at 1% FPR.
        calibration_prompts: Known non-memorized prompts (at least 2); flags prompts above ``mean + m * std``.
        m: Width of the calibrated threshold in standard deviations.
        progress: Show progress bars.

    Returns:
        A :class:`DetectionResult` with the detector's name and the cost of scoring ``prompts``.
    """
    if config is None:
        config = DetectConfig()
    elif isinstance(config, str):
        config = get_detector(config).config_cls()
    spec = get_detector(config)
    prompts = list(prompts)
    if labels is not None and len(labels) != len(prompts):
        raise ConfigError(f"labels has {len(labels)} entries for {len(prompts)} prompts")
    if calibration_prompts is not None and len(calibration_prompts) == 1:
        raise ConfigError("calibration needs at least 2 non-memorized prompts")
    wall, cpu = time.perf_counter(), time.process_time()
    with _CallCounter(pipe) as counter:
        out = _sharded_run(pipe, prompts, config, spec, progress)
    cost = _total_cost({"seconds": round(time.perf_counter() - wall, 4),
                        "cpu_seconds": round(time.process_time() - cpu, 4),
                        "denoiser_calls": counter.calls, "denoiser_rows": counter.rows})
    res = DetectionResult(prompts, out.scores, method=spec.name, cost=cost, maps=out.maps, masks=out.masks)
    if labels is not None:
        lab = np.asarray(labels, dtype=bool)
        res.labels = lab
        if lab.any() and (~lab).any():
            res.auc = roc_auc(res.scores, lab)
            res.tpr_at_1fpr = tpr_at_fpr(res.scores, lab, 0.01)
    if calibration_prompts:
        ref = _sharded_run(pipe, list(calibration_prompts), config, spec, progress).scores
        res.flagged, res.threshold = flag_calibrated(res.scores, ref, m)
    return res
