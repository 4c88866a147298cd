"""Re-extraction attack: optimise the conditioning of a frozen model until it replicates a known training image.

Finding DoRI (ICML 2026, arXiv 2507.16880) shows that pruning-based mitigations can hide memorization rather than
remove it. The attack keeps every weight frozen and moves only the conditioning tensor that the denoiser's
cross-attention consumes (the text encoder's output, plus the pooled embedding on SDXL/SD3), with Adam on the
model's own training loss toward the training image. Sampling with the optimised conditioning then shows whether
the image comes back. The same attack on images the model did not memorize is the control.

The attack runs on the pipeline as the caller left it: under a reversible edit (``with edit.apply(pipe):``) it
attacks the edited model. It never reloads, copies or changes weights. The model's side of the attack (its
conditioning, training objective and denoiser call) lives in :mod:`diffmem.objective`, the result in
:mod:`diffmem.reextraction_result`; both are re-exported here.

Example::

    scorer = get_scorer("ssim")
    items = [ReextractItem(prompt, reference_uint8, "memorized", i) for i, (prompt, reference_uint8) in ...]
    result = reextract(pipe, items, ReextractConfig(sampler=SamplerConfig(num_inference_steps=25)), scorer)
    result.summary()["memorization_rate"]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import objective
from .config import DiffmemConfig, SamplerConfig, require
from .errors import DiffmemError
from .objective import (
    DiffusionObjective,
    _frozen,
    _has_pooled,
    conditioning_loss,  # noqa: F401 - re-exported (objective.__all__)
    denoiser_call,
    encode_conditioning,  # noqa: F401 - re-exported (objective.__all__)
    encode_reference,
    initial_conditioning,
)
from .parallel import shard_map
from .reextraction_result import KINDS, ReextractResult
from .sampling import generate_images, image_size
from .score import Scorer
from .targets import get_denoiser

logger = logging.getLogger(__name__)

# The objective's names (from diffmem.objective) and the result's (from diffmem.reextraction_result) are re-exported.
__all__ = [
    "ReextractConfig",
    "ReextractItem",
    "ReextractResult",
    "OptimizedConditioning",
    "optimize_conditioning",
    "optimize_conditionings",
    *objective.__all__,
    "reextract",
    "KINDS",
    "DEFAULT_CHECKPOINTS",
]

DEFAULT_CHECKPOINTS = (0, 10, 25, 50)
"""Steps at which replication is measured by default (the paper's budget is 50 steps)."""

_PROMPT_OF = "prompt-of:"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class ReextractConfig(DiffmemConfig):
    """Settings of the re-extraction attack.

    Args:
        opt_steps: Adam steps on the conditioning.
        lr: Adam learning rate.
        batch: Noise and timestep draws per Adam step.
        init: Starting conditioning: ``"prompt"`` (the prompt's text-encoder output), ``"random"`` (random
            directions with the prompt embedding's per-token norms) or ``"prompt-of:OTHER TEXT"`` (another prompt's
            embedding).
        checkpoints: Optimisation steps at which replication is measured by sampling (0 = the starting point);
            the final step is always added. Steps of the default past a smaller ``opt_steps`` are dropped; steps
            given explicitly must lie in ``[0, opt_steps]``.
        num_seeds: Sampling seeds per row and checkpoint.
        sample_seed: First sampling seed (seeds ``sample_seed .. sample_seed + num_seeds - 1``); keep it apart from
            the seeds used anywhere else.
        seed: Seed of the optimisation's noise, timesteps and random start.
        threshold: Replication threshold on the scorer's similarity (``None``: the scorer's own).
        sampler: The sampler of the checkpoints' samples; its ``height``/``width`` also fix the optimisation's size.
        sample_batch_size: Images per pipeline call when sampling.
    """

    opt_steps: int = 50
    lr: float = 0.1
    batch: int = 8
    init: str = "prompt"
    checkpoints: tuple[int, ...] = DEFAULT_CHECKPOINTS
    num_seeds: int = 4
    sample_seed: int = 10_000
    seed: int = 0
    threshold: float | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    sample_batch_size: int = 64

    def check(self) -> None:
        require(_is_int(self.opt_steps) and self.opt_steps >= 1, "opt_steps", self.opt_steps,
                "must be an integer >= 1")
        require(not isinstance(self.lr, bool) and isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                and self.lr > 0, "lr", self.lr, "must be a finite number > 0")
        require(_is_int(self.batch) and self.batch >= 1, "batch", self.batch, "must be an integer >= 1")
        require(isinstance(self.init, str) and (
            self.init in ("prompt", "random")
            or (self.init.startswith(_PROMPT_OF) and bool(self.init[len(_PROMPT_OF) :].strip()))
        ), "init", self.init, "must be 'prompt', 'random' or 'prompt-of:OTHER TEXT'")
        require(not isinstance(self.checkpoints, (str, bytes)) and isinstance(self.checkpoints, Sequence),
                "checkpoints", self.checkpoints, "must be a sequence of integer steps")
        if tuple(self.checkpoints) == DEFAULT_CHECKPOINTS:
            self.checkpoints = tuple(s for s in DEFAULT_CHECKPOINTS if s <= self.opt_steps)
        bad = [s for s in self.checkpoints if not _is_int(s) or not 0 <= s <= self.opt_steps]
        require(not bad, "checkpoints", tuple(self.checkpoints),
                f"steps must be integers in [0, opt_steps={self.opt_steps}]")
        self.checkpoints = tuple(sorted({int(s) for s in self.checkpoints} | {int(self.opt_steps)}))
        for name, low in (("num_seeds", 1), ("sample_seed", 0), ("seed", 0), ("sample_batch_size", 1)):
            value = getattr(self, name)
            require(_is_int(value) and value >= low, name, value, f"must be an integer >= {low}")
        require(self.threshold is None or (
            not isinstance(self.threshold, bool) and isinstance(self.threshold, (int, float))
            and math.isfinite(self.threshold)
        ), "threshold", self.threshold, "must be a finite number or None")
        self.opt_steps, self.batch, self.num_seeds = int(self.opt_steps), int(self.batch), int(self.num_seeds)
        self.sample_seed, self.seed = int(self.sample_seed), int(self.seed)
        self.lr = float(self.lr)
        self.threshold = None if self.threshold is None else float(self.threshold)

    @property
    def init_prompt(self) -> str | None:
        """The other prompt of a ``"prompt-of:..."`` start, else ``None``."""
        return self.init[len(_PROMPT_OF) :].strip() if self.init.startswith(_PROMPT_OF) else None


@dataclass
class ReextractItem:
    """One target of the attack.

    Args:
        prompt: The caption the image was trained with (the ``"prompt"`` start, and the statistics of ``"random"``).
        reference: The training image, uint8 ``[H, W, 3]`` at the pipeline's generation size.
        kind: ``"memorized"`` or ``"control"``.
        index: Where the row comes from (e.g. its manifest line), or ``None``.
    """

    prompt: str
    reference: np.ndarray
    kind: str
    index: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise DiffmemError(f"ReextractItem.prompt must be a string, got {type(self.prompt).__name__}")
        if self.kind not in KINDS:
            raise DiffmemError(f"ReextractItem.kind={self.kind!r} for {self.prompt!r}; expected one of {KINDS}")
        ref = self.reference
        if not isinstance(ref, np.ndarray) or ref.dtype != np.uint8 or ref.ndim != 3 or ref.shape[2] != 3:
            shape = getattr(ref, "shape", None)
            raise DiffmemError(
                f"ReextractItem.reference of {self.prompt!r} must be a uint8 [H, W, 3] array, got "
                f"{type(ref).__name__} {getattr(ref, 'dtype', '')} {tuple(shape) if shape is not None else ''}".rstrip()
            )

    @classmethod
    def from_manifest_entry(cls, entry: Any, index: int | None = None) -> ReextractItem:
        """Build an item from a manifest entry (``prompt``, ``memorized`` and ``reference`` attributes).

        Args:
            entry: A :class:`diffmem.data.ManifestEntry` or anything with the same attributes.
            index: Row index to record.

        Returns:
            The item; memorized entries become ``"memorized"`` rows, all others ``"control"`` rows.

        Raises:
            DiffmemError: The entry has no reference image, or it cannot be read.
        """
        from PIL import Image

        if getattr(entry, "reference", None) is None:
            raise DiffmemError(f"manifest entry {entry.prompt!r} has no reference image to re-extract")
        try:
            with Image.open(entry.reference) as img:
                ref = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except OSError as err:
            raise DiffmemError(f"cannot read reference {entry.reference}: {err}") from None
        kind = "memorized" if entry.memorized else "control"
        return cls(prompt=entry.prompt, reference=ref, kind=kind, index=index)


@dataclass
class OptimizedConditioning:
    """What :func:`optimize_conditioning` returns.

    Attributes:
        embeds: Optimisation step -> fp32 conditioning ``[1, L, D]`` on the CPU (step 0 is the start).
        loss_curve: Training loss at every Adam step (before that step's update).
        pooled: Step -> fp32 pooled embedding ``[1, D']`` on the CPU, when pooled embeddings were optimised.
        seconds: Wall time of the optimisation.
    """

    embeds: dict[int, torch.Tensor]
    loss_curve: list[float]
    pooled: dict[int, torch.Tensor] | None = None
    seconds: float = 0.0

    @property
    def final_step(self) -> int:
        """The last recorded step."""
        return max(self.embeds)


# ----------------------------------------------------------------------------------------------------------------
# Optimising the conditioning


def optimize_conditioning(
    pipe: Any,
    reference: np.ndarray,
    init_embeds: torch.Tensor,
    config: ReextractConfig,
    *,
    pooled: torch.Tensor | None = None,
    progress: bool = False,
) -> OptimizedConditioning:
    """Optimise a conditioning tensor of the frozen model toward a training image with its training loss.

    Every weight of the pipeline is frozen for the duration (``requires_grad`` and train/eval modes are restored
    afterwards); only the conditioning, and the pooled embedding when given, are optimised, with Adam in fp32.
    Each step draws ``config.batch`` fresh noises and uniform timesteps from a generator seeded with
    ``config.seed`` and takes the MSE between the denoiser's prediction and the scheduler's training target.

    Args:
        pipe: A diffusers pipeline (UNet or SD3 transformer), possibly under a caller's edit.
        reference: The training image, uint8 ``[H, W, 3]``.
        init_embeds: Starting conditioning, ``[1, L, D]`` or ``[L, D]``.
        config: Attack settings (``opt_steps``, ``lr``, ``batch``, ``seed``, ``checkpoints``).
        pooled: Starting pooled embedding ``[1, D']`` (SDXL, SD3), or ``None``.
        progress: Show a progress bar over steps.

    Returns:
        The conditioning at each checkpoint step, the loss curve and the pooled embeddings.

    Raises:
        DiffmemError: Unsupported denoiser or scheduler, a missing pooled embedding, or an unusable reference.
    """
    if init_embeds.ndim == 2:
        init_embeds = init_embeds[None]
    if init_embeds.ndim != 3 or init_embeds.shape[0] != 1:
        raise DiffmemError(f"init_embeds must be [1, L, D] (one conditioning), got {tuple(init_embeds.shape)}")
    if pooled is not None and pooled.ndim == 1:
        pooled = pooled[None]
    return optimize_conditionings(pipe, [reference], init_embeds, config, pooled=pooled, progress=progress)[0]


def optimize_conditionings(
    pipe: Any,
    references: Sequence[np.ndarray],
    init_embeds: torch.Tensor,
    config: ReextractConfig,
    *,
    pooled: torch.Tensor | None = None,
    progress: bool = False,
) -> list[OptimizedConditioning]:
    """:func:`optimize_conditioning` for several images at once, in one batched denoiser call per step.

    Row ``i`` has its own conditioning, its own generator (seeded ``config.seed``, as a lone run) and its own loss;
    the summed loss gives each conditioning exactly its own gradient and Adam works element-wise, so each row
    follows the trajectory of a separate run (up to float summation order) while the denoiser runs once per step.

    Args:
        pipe: The pipeline.
        references: ``N`` uint8 ``[H, W, 3]`` training images (one size).
        init_embeds: Starting conditionings ``[N, L, D]``.
        config: Attack settings.
        pooled: Starting pooled embeddings ``[N, D']``, or ``None``.
        progress: Show a progress bar over steps.

    Returns:
        One :class:`OptimizedConditioning` per row (``seconds`` is the shared wall time divided by ``N``).
    """
    start = time.perf_counter()
    denoiser = get_denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    n = len(references)
    if init_embeds.ndim != 3 or init_embeds.shape[0] != n:
        raise DiffmemError(f"init_embeds must be [{n}, L, D] (one conditioning per image), got {tuple(init_embeds.shape)}")
    if pooled is None and _has_pooled(pipe):
        raise DiffmemError(f"{type(denoiser).__name__} needs a pooled embedding; pass pooled=")
    height, width = references[0].shape[:2]
    predict = denoiser_call(pipe, height, width)
    objective = DiffusionObjective(pipe)
    x0 = torch.cat([encode_reference(pipe, r) for r in references]).to(device)

    cond = init_embeds.detach().to(device, torch.float32).clone().requires_grad_(True)
    leaves = [cond]
    pool = None
    if pooled is not None:
        pool = pooled.detach().to(device, torch.float32).clone().requires_grad_(True)
        leaves.append(pool)
    opt = torch.optim.Adam(leaves, lr=config.lr)
    generators = [torch.Generator().manual_seed(config.seed) for _ in range(n)]
    wanted = set(config.checkpoints) | {0, config.opt_steps}  # the start is kept for the distance moved
    embeds: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
    pools: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
    losses: list[list[float]] = [[] for _ in range(n)]
    b = config.batch

    def keep(step: int) -> None:
        if step in wanted:
            for i in range(n):
                embeds[i][step] = cond[i : i + 1].detach().float().cpu().clone()
                if pool is not None:
                    pools[i][step] = pool[i : i + 1].detach().float().cpu().clone()

    keep(0)
    with _frozen(pipe), torch.enable_grad():
        for step in tqdm(range(1, config.opt_steps + 1), desc="optimise", disable=not progress, leave=False):
            draws = [objective.draw(x0[i : i + 1], b, generators[i]) for i in range(n)]
            noisy, t, target = (torch.cat(parts) for parts in zip(*draws))
            c = cond.to(dtype).repeat_interleave(b, dim=0)
            p = None if pool is None else pool.to(dtype).repeat_interleave(b, dim=0)
            pred = predict(noisy.to(dtype), t, c, p)
            per_row = (pred.float() - target).pow(2).reshape(n, -1).mean(dim=1)
            if not bool(torch.isfinite(per_row).all()):
                raise DiffmemError(f"re-extraction loss is not finite at step {step}; lower ReextractConfig.lr")
            opt.zero_grad(set_to_none=True)
            per_row.sum().backward()
            opt.step()
            for i, value in enumerate(per_row.detach().cpu().tolist()):
                losses[i].append(value)
            keep(step)
    seconds = (time.perf_counter() - start) / max(n, 1)
    return [
        OptimizedConditioning(embeds=embeds[i], loss_curve=losses[i], pooled=pools[i] if pool is not None else None,
                              seconds=seconds)
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------------------------
# The attack over many rows


_ROWS_PER_CALL = 64  # denoiser rows per optimisation step when several images are attacked together


def _attack_rows(
    pipe: Any, items: list[ReextractItem], init_embeds: torch.Tensor, init_pooled: torch.Tensor | None,
    config: ReextractConfig, scorer: Scorer, threshold: float, keep_images: bool, progress: bool,
) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor | None, np.ndarray | None]]:
    """Optimise, sample and score some rows (one process's shard): ``(row, final, final pooled, images)`` each."""
    steps = list(config.checkpoints)
    out: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor | None, np.ndarray | None]] = []

    traces: list[OptimizedConditioning] = []
    per_call = max(1, _ROWS_PER_CALL // config.batch)
    for lo in tqdm(range(0, len(items), per_call), desc="re-extract", disable=not progress):
        hi = min(lo + per_call, len(items))
        traces += optimize_conditionings(
            pipe, [it.reference for it in items[lo:hi]], init_embeds[lo:hi], config,
            pooled=None if init_pooled is None else init_pooled[lo:hi],
        )
    for i, (item, trace) in enumerate(zip(items, traces)):
        logger.debug("re-extract %d/%d %r (%s): loss %.4f -> %.4f", i + 1, len(items), item.prompt, item.kind,
                     trace.loss_curve[0], trace.loss_curve[-1])

    embeds = torch.cat([t.embeds[s] for t in traces for s in steps])
    pooled = torch.cat([t.pooled[s] for t in traces for s in steps]) if init_pooled is not None else None
    gens = generate_images(
        pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_seeds=config.num_seeds,
        seed=config.sample_seed, batch_size=config.sample_batch_size, progress=progress,
        desc="re-extract: sample", sampler=config.sampler,
    )
    gens = gens.reshape(len(items), len(steps), config.num_seeds, *gens.shape[2:])

    final = config.opt_steps
    for i, (item, trace) in enumerate(zip(items, traces)):
        flat = gens[i].reshape(-1, *gens.shape[3:])
        sim = scorer.similarity(flat, [item.reference])[:, 0].reshape(len(steps), config.num_seeds)
        by_step = {s: [float(v) for v in sim[k]] for k, s in enumerate(steps)}
        y0, y = trace.embeds[0], trace.embeds[final]
        dist = float((y - y0).norm())
        row = {
            "prompt": item.prompt,
            "kind": item.kind,
            "index": item.index,
            "init": config.init,
            "success": [v >= threshold for v in by_step[final]],
            "similarity": by_step[final],
            "max_similarity": max(by_step[final]),
            "mean_similarity": float(np.mean(by_step[final])),
            "rate_at_steps": {s: float(np.mean([v >= threshold for v in vals])) for s, vals in by_step.items()},
            "similarity_at_steps": by_step,
            "loss_curve": trace.loss_curve,
            "embed_distance": dist,
            "embed_distance_relative": dist / max(float(y0.norm()), 1e-12),
            "optimize_seconds": trace.seconds,
        }
        out.append((row, y, trace.pooled[final] if trace.pooled is not None else None,
                    gens[i] if keep_images else None))
    return out


def reextract(
    pipe: Any,
    items: Sequence[ReextractItem],
    config: ReextractConfig,
    scorer: Scorer,
    *,
    progress: bool = True,
    keep_images: bool = False,
) -> ReextractResult:
    """Run the re-extraction attack on each item and measure replication at each checkpoint.

    For each item the conditioning starts as ``config.init`` says and is optimised with
    :func:`optimize_conditioning`; then ``config.num_seeds`` images per checkpoint are sampled with
    :func:`diffmem.sampling.generate_images` (seeds from ``config.sample_seed``; all rows and checkpoints batched
    together) and compared with the reference by ``scorer.similarity``. A sample replicates when its similarity is
    at least the threshold.

    Args:
        pipe: A diffusers text-to-image pipeline, possibly under a caller's edit (never reloaded or copied).
        items: The targets.
        config: Attack settings.
        scorer: A diffmem scorer, e.g. ``get_scorer("ssim")``.
        progress: Show progress bars.
        keep_images: Keep every sample in ``result.images``.

    Returns:
        A :class:`ReextractResult`. Each row holds ``prompt``, ``kind``, ``index``, ``init``, ``success`` and
        ``similarity`` (per seed, final step), ``max_similarity``, ``mean_similarity``, ``rate_at_steps``
        ({step: rate}), ``similarity_at_steps`` ({step: [per seed]}), ``loss_curve``, ``embed_distance``
        (Frobenius norm of final minus start), ``embed_distance_relative`` (over the start's norm) and
        ``optimize_seconds``.

    Raises:
        DiffmemError: A reference that does not have the generation size, or an unsupported pipeline.
    """
    start = time.perf_counter()
    items = list(items)
    threshold = float(scorer.threshold if config.threshold is None else config.threshold)
    height, width = image_size(pipe, config.sampler.height, config.sampler.width)
    for item in items:
        if not isinstance(item, ReextractItem):
            raise DiffmemError(f"reextract takes ReextractItem rows, got {type(item).__name__}")
        if item.reference.shape[:2] != (height, width):
            raise DiffmemError(
                f"reference of {item.prompt!r} is {item.reference.shape[1]}x{item.reference.shape[0]} px; the "
                f"pipeline generates {width}x{height} (resize it, or set the sampler's height/width)"
            )
    result = ReextractResult(rows=[], config=config, scorer=scorer.describe(), threshold=threshold)
    if not items:
        return result
    init_embeds, init_pooled = initial_conditioning(pipe, [it.prompt for it in items], config)
    outcomes = shard_map(
        lambda idx: _attack_rows(pipe, [items[i] for i in idx], init_embeds[idx],
                                 None if init_pooled is None else init_pooled[idx], config, scorer, threshold,
                                 keep_images, progress),
        list(range(len(items))),
    )
    for i, (row, final, final_pooled, images) in enumerate(outcomes):
        result.rows.append(row)
        result.adversarial_embeds[i] = final
        if final_pooled is not None:
            result.adversarial_pooled[i] = final_pooled
        if images is not None:
            result.images[i] = images
    result.seconds = time.perf_counter() - start
    summary = result.summary()
    logger.info("re-extraction: memorization rate %s, control rate %s over %d rows in %.1f s",
                summary["memorization_rate"], summary["control_rate"], len(items), result.seconds)
    return result
