"""Weight deltas: any change of any denoiser parameters (e.g. from fine-tuning), an :class:`~diffmem.edits.Edit`.

A :class:`WeightDelta` stores ``new - old`` in fp32 for each changed parameter, by its name relative to the
denoiser (``"down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"``). Applying it adds the delta;
the reversible form restores the original values bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..targets import get_denoiser
from .base import Edit, register_edit

__all__ = ["WeightDelta"]


@register_edit
@dataclass(eq=False)
class WeightDelta(Edit):
    """Additive changes of denoiser parameters.

    Args:
        deltas: Parameter name (relative to the denoiser) -> fp32 ``new - old`` of the parameter's shape.
        meta: Provenance (method, settings, what it was trained on).
    """

    format: ClassVar[str] = "diffmem.delta"
    kind: ClassVar[str] = "weight delta"

    deltas: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.deltas = {n: torch.as_tensor(d).detach().to("cpu", torch.float32).contiguous() for n, d in self.deltas.items()}

    @classmethod
    def between(cls, before: Mapping[str, Tensor], model: Any, meta: dict[str, Any] | None = None) -> WeightDelta:
        """The delta from saved parameter values ``before`` to the model's current ones (changed parameters only).

        Args:
            before: Parameter name -> value before the change (e.g. a ``{n: p.clone()}`` taken earlier).
            model: The pipeline or denoiser after the change.
            meta: Provenance.
        """
        params = dict(get_denoiser(model).named_parameters())
        deltas = {}
        for name, old in before.items():
            diff = params[name].detach().float().cpu() - old.detach().float().cpu()
            if bool(diff.ne(0).any()):
                deltas[name] = diff
        return cls(deltas, meta=dict(meta or {}))

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(int(s) for s in d.shape) for n, d in self.deltas.items()}

    def edit_(self, params: Mapping[str, Tensor]) -> None:
        for name, p in params.items():
            p.copy_((p.float() + self.deltas[name].to(p.device)).to(p.dtype))

    def num_params_changed(self) -> int:
        return sum(int(d.count_nonzero()) for d in self.deltas.values())

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.deltas)

    def header(self) -> dict[str, Any]:
        return {"layers": [[n, list(s)] for n, s in self.layer_shapes().items()]}

    def summary(self) -> dict[str, Any]:
        return {"num_tensors": len(self.deltas)}

    @classmethod
    def from_storage(cls, header: dict[str, Any], tensors: dict[str, Tensor], meta: dict[str, Any]) -> WeightDelta:
        return cls({n: tensors[n] for n, _ in header["layers"]}, meta=meta)
