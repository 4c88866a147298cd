"""Configuration dataclasses, each paired with a verb (``record``, ``locate``, ...) and validated on creation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError

__all__ = ["RecordConfig", "LocateConfig", "LOCATE_PRESETS", "BASE_PRESETS"]


def _check(cond: bool, field: str, value: object, why: str) -> None:
    if not cond:
        raise ConfigError(f"{field}={value!r} is invalid: {why}")


class _ConfigMethods:
    """``to_dict``, shared by the config dataclasses."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecordConfig(_ConfigMethods):
    """How to record FFN activation statistics.

    Args:
        num_inference_steps: Denoising steps of the sampler schedule.
        record_steps: Number of leading steps to record (tau); the generation stops right after them.
        guidance_scale: Classifier-free guidance scale; > 1 runs the ``[uncond; cond]`` batch.
        num_seeds: Generations per prompt, with seeds ``seed, seed + 1, ...``.
        seed: First seed.
        batch_size: Prompts per pipeline call.
        height: Image height in pixels (pipeline default when ``None``).
        width: Image width in pixels (pipeline default when ``None``).
        target: Regex or name suffix overriding the default FFN targets.
        signatures: Also keep each prompt's mean activation per layer (memory grows with prompts).
        negative_prompt: Negative prompt for the unconditional half.
    """

    num_inference_steps: int = 50
    record_steps: int = 10
    guidance_scale: float = 7.5
    num_seeds: int = 1
    seed: int = 0
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    target: str | None = None
    signatures: bool = False
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        _check(self.num_inference_steps >= 1, "num_inference_steps", self.num_inference_steps, "must be >= 1")
        _check(
            1 <= self.record_steps <= self.num_inference_steps,
            "record_steps",
            self.record_steps,
            f"must be in [1, num_inference_steps={self.num_inference_steps}]",
        )
        _check(self.guidance_scale >= 0, "guidance_scale", self.guidance_scale, "must be >= 0")
        _check(self.num_seeds >= 1, "num_seeds", self.num_seeds, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        for name in ("height", "width"):
            v = getattr(self, name)
            _check(v is None or (v > 0 and v % 8 == 0), name, v, "must be a positive multiple of 8")

    @property
    def do_cfg(self) -> bool:
        """Whether the pipeline runs classifier-free guidance (an ``[uncond; cond]`` batch)."""
        return self.guidance_scale > 1.0


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
class LocateConfig(_ConfigMethods):
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

    def __post_init__(self) -> None:
        _check(
            isinstance(self.method, str) and bool(self.method), "method", self.method,
            f"name a registered locate method (built in: {', '.join(LOCATE_METHODS)})",
        )
        _check(0.0 < self.ratio <= 1.0, "ratio", self.ratio, "must be in (0, 1]")
        _check(
            self.record_steps is None or self.record_steps >= 1, "record_steps", self.record_steps, "must be >= 1 or None"
        )
        _check(self.k_rounding in ("ceil", "floor"), "k_rounding", self.k_rounding, "choose 'ceil' or 'floor'")
        _check(0.0 <= self.min_step_fraction <= 1.0, "min_step_fraction", self.min_step_fraction, "must be in [0, 1]")
        _check(self.half in HALVES_CHOICES, "half", self.half, f"choose one of {', '.join(HALVES_CHOICES)}")
        _check(self.rank is None or self.rank >= 1, "rank", self.rank, "must be >= 1 or None")
        _check(
            0.0 < self.explained_variance <= 1.0, "explained_variance", self.explained_variance, "must be in (0, 1]"
        )


    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> LocateConfig:
        """Settings that reproduce a published procedure exactly (see ``LOCATE_PRESETS``), then ``overrides``."""
        if name not in LOCATE_PRESETS:
            raise ConfigError(f"preset={name!r} is invalid: choose one of {', '.join(LOCATE_PRESETS)}")
        return cls(**{**LOCATE_PRESETS[name], "preset": name, **overrides})