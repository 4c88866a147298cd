"""Record FFN activation statistics of a diffusion denoiser with scoped forward hooks.

:class:`ActivationRecorder` registers, inside a ``with`` block only, a forward pre-hook on every target Linear
(it sees the FFN hidden activation, i.e. the GEGLU output, without recomputing it) and a pre-hook on the
denoiser that counts its calls (the step index) and stops the generation after the last recorded step.
:func:`record` runs a pipeline over a list of prompts in batches and returns the streamed statistics.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import RecordConfig
from .sampling import image_size, latent_shape, seed_noise
from .errors import DiffmemError
from .stats import HALVES, ActivationStats, prompts_sha256, row_moments
from .targets import find_targets, get_denoiser

logger = logging.getLogger(__name__)

__all__ = ["ActivationRecorder", "record"]

# Modules that currently carry recorder hooks; a second recorder on any of them is refused.
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _StopGeneration(Exception):
    """Raised by the denoiser pre-hook once every recorded step has run, to end the pipeline call early."""


def _batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Batch size of the denoiser input (``sample`` / ``hidden_states`` or the first tensor argument)."""
    for key in ("sample", "hidden_states"):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            return int(value.shape[0])
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _model_id(obj: Any) -> str | None:
    for holder in (obj, get_denoiser(obj)):
        config = getattr(holder, "config", None)
        name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
        if name:
            return str(name)
    return None


class ActivationRecorder:
    """Context manager that streams FFN input statistics of a pipeline's (or a bare denoiser's) target layers.

    Inside ``with recorder:`` every denoiser call is one step: call ``k`` (counted from the last
    :meth:`start_batch`) records at step ``k`` for ``k < config.record_steps``, and call ``record_steps`` raises
    an internal exception that :func:`record` catches, so the denoiser runs exactly ``record_steps`` times per
    batch. With classifier-free guidance the denoiser batch is ``[uncond; cond]`` and the halves are recorded
    apart; without it every row is ``"cond"``. Call :meth:`start_batch` before each pipeline call: it resets the
    step counter and tells the recorder how many generations the batch holds, so that CFG is detected from the
    denoiser's input (without it, CFG is assumed when ``config.guidance_scale > 1``).

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser module.
        config: Recording settings (``record_steps``, ``target``, ``signatures`` are used here).
        num_prompts: Number of prompts, needed for per-prompt signatures.
        stop_generation: Stop the pipeline after the last recorded step. When ``False`` (calling a bare
            denoiser yourself), further calls simply are not recorded.
        meta: Provenance stored in :attr:`stats`.

    Example:
        >>> rec = ActivationRecorder(denoiser, RecordConfig(num_inference_steps=2, record_steps=2))
        >>> with rec:
        ...     rec.start_batch(2)          # 2 generations; CFG inferred from the input batch (2 or 4 rows)
        ...     for t in timesteps:
        ...         denoiser(latents, t, encoder_hidden_states=emb)
        >>> rec.stats.act_norm(next(iter(rec.targets)))
    """

    def __init__(
        self,
        pipe_or_denoiser: Any,
        config: RecordConfig,
        *,
        num_prompts: int | None = None,
        stop_generation: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.denoiser = get_denoiser(pipe_or_denoiser)
        self.config = config
        self.targets = find_targets(self.denoiser, config.target)
        self.stop_generation = stop_generation
        if config.signatures and (num_prompts is None or num_prompts < 1):
            raise ValueError(f"num_prompts={num_prompts!r} is invalid: signatures need the number of prompts (>= 1)")
        self.num_prompts = num_prompts
        layers = {name: tuple(m.weight.shape) for name, m in self.targets.items()}
        base_meta = {"model_id": _model_id(pipe_or_denoiser), "denoiser": type(self.denoiser).__name__}
        base_meta["record_config"] = config.to_dict()
        base_meta.update(meta or {})
        self._stats = ActivationStats(layers, config.record_steps, meta=base_meta)
        self._stats.ensure_half("cond")
        # Pending sums of the current batch, kept on the activation's device and added to ``stats`` in one call
        # per layer and half (see :meth:`_flush`): layer -> [2 halves (uncond, cond), T, 3, N] fp32, the rows
        # behind them per half and step, and per-step views for the hooks' single in-place add.
        self._acc: dict[str, Tensor] = {}
        self._acc_rows: dict[str, list[list[int]]] = {}
        self._acc_views: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        n_sig = num_prompts if config.signatures and num_prompts else 0
        self._sig_sum: dict[str, Tensor] = {
            name: torch.zeros(n_sig, n_in, dtype=torch.float32) for name, (_, n_in) in layers.items() if n_sig
        }
        self._sig_count: dict[str, Tensor] = {name: torch.zeros(n_sig, dtype=torch.int64) for name in self._sig_sum}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._registered: list[nn.Module] = []
        self._rows: int | None = None
        self._cfg: bool | None = None
        self._prompt_index: Tensor | None = None
        self._calls = 0
        self._step: int | None = None
        self._uncond_rows = 0
        self._input_rows = 0

    @property
    def stats(self) -> ActivationStats:
        """The statistics recorded so far (pending sums of the running batch included)."""
        self._flush()
        return self._stats

    def _flush(self) -> None:
        """Add the pending per-batch sums into :attr:`stats` (one fused add per layer and half) and clear them."""
        if not self._acc:
            return
        for name, acc in self._acc.items():
            rows = self._acc_rows[name]
            for h, half in enumerate(HALVES):
                if not any(rows[h]):
                    continue
                self._stats.ensure_half(half)[name].add_steps_(rows[h], acc[h])
                rows[h] = [0] * len(rows[h])
            acc.zero_()

    def _accumulator(self, name: str, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-step views ``(both halves, cond half)`` of the layer's pending sums on ``x``'s device."""
        views = self._acc_views.get(name)
        if views is not None and self._acc[name].device == x.device:
            return views
        self._flush()
        steps = self._stats.steps
        acc = torch.zeros(2, steps, 3, x.shape[-1], dtype=torch.float32, device=x.device)
        self._acc[name] = acc
        self._acc_rows[name] = [[0] * steps, [0] * steps]
        views = ([acc[:, t] for t in range(steps)], [acc[1:, t] for t in range(steps)])
        self._acc_views[name] = views
        return views

    # -- batch bookkeeping -------------------------------------------------------------------------------------

    def start_batch(
        self,
        rows: int,
        *,
        cfg: bool | None = None,
        prompt_index: Sequence[int] | Tensor | None = None,
    ) -> None:
        """Declare the next generation batch and restart the step counter at 0.

        Args:
            rows: Number of generations ``B`` in the batch (the conditional rows).
            cfg: ``True``: the denoiser input has ``2B`` rows ``[uncond; cond]``; ``False``: ``B`` rows;
                ``None``: inferred at each call from the input's batch size.
            prompt_index: Prompt index of each of the ``B`` rows (for signatures).
        """
        if rows < 1:
            raise ValueError(f"rows={rows!r} is invalid: must be >= 1")
        if prompt_index is not None:
            index = torch.as_tensor(prompt_index, dtype=torch.int64).flatten()
            if index.numel() != rows:
                raise ValueError(f"prompt_index has {index.numel()} entries for rows={rows}")
            if self.num_prompts is not None and index.numel() and (index.min() < 0 or index.max() >= self.num_prompts):
                raise ValueError(f"prompt_index must lie in [0, {self.num_prompts})")
            self._prompt_index = index
        else:
            self._prompt_index = None
        self._flush()
        self._rows = rows
        self._cfg = cfg
        self._calls = 0
        self._step = None

    def set_step(self, step: int) -> None:
        """Make the next denoiser call record at ``step`` (for callers that drive the denoiser themselves).

        Args:
            step: Step index, ``>= 0``.
        """
        if step < 0:
            raise ValueError(f"step={step!r} is invalid: must be >= 0")
        self._calls = step

    @property
    def calls(self) -> int:
        """Denoiser calls recorded since the last :meth:`start_batch` (the next step index)."""
        return self._calls

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _uncond_split(self, n: int) -> int:
        """Number of leading unconditional rows in a denoiser input of ``n`` rows."""
        rows, cfg = self._rows, self._cfg
        if rows is None:
            cfg = self.config.do_cfg if cfg is None else cfg
            if cfg:
                if n % 2:
                    raise DiffmemError(f"classifier-free guidance expects an even denoiser batch, got {n} rows")
                return n // 2
            return 0
        if cfg is None:
            if n == 2 * rows:
                return rows
            if n == rows:
                return 0
        elif n == (2 * rows if cfg else rows):
            return rows if cfg else 0
        expected = {None: f"{rows} or {2 * rows}", True: str(2 * rows), False: str(rows)}[cfg]
        raise DiffmemError(f"denoiser got a batch of {n} rows, expected {expected} for {rows} generations")

    def _denoiser_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        step = self._calls
        if step >= self.config.record_steps:
            if self.stop_generation:
                raise _StopGeneration(step)
            self._step = None
            return None
        n = _batch_rows(args, kwargs)
        if n is None:
            raise DiffmemError(f"cannot find the batch size of the {type(module).__name__} input")
        self._uncond_rows = self._uncond_split(n)
        self._input_rows = n
        self._calls = step + 1
        self._step = step
        return None

    def _denoiser_post_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self._step = None
        return None

    def _make_target_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            step = self._step
            if step is None or not args or not isinstance(args[0], Tensor):
                return None
            self._observe(name, step, args[0].detach())
            return None

        return hook

    def _observe(self, name: str, step: int, x: Tensor) -> None:
        n_in = x.shape[-1]
        n = self._input_rows
        if x.shape[0] != n:
            if x.dim() < 3 or x.shape[0] % n:
                raise DiffmemError(f"layer {name} saw {x.shape[0]} rows but the denoiser batch has {n}")
        split = self._uncond_rows  # 0 (no CFG) or n // 2: the halves are the two equal leading blocks
        blocks = 2 if split else 1
        # both halves' moments in one reduction: [blocks, 3, N]
        moments = row_moments(x.reshape(blocks, -1, n_in))
        rows = x.numel() // (n_in * blocks)  # token rows per half
        # one finiteness check for both halves: the fp64 total of finite fp32 values cannot overflow
        if not math.isfinite(moments.sum(dtype=torch.float64).item()):
            self._non_finite(name, step, moments, rows)
        both, cond_only = self._accumulator(name, x)
        acc_rows = self._acc_rows[name]
        if split:
            both[step].add_(moments)
            acc_rows[0][step] += rows
        else:
            cond_only[step].add_(moments)
        acc_rows[1][step] += rows
        if self._sig_sum:
            if self._prompt_index is None:
                raise DiffmemError("signatures need the prompt of each row: call start_batch(..., prompt_index=...)")
            cond = x.reshape(n, -1, n_in)[split:]
            per_row = cond.float().sum(dim=1).cpu()
            self._sig_sum[name].index_add_(0, self._prompt_index, per_row)
            self._sig_count[name].index_add_(
                0, self._prompt_index, torch.full_like(self._prompt_index, cond.shape[1])
            )

    def _non_finite(self, name: str, step: int, moments: Tensor, rows: int) -> None:
        """Raise for the first half (uncond, then cond) with non-finite moments; finite halves before it count."""
        halves = HALVES if moments.shape[0] == 2 else HALVES[1:]
        for half, block in zip(halves, moments.cpu()):
            if not bool(torch.isfinite(block).all()):
                raise DiffmemError(f"non-finite activations (inf/NaN) in layer {name} at step {step} ({half} half)")
            self._stats.ensure_half(half)[name].add_at_(step, rows, block)
        # only reached if the fp64 total overflowed, which finite fp32 moments of realistic size cannot do
        raise DiffmemError(f"non-finite activations (inf/NaN) in layer {name} at step {step}")

    def _finalize_signatures(self) -> None:
        if not self._sig_sum:
            return
        self._stats.signatures = {
            name: total / self._sig_count[name].clamp_min(1).unsqueeze(1).float()
            for name, total in self._sig_sum.items()
        }

    # -- context manager -----------------------------------------------------------------------------------------

    def __enter__(self) -> ActivationRecorder:
        modules = [self.denoiser, *self.targets.values()]
        if any(m in _ACTIVE for m in modules) or self._handles:
            raise DiffmemError(
                f"an ActivationRecorder is already registered on this {type(self.denoiser).__name__}; "
                "exit it before starting another"
            )
        try:
            self._handles.append(
                self.denoiser.register_forward_pre_hook(self._denoiser_pre_hook, with_kwargs=True, prepend=True)
            )
            self._handles.append(
                self.denoiser.register_forward_hook(self._denoiser_post_hook, with_kwargs=True, always_call=True)
            )
            for name, module in self.targets.items():
                self._handles.append(module.register_forward_pre_hook(self._make_target_hook(name)))
        except BaseException:
            self._remove()
            raise
        for m in modules:
            _ACTIVE.add(m)
        self._registered = modules
        logger.debug("recording %d layers of %s", len(self.targets), type(self.denoiser).__name__)
        return self

    def _remove(self) -> None:
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles = []
            for m in self._registered:
                _ACTIVE.discard(m)
            self._registered = []
            self._step = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._remove()
        finally:
            self._flush()
            self._finalize_signatures()
        return None


def record(
    pipe: Any,
    prompts: Sequence[str],
    config: RecordConfig,
    *,
    stats: ActivationStats | None = None,
    progress: bool = True,
    model_id: str | None = None,
    pipe_kwargs: dict[str, Any] | None = None,
) -> ActivationStats:
    """Record FFN activation statistics of a text-to-image pipeline over prompts.

    Prompts run in batches of ``config.batch_size``, each with ``config.num_seeds`` generations whose initial
    latents come from seeds ``seed, seed + 1, ...`` (the same noise for every prompt, whatever the batching).
    Each call stops right after step ``record_steps - 1``; no image is decoded.

    Args:
        pipe: A diffusers text-to-image pipeline (Stable Diffusion, PixArt, SD3, ...).
        prompts: Prompts, in order.
        config: Recording settings.
        stats: Existing statistics (e.g. of earlier shards) to merge the new ones into.
        progress: Show a tqdm bar over batches.
        model_id: Model id for the metadata (default: the pipeline's ``_name_or_path``).
        pipe_kwargs: Extra keyword arguments for every pipeline call.

    Returns:
        The statistics (``stats`` itself when given), on the CPU.

    Raises:
        DiffmemError: The pipeline ran fewer denoiser calls than ``record_steps``, or activations were not finite.
    """
    if isinstance(pipe, nn.Module):
        raise TypeError("record() needs a pipeline; drive a bare denoiser with ActivationRecorder instead")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    from . import __version__

    denoiser = get_denoiser(pipe)
    height, width = image_size(pipe, config.height, config.width)
    device = getattr(pipe, "_execution_device", None) or next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    seeds = [config.seed + k for k in range(config.num_seeds)]
    noise = [seed_noise(latent_shape(pipe, height, width), s) for s in seeds]

    meta = {
        "model_id": model_id or _model_id(pipe),
        "prompts_sha256": prompts_sha256(prompts),
        "num_prompts": len(prompts),
        "diffmem_version": __version__,
    }
    recorder = ActivationRecorder(pipe, config, num_prompts=len(prompts), meta=meta)
    batches = range(0, len(prompts), config.batch_size)
    logger.info(
        "recording %d layers over %d prompts x %d seeds, %d of %d steps",
        len(recorder.targets), len(prompts), config.num_seeds, config.record_steps, config.num_inference_steps,
    )
    with recorder:
        for start in tqdm(batches, desc="record", unit="batch", disable=not progress):
            batch = prompts[start : start + config.batch_size]
            index = [start + i for i in range(len(batch)) for _ in seeds]
            latents = torch.cat([noise[k] for _ in batch for k in range(len(seeds))]).to(device, dtype)
            kwargs: dict[str, Any] = dict(
                prompt=batch,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                num_images_per_prompt=config.num_seeds,
                height=height,
                width=width,
                latents=latents,
                output_type="latent",
            )
            if config.negative_prompt is not None:
                kwargs["negative_prompt"] = [config.negative_prompt] * len(batch)
            kwargs.update(pipe_kwargs or {})
            recorder.start_batch(len(index), prompt_index=index)
            try:
                pipe(**kwargs)
            except _StopGeneration:
                pass
            if recorder.calls < config.record_steps:
                raise DiffmemError(
                    f"the pipeline called the denoiser {recorder.calls} times, fewer than "
                    f"record_steps={config.record_steps}"
                )
    new = recorder.stats
    if config.do_cfg and "uncond" not in new.halves:
        logger.info("guidance_scale=%s but the pipeline ran without CFG; only the cond half was recorded",
                    config.guidance_scale)
    if stats is None:
        return new
    return stats.merge_(new)
