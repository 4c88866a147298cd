"""Configuration dataclasses, each paired with a verb (``record``, ``locate``, ...) and validated on creation."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = [
    "DiffmemConfig",
    "require",
    "RecordConfig",
    "LocateConfig",
    "SamplerConfig",
    "scheduler_names",
    "pipeline_call_defaults",
    "LOCATE_PRESETS",
    "BASE_PRESETS",
]

logger = logging.getLogger(__name__)

C = TypeVar("C", bound="DiffmemConfig")


def require(cond: bool, name: str, value: object, why: str) -> None:
    """Raise ``ConfigError("name=value is invalid: why")`` unless ``cond`` holds: the one failed-check message.

    Args:
        cond: The check.
        name: The field (or argument) checked; a nested field as ``"sampler.guidance_scale"``.
        value: Its value, shown with ``repr``.
        why: What a valid value is.
    """
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid: {why}")


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data: configs and other dataclasses become dicts, tuples lists, paths strings."""
    if isinstance(value, DiffmemConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _options(hint: Any) -> tuple[Any, ...]:
    """The types a field's annotation allows (the members of a union, else the annotation itself)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _rebuilt(hint: Any, value: Any) -> Any:
    """A ``to_dict`` value turned back into the field's type: a nested config, a tuple or a path."""
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if isinstance(value, Mapping) and isinstance(origin, type) and issubclass(origin, DiffmemConfig):
            return origin.from_dict(value)
        if isinstance(value, list) and origin is tuple:
            return tuple(value)
        if isinstance(value, str) and origin is Path:
            return Path(value)
    return value


@cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (empty where one names a type imported only for type checking)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


class DiffmemConfig:
    """Base of diffmem's config dataclasses: each checks its values on creation and round-trips through JSON.

    A subclass is a ``@dataclass`` that overrides :meth:`check` (called by ``__post_init__``) and raises through
    :func:`require`, so that every invalid value reads ``field=value is invalid: why``. Settings of another stage
    nest as a field of its config type (``sampler: SamplerConfig``): ``__post_init__`` checks that such a field
    holds one, and :meth:`to_dict` and :meth:`from_dict` follow it.
    """

    def __post_init__(self) -> None:
        for f in fields(self):
            kind = _field_types(type(self)).get(f.name)
            if isinstance(kind, type) and issubclass(kind, DiffmemConfig):
                value = getattr(self, f.name)
                require(isinstance(value, kind), f.name, value, f"must be a {kind.__name__}")
        self.check()

    def check(self) -> None:
        """Validate the fields (and normalise them where a config says so).

        Raises:
            ConfigError: A field is invalid; the message names it and its value.
        """

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data: nested configs as dicts, tuples as lists, paths as strings."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def check_keys(cls, keys: typing.Iterable[str]) -> None:
        """Raise ``ConfigError`` naming every key of ``keys`` that is not a field of ``cls``."""
        known = sorted(f.name for f in fields(cls) if f.init)
        unknown = sorted(set(keys) - set(known))
        require(not unknown, f"{cls.__name__} keys", unknown, f"unknown keys; the keys are {', '.join(known)}")

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """The inverse of :meth:`to_dict`: nested configs, tuples and paths are rebuilt.

        Args:
            data: A dict as :meth:`to_dict` writes it; missing keys take their defaults.

        Raises:
            ConfigError: A key that is not a field of ``cls`` (the message names every such key), or an invalid
                value.
        """
        cls.check_keys(data)
        hints = _field_types(cls)
        return cls(**{k: _rebuilt(hints.get(k), v) for k, v in data.items()})


@cache
def scheduler_names() -> tuple[str, ...]:
    """Names of the scheduler classes diffusers exports (``DDIMScheduler``, ``EulerDiscreteScheduler``, ...)."""
    import diffusers

    return tuple(sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax")))


def _call_parameters(pipeline_class: type | None) -> dict[str, inspect.Parameter]:
    """Parameters of a pipeline class's ``__call__`` (empty for ``None``)."""
    if pipeline_class is None or not callable(getattr(pipeline_class, "__call__", None)):
        return {}
    try:
        return dict(inspect.signature(pipeline_class.__call__).parameters)
    except (TypeError, ValueError):
        return {}


def pipeline_call_defaults(pipeline_class: type | None) -> dict[str, Any]:
    """The ``num_inference_steps`` and ``guidance_scale`` defaults of a pipeline class's ``__call__`` (those it has;
    Stable Diffusion: 50 and 7.5)."""
    params = _call_parameters(pipeline_class)
    out: dict[str, Any] = {}
    for key in ("num_inference_steps", "guidance_scale"):
        default = params[key].default if key in params else None
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            out[key] = default
    return out


def _local_folder(source: Any) -> Path | None:
    """The local pipeline folder behind a path or a loaded pipeline (``None`` for a hub id or a pipeline in memory)."""
    name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name_or_path", None)
    if not name:
        return None
    path = Path(os.fspath(name)).expanduser()
    return path if (path / "model_index.json").is_file() else None


def _class_in_folder(folder: Path | None, config_file: str) -> type | None:
    """The diffusers class named by ``_class_name`` in a JSON file of a pipeline folder, if it can be read."""
    if folder is None:
        return None
    try:
        name = json.loads((folder / config_file).read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    import diffusers

    return getattr(diffusers, name, None) if isinstance(name, str) else None


# settings of a scheduler config that change what the model's output means or which timesteps it sees
_SCHEDULER_KEYS_KEPT = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")


@dataclass
class SamplerConfig(DiffmemConfig):
    """How a pipeline samples; every command that generates images takes these settings.

    Build one with :meth:`resolve`, which fills what the user did not give from the model's
    ``diffmem_defaults.json``, else from the pipeline's own defaults. Pass :meth:`call_kwargs` to the pipeline and
    swap the scheduler with :meth:`apply_scheduler` (or :meth:`use_scheduler`, which puts the old one back).

    Args:
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale.
        guidance_rescale: Guidance rescale (Lin et al. 2023) in [0, 1]; 0 is off.
        height: Image height in pixels (the pipeline's default when ``None``).
        width: Image width in pixels (the pipeline's default when ``None``).
        scheduler: Name of a diffusers scheduler class (``"EulerDiscreteScheduler"``, ...) built from the
            pipeline's scheduler config, so zero-terminal-SNR, v-prediction and trailing-timestep settings carry
            over; ``None`` keeps the pipeline's scheduler.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None

    def check(self) -> None:
        require(
            isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1, "num_inference_steps",
            self.num_inference_steps, "must be an integer >= 1",
        )
        require(self.guidance_scale >= 0, "guidance_scale", self.guidance_scale, "must be >= 0")
        require(0 <= self.guidance_rescale <= 1, "guidance_rescale", self.guidance_rescale, "must be in [0, 1]")
        for name in ("height", "width"):
            v = getattr(self, name)
            require(v is None or (isinstance(v, int) and v > 0 and v % 8 == 0), name, v,
                    "must be a positive multiple of 8")
        if self.scheduler is not None:
            require(self.scheduler in scheduler_names(), "scheduler", self.scheduler,
                    f"choose a diffusers scheduler: {', '.join(scheduler_names())}")

    @classmethod
    def resolve(cls, model: str | os.PathLike | Any, **given: Any) -> SamplerConfig:
        """Settings for ``model``: the values given, else the model's ``diffmem_defaults.json``, else the pipeline's.

        The pipeline's defaults are ``num_inference_steps`` and ``guidance_scale`` of its ``__call__`` and, for a
        loaded pipeline, its image size and scheduler. A folder is read without loading weights (its
        ``model_index.json`` names the pipeline class); for a hub id the class defaults of this dataclass stand in.

        Args:
            model: A pipeline folder, a hub id, or a loaded pipeline (``pipe.name_or_path`` locates its folder).
            **given: Settings the user chose; ``None`` values count as not given.

        Returns:
            The validated settings.

        Raises:
            ValueError: A value out of range, an unknown key, a scheduler the model's scheduler is not compatible
                with, or a non-zero ``guidance_rescale`` for a pipeline that has none.
        """
        from .pipelines import sampling_defaults

        given = {k: v for k, v in given.items() if v is not None}
        cls.check_keys(given)
        is_pipe = not isinstance(model, (str, os.PathLike))
        folder = _local_folder(model)
        pipeline_class = type(model) if is_pipe else _class_in_folder(folder, "model_index.json")
        params = _call_parameters(pipeline_class)
        values = pipeline_call_defaults(pipeline_class)
        values.update(sampling_defaults(folder) if folder is not None else {})
        values.update(given)
        if values.get("guidance_rescale") and params and "guidance_rescale" not in params:
            require("guidance_rescale" not in given, "guidance_rescale", given.get("guidance_rescale"),
                    f"{pipeline_class.__name__} has no guidance rescale")
            logger.debug("%s has no guidance rescale: the model default %s is not used", pipeline_class.__name__,
                         values["guidance_rescale"])
            values["guidance_rescale"] = 0.0
        if is_pipe:
            from .sampling import image_size

            values["height"], values["width"] = image_size(model, values.get("height"), values.get("width"))
            own = type(getattr(model, "scheduler", None)).__name__
            if "scheduler" not in values and own in scheduler_names():
                values["scheduler"] = own
        config = cls(**values)
        scheduler = model.scheduler if is_pipe else _class_in_folder(folder, "scheduler/scheduler_config.json")
        if config.scheduler is not None and scheduler is not None:
            config._check_compatible(scheduler)
        return config

    def _check_compatible(self, scheduler: Any) -> bool:
        """Raise unless ``self.scheduler`` is among the schedulers ``scheduler`` (a class or instance) can become.

        Returns:
            ``False`` when the scheduler class declares no compatible classes (then nothing is checked).
        """
        current = scheduler if isinstance(scheduler, type) else type(scheduler)
        getter = getattr(current, "_get_compatibles", None)
        # diffusers lists stand-in classes (defined in diffusers.utils.dummy_*_objects) for schedulers whose optional
        # backend, e.g. torchsde, is not installed; they raise on use, so they are not offered as choices
        usable = [c for c in getter() if ".dummy_" not in c.__module__] if getter else []
        compatible = sorted({c.__name__ for c in usable} | {current.__name__})
        if len(compatible) == 1:
            return False
        require(self.scheduler in compatible, "scheduler", self.scheduler,
                f"the model's {current.__name__} can become one of {', '.join(compatible)}")
        return True

    def call_kwargs(self, pipe: Any = None) -> dict[str, Any]:
        """Keyword arguments of ``pipe(...)`` for these settings.

        ``guidance_rescale`` is left out when it is 0 or when the pipeline's ``__call__`` has no such parameter
        (PixArt); ``height`` and ``width`` when ``None``. Pipelines with ``use_resolution_binning`` get it off,
        since the size is explicit.

        Args:
            pipe: The pipeline the arguments are for; without it every pipeline is assumed to take them all.
        """
        params = _call_parameters(type(pipe)) if pipe is not None else {}
        out: dict[str, Any] = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}
        if self.guidance_rescale and (not params or "guidance_rescale" in params):
            out["guidance_rescale"] = self.guidance_rescale
        out.update({k: getattr(self, k) for k in ("height", "width") if getattr(self, k) is not None})
        if pipe is not None:
            from .sampling import pipeline_extras

            out.update(pipeline_extras(pipe))  # the one rule for what every diffmem call passes
        return out

    def apply_scheduler(self, pipe: Any) -> Any:
        """Swap in ``self.scheduler``, built with ``from_config(pipe.scheduler.config)``; returns the old scheduler.

        Put the old one back with ``pipe.scheduler = old``. Nothing changes when ``scheduler`` is ``None`` or
        already the pipeline's.

        Raises:
            ValueError: The pipeline's scheduler is not compatible with ``self.scheduler`` (the message names those
                that are).
        """
        old = pipe.scheduler
        if self.scheduler is None or type(old).__name__ == self.scheduler:
            return old
        if not self._check_compatible(old):
            logger.warning("%s declares no compatible schedulers; %s is used unchecked", type(old).__name__,
                           self.scheduler)
        import diffusers

        cls = getattr(diffusers, self.scheduler)
        new = cls.from_config(old.config)
        accepted = inspect.signature(cls.__init__).parameters
        defaults = inspect.signature(type(old).__init__).parameters
        lost = [f"{k}={old.config[k]!r}" for k in _SCHEDULER_KEYS_KEPT
                if k in old.config and k not in accepted and (k not in defaults or defaults[k].default != old.config[k])]
        if lost:
            logger.warning("%s has no %s of the model's %s", self.scheduler, ", ".join(lost), type(old).__name__)
        pipe.scheduler = new
        logger.info("scheduler: %s (from the model's %s config)", self.scheduler, type(old).__name__)
        return old

    @contextlib.contextmanager
    def use_scheduler(self, pipe: Any) -> Iterator[Any]:
        """``with config.use_scheduler(pipe):`` samples with ``self.scheduler`` and puts the old one back after."""
        old = self.apply_scheduler(pipe)
        try:
            yield pipe.scheduler
        finally:
            pipe.scheduler = old


@dataclass
class RecordConfig(DiffmemConfig):
    """How to record FFN activation statistics.

    Args:
        sampler: The sampler (steps, guidance, size, ...); guidance > 1 runs the ``[uncond; cond]`` batch.
        record_steps: Number of leading steps to record (tau), at most ``sampler.num_inference_steps``; the
            generation stops right after them.
        num_seeds: Generations per prompt, with seeds ``seed, seed + 1, ...``.
        seed: First seed.
        batch_size: Prompts per pipeline call.
        target: Regex or name suffix overriding the default FFN targets.
        signatures: Also keep each prompt's mean activation per layer (memory grows with prompts).
        negative_prompt: Negative prompt for the unconditional half.
    """

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    record_steps: int = 10
    num_seeds: int = 1
    seed: int = 0
    batch_size: int = 8
    target: str | None = None
    signatures: bool = False
    negative_prompt: str | None = None

    def check(self) -> None:
        steps = self.sampler.num_inference_steps
        require(1 <= self.record_steps <= steps, "record_steps", self.record_steps,
                f"must be in [1, sampler.num_inference_steps={steps}]")
        require(self.num_seeds >= 1, "num_seeds", self.num_seeds, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")

    @property
    def do_cfg(self) -> bool:
        """Whether the pipeline runs classifier-free guidance (an ``[uncond; cond]`` batch)."""
        return self.sampler.guidance_scale > 1.0


LOCATE_METHODS = ("wanda", "neuron", "directions")  # built in; diffmem.localization.register_locator adds more
# Chavhan et al. 2024, as their released code runs it: statistics of the whole [uncond; cond] batch, the empty prompt
# as the only base prompt (see ``BASE_PRESETS``), k = int(ratio * in) per row, and a strict step-count threshold.
LOCATE_PRESETS: dict[str, dict[str, object]] = {
    "chavhan2024": {"method": "wanda", "half": "both", "k_rounding": "floor", "strict_step_count": True},
}
# The base prompts each preset records (``None``: the user's base prompt set).
BASE_PRESETS: dict[str, list[str] | None] = {"chavhan2024": [""]}
HALVES_CHOICES = ("cond", "uncond", "both")


@dataclass
class LocateConfig(DiffmemConfig):
    """How to turn memorized and base statistics into a mask.

    Args:
        method: ``"wanda"`` (Chavhan et al.'s per-row weight mask), ``"neuron"`` (whole FFN hidden neurons)
            or ``"directions"`` (a low-rank subspace of the FFN input).
        ratio: Fraction of each row's weights (``wanda``) or of each layer's neurons (``neuron``) to select,
            in (0, 1].
        record_steps: Use the first ``record_steps`` recorded denoising steps (tau); ``None`` uses all.
        min_step_fraction: A weight is kept when selected in at least ``max(1, ceil(f * tau))`` steps;
            0 is a plain union over steps.
        half: Which CFG half of the statistics to use (``"both"`` pools the two halves, as the original code).
        k_rounding: ``"ceil"``: ``max(1, ceil(ratio * in))`` per row; ``"floor"``: the original ``int(ratio * in)``,
            which is 0 (an empty layer) at tiny ratios.
        strict_step_count: Keep a weight selected in more than ``f * tau`` steps (the original rule) instead of at
            least ``max(1, ceil(f * tau))``.
        preset: Name of the preset these settings came from (recorded in the edit's metadata).
        rank: Directions only: a fixed number of directions per layer (``None``: use ``explained_variance``).
        explained_variance: Directions only: smallest k whose share of the memorized-vs-base energy reaches this.
    """

    method: str = "wanda"
    ratio: float = 0.01
    record_steps: int | None = 10
    min_step_fraction: float = 0.0
    half: str = "cond"
    rank: int | None = None
    explained_variance: float = 0.5
    k_rounding: str = "ceil"
    strict_step_count: bool = False
    preset: str | None = None

    def check(self) -> None:
        require(
            isinstance(self.method, str) and bool(self.method), "method", self.method,
            f"name a registered locate method (built in: {', '.join(LOCATE_METHODS)})",
        )
        require(0.0 < self.ratio <= 1.0, "ratio", self.ratio, "must be in (0, 1]")
        require(
            self.record_steps is None or self.record_steps >= 1, "record_steps", self.record_steps, "must be >= 1 or None"
        )
        require(self.k_rounding in ("ceil", "floor"), "k_rounding", self.k_rounding, "choose 'ceil' or 'floor'")
        require(0.0 <= self.min_step_fraction <= 1.0, "min_step_fraction", self.min_step_fraction, "must be in [0, 1]")
        require(self.half in HALVES_CHOICES, "half", self.half, f"choose one of {', '.join(HALVES_CHOICES)}")
        require(self.rank is None or self.rank >= 1, "rank", self.rank, "must be >= 1 or None")
        require(
            0.0 < self.explained_variance <= 1.0, "explained_variance", self.explained_variance, "must be in (0, 1]"
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> LocateConfig:
        """Settings that reproduce a published procedure exactly (see ``LOCATE_PRESETS``), then ``overrides``."""
        require(name in LOCATE_PRESETS, "preset", name, f"choose one of {', '.join(LOCATE_PRESETS)}")
        return cls(**{**LOCATE_PRESETS[name], "preset": name, **overrides})
