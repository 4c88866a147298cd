"""What the configs of the workflows (``diffmem mitigate``, ``demo`` and ``audit``) share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffmem.config import DiffmemConfig, SamplerConfig

__all__ = ["RunConfig"]


@dataclass(kw_only=True)
class RunConfig(DiffmemConfig):
    """The settings every workflow takes; :class:`~diffmem.workflows.mitigate.MitigateRunConfig`,
    :class:`~diffmem.workflows.audit.AuditConfig` and :class:`~diffmem.workflows.demo.DemoConfig` extend it (with
    keyword arguments only).

    Args:
        model: Pipeline folder or hub id.
        out: Output folder; replaced as a whole on a rerun (only when it is an earlier diffmem output).
        scorer: Similarity scorer.
        sampler: The sampler settings the user chose (``SamplerConfig`` field names); the others are the model's
            (:meth:`resolve_sampler`).
        opt_steps: Adam steps of the re-extraction attack.
        allow_pickle: Accept pickled weights.
        allow_outside: Accept reference paths outside the manifest's folder.
    """

    model: str
    out: str
    scorer: str = "ssim"
    sampler: dict[str, Any] | None = None
    opt_steps: int = 50
    allow_pickle: bool = False
    allow_outside: bool = False

    def check(self) -> None:
        SamplerConfig.check_keys(self.sampler or {})

    def resolve_sampler(self, model: Any) -> SamplerConfig:
        """The sampler for ``model`` (a folder, a hub id or a loaded pipeline): the settings chosen, else the model's.

        Given the folder before the model loads, it checks the settings early; given the loaded pipeline, it is the
        sampler the workflow runs with and records.
        """
        return SamplerConfig.resolve(model, **(self.sampler or {}))
