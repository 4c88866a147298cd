"""Record FFN activation statistics of a diffusion denoiser with scoped hooks, indexed by sampler step.

:class:`ActivationRecorder` registers, inside a ``with`` block only, a forward pre-hook on every target Linear (it
sees the FFN hidden activation, i.e. the GEGLU output, without recomputing it) and a pre-hook on the denoiser that
assigns each call to a sampler step and a classifier-free-guidance half. Given a pipeline, it also wraps
``pipe.scheduler.step`` for the duration of the block: a sampler step ends when ``scheduler.step`` returns with the
scheduler in its first-order state, so a second-order scheduler (Heun, KDPM2), which calls the denoiser twice per
step, records both calls at the same step, and two calls of one scheduler step are the two CFG halves.
:func:`record` runs a pipeline over prompts (or precomputed prompt embeddings) in batches and returns the streamed
statistics.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import RecordConfig
from .errors import ConfigError, DiffmemError
from .sampling import image_size, latent_shape, pipeline_extras, seed_noise
from .stats import HALVES, ActivationStats, prompts_sha256, row_moments
from .targets import find_targets, get_denoiser, model_source

logger = logging.getLogger(__name__)

__all__ = ["ActivationRecorder", "record"]

# Modules that currently carry recorder hooks; a second recorder on any of them is refused.
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()

# How the rows of one denoiser call map to CFG halves.
_SPLIT = "split"  # 2B rows [uncond; cond] in one call
_UNCOND = "uncond"  # B rows, all unconditional (one of two separate calls)
_COND = "cond"  # B rows, all conditional (no CFG, or one of two separate calls)
_PENDING = "pending"  # B rows whose half is known once the scheduler step ends or a second call arrives

_MISSING = object()  # marks "the scheduler had no instance attribute ``step``"


class _StopGeneration(Exception):
    """Raised by the denoiser pre-hook once every recorded step has run, to end the pipeline call early."""


class _Pending(NamedTuple):
    """Moments of a call whose half is not known yet, kept per layer until the half is decided."""

    step: int
    rows: int
    moments: Tensor  # [1, 3, N]
    per_row: Tensor | None  # [B, N] per-row sums for signatures (CPU), or None
    tokens: int


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


def _timestep_of(args: tuple, kwargs: dict[str, Any]) -> float | None:
    """The timestep a denoiser call was given (``timestep`` / ``t`` keyword or UNet's second positional argument).

    Args:
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call.

    Returns:
        The first timestep value as a float, or ``None`` when the call has none that can be read.
    """
    value = kwargs.get("timestep", kwargs.get("t"))
    if value is None and len(args) > 1:
        value = args[1]
    if isinstance(value, Tensor):
        # a timestep is a scalar or one value per row; anything larger is some other argument
        return float(value.flatten()[0]) if value.dim() <= 1 and value.numel() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _tensor_sha256(tensor: Tensor) -> str:
    """Hex sha256 of a tensor's dtype, shape and bytes (the ``prompts_sha256`` of precomputed conditionings).

    Args:
        tensor: Any tensor; it is copied to the CPU.

    Returns:
        The hex digest.
    """
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}\n".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ActivationRecorder:
    """Context manager that streams FFN input statistics of a pipeline's (or a bare denoiser's) target layers.

    **Steps.** Recorded step ``k`` is the ``k``-th *sampler* step since the last :meth:`start_batch`, counted from
    the first step the pipeline actually runs (an image-to-image call with ``strength < 1`` starts part-way
    through the schedule; its first denoising step is step 0). When a scheduler is known (the pipeline's, or the
    ``scheduler`` argument), a sampler step ends when ``scheduler.step()`` returns with the scheduler in its
    first-order state (``state_in_first_order``, where the scheduler has one): a second-order scheduler such as
    Heun or KDPM2 calls the denoiser twice per step and both calls are recorded at the same step. Without a
    scheduler (a bare denoiser driven by hand) every denoiser call is one step, as :meth:`set_step` can override.
    Steps ``k < config.record_steps`` are recorded; the first call of step ``record_steps`` raises an internal
    exception that :func:`record` catches, so the generation stops right after the last recorded step has made all
    its denoiser calls (``stop_generation=False`` ignores later calls instead).

    **CFG halves.** With classifier-free guidance the halves are recorded apart; without it every row is
    ``"cond"``. A denoiser call of ``2B`` rows (``B`` generations, see :meth:`start_batch`) is ``[uncond; cond]``.
    Two calls of ``B`` rows within one scheduler step are the two halves run separately, in the order
    ``cfg_call_order`` (diffusers' convention: unconditional first); a single ``B``-row call is ``"cond"``. Any
    other layout within one scheduler step (three calls, mixed sizes, two calls at different timesteps) raises a
    one-line :class:`~diffmem.errors.DiffmemError`.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser module.
        config: Recording settings (``record_steps``, ``target``, ``signatures`` are used here).
        num_prompts: Number of prompts, needed for per-prompt signatures.
        stop_generation: Stop the pipeline after the last recorded step. When ``False`` (calling a bare
            denoiser yourself), further calls simply are not recorded.
        meta: Provenance stored in :attr:`stats`.
        scheduler: The scheduler whose ``step()`` calls end each sampler step; default: the pipeline's
            ``scheduler`` (followed if it is replaced between batches), none for a bare denoiser.
        cfg_call_order: Halves of two separate ``B``-row calls of one step, in call order.

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
        scheduler: Any | None = None,
        cfg_call_order: tuple[str, str] = ("uncond", "cond"),
    ) -> None:
        self.denoiser = get_denoiser(pipe_or_denoiser)
        self.config = config
        self.targets = find_targets(self.denoiser, config.target)
        self.stop_generation = stop_generation
        if config.signatures and (num_prompts is None or num_prompts < 1):
            raise ConfigError(f"num_prompts={num_prompts!r} is invalid: signatures need the number of prompts (>= 1)")
        if sorted(cfg_call_order) != sorted(HALVES) or len(cfg_call_order) != 2:
            raise ConfigError(f"cfg_call_order={cfg_call_order!r} is invalid: give ('uncond', 'cond') in some order")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler {type(scheduler).__name__} has no step() method")
        self.num_prompts = num_prompts
        self.cfg_call_order = (str(cfg_call_order[0]), str(cfg_call_order[1]))
        self._pipe = None if isinstance(pipe_or_denoiser, nn.Module) else pipe_or_denoiser
        self._scheduler_arg = scheduler
        layers = {name: tuple(m.weight.shape) for name, m in self.targets.items()}
        base_meta = {"model_id": model_source(pipe_or_denoiser), "denoiser": type(self.denoiser).__name__}
        if getattr(self._pipe, "scheduler", None) is not None:
            base_meta["scheduler"] = type(self._pipe.scheduler).__name__
        base_meta["record_config"] = config.to_dict()
        base_meta.update(meta or {})
        self._stats = ActivationStats(layers, config.record_steps, meta=base_meta)
        self._stats.ensure_half("cond")
        # Pending sums of the current batch, kept on the activation's device and added to ``stats`` in one call
        # per layer and half (see :meth:`_flush`): layer -> [2 halves (uncond, cond), T, 3, N] fp32, the rows
        # behind them per half and step, and per-step views for the hooks' single in-place add.
        self._acc: dict[str, Tensor] = {}
        self._acc_rows: dict[str, list[list[int]]] = {}
        self._acc_views: dict[str, dict[str, list[Tensor]]] = {}
        n_sig = num_prompts if config.signatures and num_prompts else 0
        self._sig_sum: dict[str, Tensor] = {
            name: torch.zeros(n_sig, n_in, dtype=torch.float32) for name, (_, n_in) in layers.items() if n_sig
        }
        self._sig_count: dict[str, Tensor] = {name: torch.zeros(n_sig, dtype=torch.int64) for name in self._sig_sum}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._registered: list[nn.Module] = []
        # the scheduler whose step() is wrapped while the block is active: (scheduler, wrapper, own attribute)
        self._scheduler: Any | None = None
        self._patch: tuple[Any, Callable[..., Any], Any] | None = None
        self._rows: int | None = None
        self._cfg: bool | None = None
        self._prompt_index: Tensor | None = None
        self._calls = 0
        self._bare_step = 0  # next step without a scheduler: one step per denoiser call
        self._step_base = 0  # with a scheduler: step = base + sampler steps completed since the last reset
        self._completed = 0
        self._steps_recorded = 0
        self._eval_sizes: list[int] = []  # batch sizes of the calls since the last scheduler.step()
        self._eval_timestep: float | None = None
        self._pending: dict[str, _Pending] = {}
        self._step: int | None = None
        self._layout = _COND
        self._input_rows = 0

    @property
    def stats(self) -> ActivationStats:
        """The statistics recorded so far (pending sums of the running batch included).

        A lone ``B``-row call whose CFG half is decided only when its scheduler step ends is added then.
        """
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

    def _accumulator(self, name: str, like: Tensor) -> dict[str, list[Tensor]]:
        """Per-step views of the layer's pending sums on ``like``'s device, by layout (split, uncond, cond)."""
        views = self._acc_views.get(name)
        if views is not None and self._acc[name].device == like.device:
            return views
        self._flush()
        steps = self._stats.steps
        acc = torch.zeros(2, steps, 3, like.shape[-1], dtype=torch.float32, device=like.device)
        self._acc[name] = acc
        self._acc_rows[name] = [[0] * steps, [0] * steps]
        views = {
            _SPLIT: [acc[:, t] for t in range(steps)],
            _UNCOND: [acc[:1, t] for t in range(steps)],
            _COND: [acc[1:, t] for t in range(steps)],
        }
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
            cfg: ``True``: the denoiser sees ``2B`` rows ``[uncond; cond]`` (or, with a scheduler, two ``B``-row
                calls per scheduler step); ``False``: ``B`` rows, all conditional; ``None``: inferred from the
                calls' batch sizes.
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
        else:
            index = None
        self._resolve_pending(_COND)  # a lone call whose scheduler step never ended: conditional
        self._prompt_index = index
        self._flush()
        if self._patch is not None:
            self._follow_pipeline_scheduler()
        self._rows = rows
        self._cfg = cfg
        self._calls = 0
        self._steps_recorded = 0
        self._restart_steps(0)

    def set_step(self, step: int) -> None:
        """Make the next denoiser call record at ``step`` (for callers that drive the denoiser themselves).

        With a scheduler, later steps count on from ``step`` as the scheduler completes them.

        Args:
            step: Step index, ``>= 0``.
        """
        if step < 0:
            raise ValueError(f"step={step!r} is invalid: must be >= 0")
        self._resolve_pending(_COND)
        self._restart_steps(step)

    def _restart_steps(self, step: int) -> None:
        self._bare_step = step
        self._step_base = step
        self._completed = 0
        self._eval_sizes = []
        self._eval_timestep = None
        self._step = None

    @property
    def calls(self) -> int:
        """Denoiser calls recorded since the last :meth:`start_batch`."""
        return self._calls

    @property
    def steps_recorded(self) -> int:
        """One more than the last step recorded since the last :meth:`start_batch` (0 when none was)."""
        return self._steps_recorded

    @property
    def counts_sampler_steps(self) -> bool:
        """Whether steps come from a scheduler's ``step()`` calls (``False``: one step per denoiser call)."""
        return self._patch is not None

    def _next_step(self) -> int:
        if self._patch is None:
            return self._bare_step
        return self._step_base + self._completed

    # -- CFG layout ------------------------------------------------------------------------------------------------

    def _uncond_split(self, n: int) -> int:
        """Number of leading unconditional rows in a single-call denoiser input of ``n`` rows."""
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

    def _classify(self, n: int, step: int, args: tuple, kwargs: dict[str, Any]) -> str:
        """The layout of a denoiser call of ``n`` rows at ``step`` (one of the ``_SPLIT`` ... constants)."""
        if self._patch is None:
            return _SPLIT if self._uncond_split(n) else _COND
        rows, cfg, sizes = self._rows, self._cfg, self._eval_sizes
        if rows is None:
            if sizes:
                raise DiffmemError(
                    f"the denoiser ran {len(sizes) + 1} times in one scheduler step (sampler step {step}); "
                    "call start_batch(rows) so that separate classifier-free-guidance calls can be told apart"
                )
            sizes.append(n)
            return _SPLIT if self._uncond_split(n) else _COND
        allowed = (rows,) if cfg is False else (2 * rows, rows)
        if n not in allowed:
            expected = " or ".join(str(a) for a in allowed)
            raise DiffmemError(f"denoiser got a batch of {n} rows, expected {expected} for {rows} generations")
        first, second = self.cfg_call_order
        timestep = _timestep_of(args, kwargs) if n == rows else None
        if not sizes:
            layout = _SPLIT if n == 2 * rows else {True: first, False: _COND, None: _PENDING}[cfg]
        elif sizes == [rows] and n == rows and cfg is not False:
            before = self._eval_timestep
            if before is not None and timestep is not None and before != timestep:
                raise DiffmemError(
                    f"the denoiser ran at timesteps {before:g} and {timestep:g} without a scheduler.step() between "
                    f"them (step {step}); drive the sampler through the pipeline's scheduler"
                )
            self._resolve_pending(first)
            layout = second
        else:
            raise DiffmemError(
                f"ambiguous classifier-free-guidance layout in sampler step {step}: denoiser batches of "
                f"{[*sizes, n]} rows for {rows} generations in one scheduler step "
                f"(expected one call of {2 * rows} or two of {rows})"
            )
        sizes.append(n)
        self._eval_timestep = timestep
        return layout

    def _end_evaluation(self, step_done: bool) -> None:
        """Called after each ``scheduler.step()``: decide a pending half and count a completed sampler step."""
        sizes = self._eval_sizes
        if self._pending:
            self._resolve_pending(_COND)
        elif self._cfg is True and self._rows is not None and sizes == [self._rows]:
            raise DiffmemError(
                f"cfg=True but sampler step {self._next_step()} ran a single denoiser call of {self._rows} rows; "
                f"expected one call of {2 * self._rows} or two of {self._rows}"
            )
        self._eval_sizes = []
        self._eval_timestep = None
        if step_done:
            self._completed += 1

    def _resolve_pending(self, layout: str) -> None:
        """Record the held call's moments under ``layout`` (``_UNCOND`` or ``_COND``)."""
        pending, self._pending = self._pending, {}
        for name, p in pending.items():
            self._add(name, p.step, layout, p.moments, p.rows, p.per_row, p.tokens)

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _denoiser_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        step = self._next_step()
        if step >= self.config.record_steps:
            if self.stop_generation:
                raise _StopGeneration(step)
            self._step = None
            return None
        n = _batch_rows(args, kwargs)
        if n is None:
            raise DiffmemError(f"cannot find the batch size of the {type(module).__name__} input")
        self._layout = self._classify(n, step, args, kwargs)
        self._input_rows = n
        self._calls += 1
        if self._patch is None:
            self._bare_step = step + 1
        self._steps_recorded = max(self._steps_recorded, step + 1)
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
        layout = self._layout
        blocks = 2 if layout == _SPLIT else 1  # a split batch's halves are its two equal leading blocks
        # both halves' moments in one reduction: [blocks, 3, N]
        moments = row_moments(x.reshape(blocks, -1, n_in))
        rows = x.numel() // (n_in * blocks)  # token rows per half
        # one finiteness check for both halves: the fp64 total of finite fp32 values cannot overflow
        if not math.isfinite(moments.sum(dtype=torch.float64).item()):
            self._non_finite(name, step, moments, rows, layout)
        per_row, tokens = None, 0
        if self._sig_sum and layout != _UNCOND:
            if self._prompt_index is None:
                raise DiffmemError("signatures need the prompt of each row: call start_batch(..., prompt_index=...)")
            split = n // 2 if layout == _SPLIT else 0
            cond = x.reshape(n, -1, n_in)[split:]
            per_row, tokens = cond.float().sum(dim=1).cpu(), int(cond.shape[1])
        if layout == _PENDING:
            self._pending[name] = _Pending(step, rows, moments, per_row, tokens)
            return
        self._add(name, step, layout, moments, rows, per_row, tokens)

    def _add(
        self, name: str, step: int, layout: str, moments: Tensor, rows: int, per_row: Tensor | None, tokens: int
    ) -> None:
        """Add one call's moments (``[blocks, 3, N]``) and signature sums to the layer's pending sums."""
        views = self._accumulator(name, moments)
        views[layout][step].add_(moments)
        acc_rows = self._acc_rows[name]
        if layout in (_SPLIT, _UNCOND):
            acc_rows[0][step] += rows
        if layout in (_SPLIT, _COND):
            acc_rows[1][step] += rows
        if per_row is not None and layout != _UNCOND:
            self._sig_sum[name].index_add_(0, self._prompt_index, per_row)
            self._sig_count[name].index_add_(0, self._prompt_index, torch.full_like(self._prompt_index, tokens))

    def _non_finite(self, name: str, step: int, moments: Tensor, rows: int, layout: str) -> None:
        """Raise for the first half (uncond, then cond) with non-finite moments; finite halves before it count."""
        if layout != _SPLIT:
            half = "uncond or cond" if layout == _PENDING else layout
            raise DiffmemError(f"non-finite activations (inf/NaN) in layer {name} at step {step} ({half} half)")
        for half, block in zip(HALVES, moments.cpu()):
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

    # -- the scheduler's step ------------------------------------------------------------------------------------

    def _current_scheduler(self) -> Any | None:
        if self._scheduler_arg is not None:
            return self._scheduler_arg
        scheduler = getattr(self._pipe, "scheduler", None) if self._pipe is not None else None
        return scheduler if callable(getattr(scheduler, "step", None)) else None

    def _patch_scheduler(self, scheduler: Any) -> None:
        """Wrap ``scheduler.step`` (an instance attribute, removed again by :meth:`_unpatch_scheduler`)."""
        original = scheduler.step
        own = vars(scheduler).get("step", _MISSING)

        @functools.wraps(original)  # keeps the signature that pipelines inspect for ``eta`` / ``generator``
        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self._end_evaluation(bool(getattr(scheduler, "state_in_first_order", True)))
            return out

        scheduler.step = step
        self._patch = (scheduler, step, own)
        self._scheduler = scheduler

    def _unpatch_scheduler(self) -> None:
        if self._patch is None:
            return
        scheduler, wrapper, own = self._patch
        self._patch = None
        self._scheduler = None
        if vars(scheduler).get("step") is not wrapper:
            logger.warning("%s.step was replaced while recording; leaving it as it is", type(scheduler).__name__)
        elif own is _MISSING:
            del scheduler.step
        else:
            scheduler.step = own

    def _follow_pipeline_scheduler(self) -> None:
        """Re-wrap when the pipeline's scheduler was replaced inside the ``with`` block."""
        current = self._current_scheduler()
        if current is not None and current is not self._scheduler:
            self._unpatch_scheduler()
            self._patch_scheduler(current)

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
            scheduler = self._current_scheduler()
            if scheduler is not None:
                self._patch_scheduler(scheduler)
        except BaseException:
            self._remove()
            raise
        for m in modules:
            _ACTIVE.add(m)
        self._registered = modules
        self._restart_steps(0)
        logger.debug(
            "recording %d layers of %s, steps from %s",
            len(self.targets),
            type(self.denoiser).__name__,
            f"{type(self._scheduler).__name__}.step()" if self._scheduler is not None else "denoiser calls",
        )
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
            self._unpatch_scheduler()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._remove()
        finally:
            if exc_type is None:
                self._resolve_pending(_COND)
            else:
                self._pending = {}  # a call interrupted before its half was known is not counted
            self._flush()
            self._finalize_signatures()
        return None


# -- record --------------------------------------------------------------------------------------------------------


def _named_parameters(pipe: Any) -> set[str]:
    """Names of the keyword arguments the pipeline's ``__call__`` declares (``**kwargs`` excluded)."""
    try:
        parameters = inspect.signature(pipe.__call__).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in kinds}


def _row_generator(seed: int, latents_given: bool) -> torch.Generator:
    """The CPU generator of one generation, for the random draws the pipeline makes itself.

    Args:
        seed: The generation's seed.
        latents_given: The initial noise comes from :func:`~diffmem.sampling.seed_noise` (seeded with ``seed``),
            so the generator (used for sampler noise only) gets a child seed that does not repeat that noise;
            otherwise it is seeded with ``seed`` and also draws the initial noise.

    Returns:
        A seeded ``torch.Generator`` on the CPU.
    """
    if not latents_given:
        return torch.Generator().manual_seed(int(seed))
    child = np.random.SeedSequence(int(seed) % 2**64, spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(child))


def _check_conditioning(
    prompts: Sequence[str] | None,
    prompt_embeds: Tensor | None,
    negative_prompt_embeds: Tensor | None,
    config: RecordConfig,
) -> tuple[list[str] | None, int, dict[str, Any]]:
    """Validate the prompts or embeddings given to :func:`record`.

    Returns:
        The prompts as a list (or ``None``), the number of conditionings ``P`` and their metadata.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise ConfigError("give exactly one of prompts or prompt_embeds")
    meta: dict[str, Any] = {}
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompts must be a non-empty list of strings")
        count = len(prompts)
        meta["prompts_sha256"] = prompts_sha256(prompts)
    else:
        if not isinstance(prompt_embeds, Tensor) or prompt_embeds.dim() != 3 or prompt_embeds.shape[0] < 1:
            shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, Tensor) else type(prompt_embeds).__name__
            raise ConfigError(f"prompt_embeds must be a [P, L, D] tensor with P >= 1, got {shape}")
        count = int(prompt_embeds.shape[0])
        meta["prompts_sha256"] = _tensor_sha256(prompt_embeds)
        meta["conditioning"] = "prompt_embeds"
    if negative_prompt_embeds is not None:
        if config.negative_prompt is not None:
            raise ConfigError("give config.negative_prompt or negative_prompt_embeds, not both")
        ok = isinstance(negative_prompt_embeds, Tensor) and negative_prompt_embeds.dim() == 3
        if not ok or int(negative_prompt_embeds.shape[0]) not in (1, count):
            shape = tuple(negative_prompt_embeds.shape) if isinstance(negative_prompt_embeds, Tensor) else None
            raise ConfigError(f"negative_prompt_embeds must be a [1 or {count}, L, D] tensor, got {shape}")
        meta["negative_prompt_embeds_sha256"] = _tensor_sha256(negative_prompt_embeds)
    return prompts, count, meta


def record(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    config: RecordConfig | None = None,
    *,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    stats: ActivationStats | None = None,
    progress: bool = True,
    model_id: str | None = None,
    pipe_kwargs: dict[str, Any] | None = None,
    cfg_call_order: tuple[str, str] = ("uncond", "cond"),
) -> ActivationStats:
    """Record FFN activation statistics of a text-to-image (or image-to-image) pipeline over prompts.

    Conditionings (prompts, or rows of ``prompt_embeds``) run in batches of ``config.batch_size``, each with
    ``config.num_seeds`` generations: generation ``j`` of every conditioning uses seed ``seed + j``, whatever the
    batching. When the pipeline takes ``latents``, its initial noise is :func:`~diffmem.sampling.seed_noise` of
    that seed; when it takes ``generator``, it gets one CPU generator per generation (seeded with the seed when the
    pipeline draws the initial noise itself, with a child seed otherwise), so that stochastic samplers (ancestral,
    SDE) are seeded too. A ``generator`` or ``latents`` in ``pipe_kwargs`` overrides these.

    Steps are sampler steps (see :class:`ActivationRecorder`), counted from the first step the pipeline runs.
    Each call stops right after step ``record_steps - 1`` has made all its denoiser calls; no image is decoded.
    For an image-to-image pipeline pass ``image`` (and ``strength``) in ``pipe_kwargs``: it runs only the last
    ``int(num_inference_steps * strength)`` steps of its schedule, so ``record_steps`` must not exceed that.

    Args:
        pipe: A diffusers pipeline (Stable Diffusion text-to-image or image-to-image, PixArt, SD3, ...).
        prompts: Prompts, in order; or ``None`` with ``prompt_embeds``.
        config: Recording settings.
        prompt_embeds: ``[P, L, D]`` precomputed conditionings (text-encoder outputs, e.g. adversarially
            optimised ones) used instead of prompts. ``meta["prompts_sha256"]`` is then the sha256 of the tensor
            (dtype, shape and bytes) and ``meta["conditioning"]`` is ``"prompt_embeds"``.
        negative_prompt_embeds: ``[1, L, D]`` or ``[P, L, D]`` conditioning of the unconditional half, instead of
            the pipeline's encoding of ``config.negative_prompt`` (or of the empty prompt).
        stats: Existing statistics (e.g. of earlier shards) to merge the new ones into.
        progress: Show a tqdm bar over batches.
        model_id: Model id for the metadata (default: the pipeline's ``_name_or_path``).
        pipe_kwargs: Extra keyword arguments for every pipeline call.
        cfg_call_order: For pipelines that run the two CFG halves as two denoiser calls per step: the halves in
            call order (diffusers' convention is unconditional first).

    Returns:
        The statistics (``stats`` itself when given), on the CPU.

    Raises:
        DiffmemError: The pipeline ran fewer sampler steps than ``record_steps``, the CFG batch layout was
            ambiguous, or activations were not finite.
    """
    if isinstance(pipe, nn.Module):
        raise TypeError("record() needs a pipeline; drive a bare denoiser with ActivationRecorder instead")
    if config is None:
        raise TypeError("record() needs a RecordConfig (config=...)")
    prompts, count, conditioning_meta = _check_conditioning(prompts, prompt_embeds, negative_prompt_embeds, config)
    from . import __version__

    denoiser = get_denoiser(pipe)
    accepted = _named_parameters(pipe)
    takes_latents = "latents" in accepted
    device = getattr(pipe, "_execution_device", None) or next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    seeds = [config.seed + k for k in range(config.num_seeds)]
    size: dict[str, int] = {}
    if takes_latents or "height" in accepted or "width" in accepted:
        height, width = image_size(pipe, config.height, config.width)
        size = {key: value for key, value in (("height", height), ("width", width)) if key in accepted}
    noise = [seed_noise(latent_shape(pipe, height, width), s) for s in seeds] if takes_latents else []
    if not takes_latents and "generator" not in accepted:
        logger.warning("%s takes neither latents nor generator: its noise is not seeded", type(pipe).__name__)

    meta = {
        "model_id": model_id or model_source(pipe),
        **conditioning_meta,
        "num_prompts": count,
        "diffmem_version": __version__,
    }
    recorder = ActivationRecorder(pipe, config, num_prompts=count, meta=meta, cfg_call_order=cfg_call_order)
    batches = range(0, count, config.batch_size)
    logger.info(
        "recording %d layers over %d %s x %d seeds, %d of %d sampler steps",
        len(recorder.targets), count, "prompts" if prompts is not None else "conditionings", config.num_seeds,
        config.record_steps, config.num_inference_steps,
    )
    with recorder:
        for start in tqdm(batches, desc="record", unit="batch", disable=not progress):
            batch = list(range(start, min(start + config.batch_size, count)))
            index = [i for i in batch for _ in seeds]
            kwargs: dict[str, Any] = dict(
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                num_images_per_prompt=config.num_seeds,
                output_type="latent",
                **size,
            )
            if prompts is not None:
                kwargs["prompt"] = [prompts[i] for i in batch]
            else:
                kwargs["prompt_embeds"] = prompt_embeds[batch[0] : batch[-1] + 1].to(device)
            if takes_latents:
                kwargs["latents"] = torch.cat([noise[k] for _ in batch for k in range(len(seeds))]).to(device, dtype)
            if "generator" in accepted:
                kwargs["generator"] = [_row_generator(s, takes_latents) for _ in batch for s in seeds]
            if config.negative_prompt is not None:
                kwargs["negative_prompt"] = [config.negative_prompt] * len(batch)
            if negative_prompt_embeds is not None:
                rows = negative_prompt_embeds
                rows = rows.expand(len(batch), -1, -1) if rows.shape[0] == 1 else rows[batch[0] : batch[-1] + 1]
                kwargs["negative_prompt_embeds"] = rows.to(device)
            kwargs.update(pipeline_extras(pipe))
            kwargs.update(pipe_kwargs or {})
            recorder.start_batch(len(index), prompt_index=index)
            try:
                pipe(**kwargs)
            except _StopGeneration:
                pass
            if recorder.steps_recorded < config.record_steps:
                strength = kwargs.get("strength")
                hint = f" (strength={strength} leaves fewer steps)" if strength is not None else ""
                raise DiffmemError(
                    f"the pipeline ran {recorder.steps_recorded} sampler steps, fewer than "
                    f"record_steps={config.record_steps}{hint}"
                )
    new = recorder.stats
    if config.do_cfg and "uncond" not in new.halves:
        logger.info("guidance_scale=%s but the pipeline ran without CFG; only the cond half was recorded",
                    config.guidance_scale)
    if stats is None:
        return new
    return stats.merge_(new)
