"""What the re-extraction attack returns: per-row outcomes, their summary over rows, and its JSON file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .files import write_json

if TYPE_CHECKING:
    from .reextraction import ReextractConfig

__all__ = ["ReextractResult", "KINDS"]

KINDS = ("memorized", "control")
"""Row kinds: prompts whose image the model memorized, and controls (images it saw once, or never)."""


def _rate(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@dataclass
class ReextractResult:
    """Outcome of :func:`~diffmem.reextraction.reextract`.

    Attributes:
        rows: One dict per item (see :func:`~diffmem.reextraction.reextract`).
        config: The attack settings.
        scorer: The scorer's description.
        threshold: The replication threshold used.
        adversarial_embeds: Row index -> final optimised conditioning ``[1, L, D]`` (fp32, CPU), to be passed to the
            pipeline as ``prompt_embeds=`` (e.g. to record FFN statistics under it).
        adversarial_pooled: Row index -> final pooled embedding ``[1, D']`` on pipelines that use one.
        images: Row index -> uint8 ``[checkpoints, num_seeds, H, W, 3]`` samples, when kept.
        seconds: Wall time of the whole attack.
    """

    rows: list[dict[str, Any]]
    config: ReextractConfig
    scorer: dict[str, Any]
    threshold: float
    adversarial_embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    adversarial_pooled: dict[int, torch.Tensor] = field(default_factory=dict)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def _of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == kind]

    def summary(self) -> dict[str, Any]:
        """Replication rates over rows.

        Returns:
            ``memorization_rate`` (mean final success over memorized rows and seeds), ``control_rate`` (the same
            over control rows; ``None`` without control rows), ``curve`` (kind -> {step: rate}, ``None`` for a kind
            without rows), row counts, timing, the config and the scorer.
        """
        curve: dict[str, dict[int, float] | None] = {}
        rates: dict[str, float | None] = {}
        for kind in KINDS:
            rows = self._of(kind)
            rates[kind] = _rate([float(np.mean(r["success"])) for r in rows])
            curve[kind] = (
                {s: float(np.mean([r["rate_at_steps"][s] for r in rows])) for s in self.config.checkpoints}
                if rows
                else None
            )
        n = len(self.rows)
        return {
            "memorization_rate": rates["memorized"],
            "control_rate": rates["control"],
            "curve": curve,
            "num_memorized": len(self._of("memorized")),
            "num_control": len(self._of("control")),
            "mean_final_loss": {
                k: _rate([float(np.mean(r["loss_curve"][-5:])) for r in self._of(k)]) for k in KINDS
            },
            "seconds": self.seconds,
            "seconds_per_row": self.seconds / n if n else None,
            "threshold": self.threshold,
            "config": self.config.to_dict(),
            "scorer": self.scorer,
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the summary and rows as JSON (sorted keys), atomically.

        Args:
            path: Output file.

        Returns:
            The path written.
        """
        return write_json(Path(path), {"summary": self.summary(), "rows": self.rows})
