"""Stream FFN activation statistics of a diffusion denoiser through scoped hooks, indexed by sampler step.

:class:`ActivationRecorder` registers, inside a ``with`` block only, a forward pre-hook on every target Linear (it
sees the FFN hidden activation, i.e. the GEGLU output, without recomputing it) and runs a
:class:`~diffmem.recording.clock.SamplerClock`, which tells each layer hook the sampler step and the
classifier-free-guidance half of the running denoiser call.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..config import RecordConfig
from ..errors import ConfigError, DiffmemError
from ..stats import HALVES, ActivationStats, row_moments
from ..targets import find_targets, get_denoiser, model_source
from .clock import COND, PENDING, SPLIT, UNCOND, SamplerClock, remove_handles

logger = logging.getLogger(__name__)

__all__ = ["ActivationRecorder"]

# Modules that currently carry recorder hooks; a second recorder on any of them is refused.
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _Pending(NamedTuple):
    """Moments of a call whose half is not known yet, kept per layer until the half is decided."""

    step: int
    rows: int
    moments: Tensor  # [1, 3, N]
    per_row: Tensor | None  # [B, N] per-row sums for signatures (CPU), or None
    tokens: int


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
    exception that :func:`~diffmem.recording.record` catches, so the generation stops right after the last
    recorded step has made all its denoiser calls (``stop_generation=False`` ignores later calls instead). The
    bookkeeping is a :class:`~diffmem.recording.clock.SamplerClock`.

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
        >>> rec = ActivationRecorder(denoiser, RecordConfig(SamplerConfig(num_inference_steps=2), record_steps=2))
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
        if config.signatures and (num_prompts is None or num_prompts < 1):
            raise ConfigError(f"num_prompts={num_prompts!r} is invalid: signatures need the number of prompts (>= 1)")
        self.num_prompts = num_prompts
        self.clock = SamplerClock(
            pipe_or_denoiser,
            steps=config.record_steps,
            do_cfg=config.do_cfg,
            stop=stop_generation,
            scheduler=scheduler,
            cfg_call_order=cfg_call_order,
            on_half=self._resolve_pending,
        )
        layers = {name: tuple(m.weight.shape) for name, m in self.targets.items()}
        base_meta = {"model_id": model_source(pipe_or_denoiser), "denoiser": type(self.denoiser).__name__}
        pipe = None if isinstance(pipe_or_denoiser, nn.Module) else pipe_or_denoiser
        if getattr(pipe, "scheduler", None) is not None:
            base_meta["scheduler"] = type(pipe.scheduler).__name__
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
        self._prompt_index: Tensor | None = None
        self._pending: dict[str, _Pending] = {}

    @property
    def stats(self) -> ActivationStats:
        """The statistics recorded so far (pending sums of the running batch included).

        A lone ``B``-row call whose CFG half is decided only when its scheduler step ends is added then.
        """
        self._flush()
        return self._stats

    @property
    def stop_generation(self) -> bool:
        """Whether the pipeline is stopped after the last recorded step."""
        return self.clock.stop

    @property
    def cfg_call_order(self) -> tuple[str, str]:
        """Halves of two separate ``B``-row calls of one step, in call order."""
        return self.clock.cfg_call_order

    @property
    def calls(self) -> int:
        """Denoiser calls recorded since the last :meth:`start_batch`."""
        return self.clock.calls

    @property
    def steps_recorded(self) -> int:
        """One more than the last step recorded since the last :meth:`start_batch` (0 when none was)."""
        return self.clock.steps_recorded

    @property
    def counts_sampler_steps(self) -> bool:
        """Whether steps come from a scheduler's ``step()`` calls (``False``: one step per denoiser call)."""
        return self.clock.counts_sampler_steps

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
            SPLIT: [acc[:, t] for t in range(steps)],
            UNCOND: [acc[:1, t] for t in range(steps)],
            COND: [acc[1:, t] for t in range(steps)],
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
        self.clock.resolve_pending(COND)  # a lone call whose scheduler step never ended: conditional
        self._prompt_index = index
        self._flush()
        self.clock.start_batch(rows, cfg=cfg)

    def set_step(self, step: int) -> None:
        """Make the next denoiser call record at ``step`` (for callers that drive the denoiser themselves).

        With a scheduler, later steps count on from ``step`` as the scheduler completes them.

        Args:
            step: Step index, ``>= 0``.
        """
        self.clock.set_step(step)

    def _resolve_pending(self, layout: str) -> None:
        """Record the held call's moments under ``layout`` (``UNCOND`` or ``COND``)."""
        pending, self._pending = self._pending, {}
        for name, p in pending.items():
            self._add(name, p.step, layout, p.moments, p.rows, p.per_row, p.tokens)

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _make_target_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            step = self.clock.step
            if step is None or not args or not isinstance(args[0], Tensor):
                return None
            self._observe(name, step, args[0].detach())
            return None

        return hook

    def _observe(self, name: str, step: int, x: Tensor) -> None:
        n_in = x.shape[-1]
        n = self.clock.input_rows
        if x.shape[0] != n:
            if x.dim() < 3 or x.shape[0] % n:
                raise DiffmemError(f"layer {name} saw {x.shape[0]} rows but the denoiser batch has {n}")
        layout = self.clock.layout
        blocks = 2 if layout == SPLIT else 1  # a split batch's halves are its two equal leading blocks
        # both halves' moments in one reduction: [blocks, 3, N]
        moments = row_moments(x.reshape(blocks, -1, n_in))
        rows = x.numel() // (n_in * blocks)  # token rows per half
        # one finiteness check for both halves: the fp64 total of finite fp32 values cannot overflow
        if not math.isfinite(moments.sum(dtype=torch.float64).item()):
            self._non_finite(name, step, moments, rows, layout)
        per_row, tokens = None, 0
        if self._sig_sum and layout != UNCOND:
            if self._prompt_index is None:
                raise DiffmemError("signatures need the prompt of each row: call start_batch(..., prompt_index=...)")
            split = n // 2 if layout == SPLIT else 0
            cond = x.reshape(n, -1, n_in)[split:]
            per_row, tokens = cond.float().sum(dim=1).cpu(), int(cond.shape[1])
        if layout == PENDING:
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
        if layout in (SPLIT, UNCOND):
            acc_rows[0][step] += rows
        if layout in (SPLIT, COND):
            acc_rows[1][step] += rows
        if per_row is not None and layout != UNCOND:
            self._sig_sum[name].index_add_(0, self._prompt_index, per_row)
            self._sig_count[name].index_add_(0, self._prompt_index, torch.full_like(self._prompt_index, tokens))

    def _non_finite(self, name: str, step: int, moments: Tensor, rows: int, layout: str) -> None:
        """Raise for the first half (uncond, then cond) with non-finite moments; finite halves before it count."""
        if layout != SPLIT:
            half = "uncond or cond" if layout == PENDING else layout
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

    # -- context manager -----------------------------------------------------------------------------------------

    def __enter__(self) -> ActivationRecorder:
        modules = [self.denoiser, *self.targets.values()]
        if any(m in _ACTIVE for m in modules) or self._handles:
            raise DiffmemError(
                f"an ActivationRecorder is already registered on this {type(self.denoiser).__name__}; "
                "exit it before starting another"
            )
        self.clock.__enter__()
        try:
            for name, module in self.targets.items():
                self._handles.append(module.register_forward_pre_hook(self._make_target_hook(name)))
        except BaseException as err:
            try:
                self._remove()
            finally:
                self.clock.__exit__(type(err), err, err.__traceback__)
            raise
        for m in modules:
            _ACTIVE.add(m)
        self._registered = modules
        logger.debug(
            "recording %d layers of %s, steps from %s",
            len(self.targets),
            type(self.denoiser).__name__,
            f"{type(self.clock.scheduler).__name__}.step()" if self.clock.scheduler is not None else "denoiser calls",
        )
        return self

    def _remove(self) -> None:
        try:
            remove_handles(self._handles)
        finally:
            self._handles = []
            for m in self._registered:
                _ACTIVE.discard(m)
            self._registered = []

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._remove()
        finally:
            try:
                self.clock.__exit__(exc_type, exc, tb)  # adds a pending call under "cond" unless the block raised
            finally:
                if exc_type is not None:
                    self._pending = {}  # a call interrupted before its half was known is not counted
                self._flush()
                self._finalize_signatures()
        return None
