"""The sampler clock: which denoiser call belongs to which sampler step and which classifier-free-guidance half.

:class:`SamplerClock` registers, inside a ``with`` block only, a pre-hook on the denoiser that assigns each call to a
sampler step and a CFG layout, and stops the pipeline call (:class:`StopGeneration`) at the first call past the last
step it counts. Given a pipeline (or a scheduler), it also wraps ``scheduler.step`` for the duration of the block: a
sampler step ends when ``scheduler.step`` returns with the scheduler in its first-order state, so a second-order
scheduler (Heun, KDPM2), which calls the denoiser twice per step, has both calls at the same step, and two calls of
one scheduler step are the two CFG halves. Without a scheduler every denoiser call is one step.

:class:`~diffmem.recording.ActivationRecorder` reads the clock in its layer hooks; the training-free detectors
(:mod:`diffmem.detection`) use it to score the first denoiser evaluations and stop the pipeline after them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DiffmemError
from ..stats import HALVES
from ..targets import get_denoiser

logger = logging.getLogger(__name__)

__all__ = ["SamplerClock", "StopGeneration", "call_pipeline", "batch_rows", "SPLIT", "UNCOND", "COND", "PENDING"]

# How the rows of one denoiser call map to CFG halves.
SPLIT = "split"  # 2B rows [uncond; cond] in one call
UNCOND = "uncond"  # B rows, all unconditional (one of two separate calls)
COND = "cond"  # B rows, all conditional (no CFG, or one of two separate calls)
PENDING = "pending"  # B rows whose half is known once the scheduler step ends or a second call arrives

_MISSING = object()  # marks "the scheduler had no instance attribute ``step``"


class StopGeneration(Exception):
    """Raised by the clock's denoiser pre-hook once every counted step has run, to end the pipeline call early."""


def call_pipeline(pipe: Any, kwargs: dict[str, Any]) -> None:
    """Call ``pipe(**kwargs)``; a :class:`StopGeneration` from a clock ends the call early and is not an error.

    Args:
        pipe: A diffusers pipeline.
        kwargs: Its call arguments.
    """
    try:
        pipe(**kwargs)
    except StopGeneration:
        pass


def batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
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


class SamplerClock:
    """Context manager that assigns each denoiser call to a sampler step and a CFG layout, and stops the sampler.

    **Steps.** Step ``k`` is the ``k``-th *sampler* step since the last :meth:`start_batch`, counted from the first
    step the pipeline actually runs. When a scheduler is known (the pipeline's, or the ``scheduler`` argument), a
    sampler step ends when ``scheduler.step()`` returns with the scheduler in its first-order state
    (``state_in_first_order``, where the scheduler has one). Without a scheduler (a bare denoiser) every denoiser
    call is one step, as :meth:`set_step` can override. Steps ``k < steps`` are counted; the first call of step
    ``steps`` raises :class:`StopGeneration` (caught by :func:`call_pipeline`), or with ``stop=False`` is ignored. A
    denoiser call made while another is running (e.g. a Jacobian-vector product taken in ``on_output``) belongs to
    the running call and is not counted.

    **CFG layout.** A call of ``2B`` rows (``B`` generations, see :meth:`start_batch`) is :data:`SPLIT`,
    ``[uncond; cond]``. Two calls of ``B`` rows within one scheduler step are the two halves run separately, in the
    order ``cfg_call_order``; a single ``B``-row call is :data:`COND`. A lone ``B``-row call whose half is known only
    when its scheduler step ends is :data:`PENDING` until ``on_half`` is told its half. Any other layout within one
    scheduler step raises a one-line :class:`~diffmem.errors.DiffmemError`.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser module (a bare module has no scheduler).
        steps: Number of leading steps counted.
        do_cfg: Whether calls have CFG halves when :meth:`start_batch` has not declared the batch.
        stop: Stop the pipeline at the first call past the last counted step.
        scheduler: The scheduler whose ``step()`` calls end each sampler step; default: the pipeline's
            ``scheduler`` (followed if it is replaced between batches), none for a bare denoiser.
        cfg_call_order: Halves of two separate ``B``-row calls of one step, in call order.
        on_half: Called with :data:`UNCOND` or :data:`COND` when the half of a :data:`PENDING` call is decided.
        on_output: Called as ``on_output(module, args, kwargs, output)`` after every counted denoiser call.

    Example:
        >>> clock = SamplerClock(denoiser, steps=2, stop=False)
        >>> with clock:
        ...     clock.start_batch(2, cfg=True)
        ...     for t in timesteps:
        ...         denoiser(torch.cat([latents] * 2), t, encoder_hidden_states=emb)
        >>> clock.steps_recorded
        2
    """

    def __init__(
        self,
        pipe_or_denoiser: Any,
        *,
        steps: int,
        do_cfg: bool = True,
        stop: bool = True,
        scheduler: Any | None = None,
        cfg_call_order: tuple[str, str] = ("uncond", "cond"),
        on_half: Callable[[str], None] | None = None,
        on_output: Callable[[nn.Module, tuple, dict[str, Any], Any], None] | None = None,
    ) -> None:
        if sorted(cfg_call_order) != sorted(HALVES) or len(cfg_call_order) != 2:
            raise ConfigError(f"cfg_call_order={cfg_call_order!r} is invalid: give ('uncond', 'cond') in some order")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler {type(scheduler).__name__} has no step() method")
        self.denoiser = get_denoiser(pipe_or_denoiser)
        self.steps = steps
        self.do_cfg = do_cfg
        self.stop = stop
        self.cfg_call_order = (str(cfg_call_order[0]), str(cfg_call_order[1]))
        self._pipe = None if isinstance(pipe_or_denoiser, nn.Module) else pipe_or_denoiser
        self._scheduler_arg = scheduler
        self._on_half = on_half
        self._on_output = on_output
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # the scheduler whose step() is wrapped while the block is active: (scheduler, wrapper, own attribute)
        self._patch: tuple[Any, Callable[..., Any], Any] | None = None
        self._rows: int | None = None
        self._cfg: bool | None = None
        self._calls = 0
        self._steps_recorded = 0
        self._bare_step = 0  # next step without a scheduler: one step per denoiser call
        self._step_base = 0  # with a scheduler: step = base + sampler steps completed since the last reset
        self._completed = 0
        self._eval_sizes: list[int] = []  # batch sizes of the calls since the last scheduler.step()
        self._eval_timestep: float | None = None
        self._pending = False  # a PENDING call waits for its half
        self._depth = 0  # denoiser calls running: 1 inside a counted call, more inside calls nested in it
        self.step: int | None = None
        """Step of the counted denoiser call running now (``None`` outside one and inside nested calls)."""
        self.layout = COND
        """CFG layout of the current (or last) counted call: :data:`SPLIT`, :data:`UNCOND`, :data:`COND` or
        :data:`PENDING`."""
        self.input_rows = 0
        """Batch size of the current (or last) counted call."""

    # -- batch bookkeeping -------------------------------------------------------------------------------------

    def start_batch(self, rows: int, *, cfg: bool | None = None) -> None:
        """Declare the next generation batch and restart the step counter at 0.

        Args:
            rows: Number of generations ``B`` in the batch (the conditional rows).
            cfg: ``True``: the denoiser sees ``2B`` rows ``[uncond; cond]`` (or, with a scheduler, two ``B``-row
                calls per scheduler step); ``False``: ``B`` rows, all conditional; ``None``: inferred from the
                calls' batch sizes.
        """
        if rows < 1:
            raise ValueError(f"rows={rows!r} is invalid: must be >= 1")
        self.resolve_pending(COND)  # a lone call whose scheduler step never ended: conditional
        if self._patch is not None:
            self._follow_pipeline_scheduler()
        self._rows = rows
        self._cfg = cfg
        self._calls = 0
        self._steps_recorded = 0
        self._restart_steps(0)

    def set_step(self, step: int) -> None:
        """Make the next denoiser call count at ``step`` (for callers that drive the denoiser themselves).

        With a scheduler, later steps count on from ``step`` as the scheduler completes them.

        Args:
            step: Step index, ``>= 0``.
        """
        if step < 0:
            raise ValueError(f"step={step!r} is invalid: must be >= 0")
        self.resolve_pending(COND)
        self._restart_steps(step)

    def _restart_steps(self, step: int) -> None:
        self._bare_step = step
        self._step_base = step
        self._completed = 0
        self._eval_sizes = []
        self._eval_timestep = None
        self.step = None

    @property
    def calls(self) -> int:
        """Denoiser calls counted since the last :meth:`start_batch`."""
        return self._calls

    @property
    def steps_recorded(self) -> int:
        """One more than the last step counted since the last :meth:`start_batch` (0 when none was)."""
        return self._steps_recorded

    @property
    def counts_sampler_steps(self) -> bool:
        """Whether steps come from a scheduler's ``step()`` calls (``False``: one step per denoiser call)."""
        return self._patch is not None

    @property
    def scheduler(self) -> Any | None:
        """The scheduler whose ``step()`` is wrapped now (``None`` outside the block or without one)."""
        return None if self._patch is None else self._patch[0]

    def _next_step(self) -> int:
        if self._patch is None:
            return self._bare_step
        return self._step_base + self._completed

    # -- CFG layout ------------------------------------------------------------------------------------------------

    def _uncond_split(self, n: int) -> int:
        """Number of leading unconditional rows in a single-call denoiser input of ``n`` rows."""
        rows, cfg = self._rows, self._cfg
        if rows is None:
            cfg = self.do_cfg if cfg is None else cfg
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
        """The layout of a denoiser call of ``n`` rows at ``step`` (one of :data:`SPLIT` ... :data:`PENDING`)."""
        if self._patch is None:
            return SPLIT if self._uncond_split(n) else COND
        rows, cfg, sizes = self._rows, self._cfg, self._eval_sizes
        if rows is None:
            if sizes:
                raise DiffmemError(
                    f"the denoiser ran {len(sizes) + 1} times in one scheduler step (sampler step {step}); "
                    "call start_batch(rows) so that separate classifier-free-guidance calls can be told apart"
                )
            sizes.append(n)
            return SPLIT if self._uncond_split(n) else COND
        allowed = (rows,) if cfg is False else (2 * rows, rows)
        if n not in allowed:
            expected = " or ".join(str(a) for a in allowed)
            raise DiffmemError(f"denoiser got a batch of {n} rows, expected {expected} for {rows} generations")
        first, second = self.cfg_call_order
        timestep = _timestep_of(args, kwargs) if n == rows else None
        if not sizes:
            layout = SPLIT if n == 2 * rows else {True: first, False: COND, None: PENDING}[cfg]
        elif sizes == [rows] and n == rows and cfg is not False:
            before = self._eval_timestep
            if before is not None and timestep is not None and before != timestep:
                raise DiffmemError(
                    f"the denoiser ran at timesteps {before:g} and {timestep:g} without a scheduler.step() between "
                    f"them (step {step}); drive the sampler through the pipeline's scheduler"
                )
            self.resolve_pending(first)
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
            self.resolve_pending(COND)
        elif self._cfg is True and self._rows is not None and sizes == [self._rows]:
            raise DiffmemError(
                f"cfg=True but sampler step {self._next_step()} ran a single denoiser call of {self._rows} rows; "
                f"expected one call of {2 * self._rows} or two of {self._rows}"
            )
        self._eval_sizes = []
        self._eval_timestep = None
        if step_done:
            self._completed += 1

    def resolve_pending(self, layout: str) -> None:
        """Decide the half of a :data:`PENDING` call (``UNCOND`` or ``COND``) and tell ``on_half``; else nothing."""
        if not self._pending:
            return
        self._pending = False
        if self._on_half is not None:
            self._on_half(layout)

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._depth:  # a call inside a counted call belongs to it
            self._depth += 1
            return None
        step = self._next_step()
        if step >= self.steps:
            if self.stop:
                raise StopGeneration(step)
            self.step = None
            return None
        n = batch_rows(args, kwargs)
        if n is None:
            raise DiffmemError(f"cannot find the batch size of the {type(module).__name__} input")
        self.layout = self._classify(n, step, args, kwargs)
        self._pending = self.layout == PENDING
        self.input_rows = n
        self._calls += 1
        if self._patch is None:
            self._bare_step = step + 1
        self._steps_recorded = max(self._steps_recorded, step + 1)
        self.step = step
        self._depth = 1
        return None

    def _output_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._depth == 1 and self.step is not None:
            self._on_output(module, args, kwargs, output)
        return None

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._depth > 1:
            self._depth -= 1
            return None
        self._depth = 0
        self.step = None
        return None

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

    def _unpatch_scheduler(self) -> None:
        if self._patch is None:
            return
        scheduler, wrapper, own = self._patch
        self._patch = None
        if vars(scheduler).get("step") is not wrapper:
            logger.warning("%s.step was replaced while recording; leaving it as it is", type(scheduler).__name__)
        elif own is _MISSING:
            del scheduler.step
        else:
            scheduler.step = own

    def _follow_pipeline_scheduler(self) -> None:
        """Re-wrap when the pipeline's scheduler was replaced inside the ``with`` block."""
        current = self._current_scheduler()
        if current is not None and current is not self.scheduler:
            self._unpatch_scheduler()
            self._patch_scheduler(current)

    # -- context manager -----------------------------------------------------------------------------------------

    def __enter__(self) -> SamplerClock:
        if self._handles:
            raise DiffmemError("this SamplerClock is already running; exit it before entering it again")
        try:
            self._handles.append(
                self.denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True)
            )
            if self._on_output is not None:
                self._handles.append(self.denoiser.register_forward_hook(self._output_hook, with_kwargs=True))
            self._handles.append(
                self.denoiser.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
            )
            scheduler = self._current_scheduler()
            if scheduler is not None:
                self._patch_scheduler(scheduler)
        except BaseException:
            self._remove()
            raise
        self._restart_steps(0)
        return self

    def _remove(self) -> None:
        try:
            remove_handles(self._handles)
        finally:
            self._handles = []
            self.step = None
            self._depth = 0
            self._unpatch_scheduler()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Remove the hooks and the scheduler wrapper; decide a pending call's half (conditional) unless the block
        raised, in which case the interrupted call is discarded."""
        try:
            self._remove()
        finally:
            if exc_type is None:
                self.resolve_pending(COND)
            else:
                self._pending = False  # a call interrupted before its half was known is not counted
        return None


def remove_handles(handles: list[Any]) -> None:
    """Remove hook handles (the clock's and the recorder's)."""
    for handle in handles:
        handle.remove()
