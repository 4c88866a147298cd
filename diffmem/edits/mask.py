"""Sparse masks: sets of feed-forward weights to zero, an :class:`~diffmem.edits.Edit`; and their overlap (IoU).

A :class:`Mask` holds one boolean tensor per target layer, shaped like the layer's weight ``[out, in]``; a
``"neuron"``-level mask zeroes whole input columns (FFN hidden neurons). It is stored as int64 flat indices per
layer, so a file grows with the mask, not with the model. :func:`mask_iou` measures how much two masks overlap
(the "shared subspace" evidence) and :func:`chance_iou` what random masks of the same sizes would give.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, EditMismatchError
from .base import Edit, register_edit

logger = logging.getLogger(__name__)

__all__ = ["Mask", "MASK_LEVELS", "mask_iou", "chance_iou"]

MASK_LEVELS = ("weight", "neuron")


@register_edit
@dataclass(eq=False)
class Mask(Edit):
    """A set of feed-forward weights to zero, per target layer.

    Args:
        layers: Layer name (relative to the denoiser) -> bool tensor ``[out, in]`` shaped like the layer's
            weight; ``True`` marks a weight to zero. Kept in module order.
        level: ``"weight"`` (any pattern) or ``"neuron"`` (whole input columns, i.e. FFN hidden neurons).
        meta: Provenance: method, locate config, model id, hashes of the prompts behind the statistics.
    """

    format: ClassVar[str] = "diffmem.mask"
    kind: ClassVar[str] = "mask"

    layers: dict[str, Tensor]
    level: str = "weight"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in MASK_LEVELS:
            raise ConfigError(f"level={self.level!r} is invalid: choose one of {', '.join(MASK_LEVELS)}")
        layers: dict[str, Tensor] = {}
        for name, m in self.layers.items():
            m = torch.as_tensor(m)
            if m.dim() < 1 or (self.level == "neuron" and m.dim() != 2):
                raise ConfigError(f"mask layer {name!r} must be shaped like its weight ([out, in] for neuron masks), "
                                  f"got shape {tuple(m.shape)}")
            m = m.detach().to(device="cpu", dtype=torch.bool)
            if self.level == "neuron" and not torch.equal(m.any(dim=0), m.all(dim=0)):
                raise ConfigError(f"mask layer {name!r} has level 'neuron' but masks partial columns")
            layers[name] = m
        self.layers = layers

    @classmethod
    def from_dense(
        cls, layers: Mapping[str, Tensor], level: str = "weight", meta: dict[str, Any] | None = None
    ) -> Mask:
        """Build a mask from dense tensors (any dtype; non-zero means masked).

        Args:
            layers: Layer name -> tensor ``[out, in]``.
            level: ``"weight"`` or ``"neuron"``.
            meta: Provenance dictionary.

        Returns:
            The mask.
        """
        return cls({n: torch.as_tensor(t) != 0 for n, t in layers.items()}, level=level, meta=dict(meta or {}))

    @classmethod
    def from_indices(
        cls,
        indices: Mapping[str, Tensor],
        shapes: Mapping[str, tuple[int, int]],
        level: str = "weight",
        meta: dict[str, Any] | None = None,
    ) -> Mask:
        """Build a mask from flat indices ``row * in + col`` per layer.

        Args:
            indices: Layer name -> int tensor of flat indices.
            shapes: Layer name -> ``(out, in)``; its order is the layer order of the mask.
            level: ``"weight"`` or ``"neuron"``.
            meta: Provenance dictionary.

        Returns:
            The mask.

        Raises:
            EditMismatchError: A layer has no indices, or an index falls outside its layer.
        """
        layers: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            if name not in indices:
                raise EditMismatchError(f"mask layer {name!r} has a shape but no indices")
            idx = torch.as_tensor(indices[name]).to(torch.int64).flatten()
            dims = tuple(int(d) for d in shape)
            numel = math.prod(dims)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise EditMismatchError(f"mask layer {name!r} has indices outside its shape {dims}")
            flat = torch.zeros(numel, dtype=torch.bool)
            flat[idx] = True
            layers[name] = flat.view(dims)
        return cls(layers, level=level, meta=dict(meta or {}))

    @classmethod
    def from_columns(
        cls,
        columns: Mapping[str, Tensor | list[int]],
        shapes: Mapping[str, tuple[int, int]],
        meta: dict[str, Any] | None = None,
    ) -> Mask:
        """Build a neuron-level mask that zeroes whole input columns.

        Args:
            columns: Layer name -> column (hidden neuron) indices; a missing layer masks nothing.
            shapes: Layer name -> ``(out, in)``; its order is the layer order of the mask.
            meta: Provenance dictionary.

        Returns:
            A mask with level ``"neuron"``.
        """
        layers: dict[str, Tensor] = {}
        for name, (out_f, in_f) in shapes.items():
            m = torch.zeros(int(out_f), int(in_f), dtype=torch.bool)
            cols = torch.as_tensor(columns.get(name, []), dtype=torch.int64)
            m[:, cols] = True
            layers[name] = m
        return cls(layers, level="neuron", meta=dict(meta or {}))

    # ----------------------------------------------------------------------------------------- summaries
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Return layer name -> weight shape (``(out, in)`` for linear layers), in layer order."""
        return {n: tuple(int(d) for d in m.shape) for n, m in self.layers.items()}

    def counts(self) -> dict[str, int]:
        """Return layer name -> number of masked weights."""
        return {n: int(m.count_nonzero()) for n, m in self.layers.items()}

    def num_masked(self) -> int:
        """Return the number of masked weights over all layers."""
        return sum(self.counts().values())

    def fraction(self) -> float:
        """Return the masked share of the weights of the mask's layers (0 for a mask without layers)."""
        return self.fraction_changed()

    def columns(self) -> dict[str, Tensor]:
        """Return layer name -> indices of the fully masked input columns (hidden neurons)."""
        return {n: torch.nonzero(m.all(dim=0) & m.any(dim=0)).flatten() for n, m in self.layers.items()}

    def indices(self) -> dict[str, Tensor]:
        """Return layer name -> sorted int64 flat indices ``row * in + col`` of the masked weights."""
        return {n: torch.nonzero(m.flatten()).flatten().to(torch.int64) for n, m in self.layers.items()}

    def check_compatible(self, other: Mask) -> None:
        """Raise if ``other`` does not cover the same layers with the same shapes.

        Args:
            other: The mask to compare with.

        Raises:
            EditMismatchError: Naming the first layer that is missing on one side or differs in shape.
        """
        mine, theirs = self.shapes(), other.shapes()
        for name, shape in mine.items():
            if name not in theirs:
                raise EditMismatchError(f"mask layer {name!r} is missing from the other mask")
            if theirs[name] != shape:
                raise EditMismatchError(
                    f"mask layer {name!r} has shape {shape} here but {theirs[name]} in the other mask"
                )
        for name in theirs:
            if name not in mine:
                raise EditMismatchError(f"mask layer {name!r} of the other mask is missing from this mask")

    def union(self, other: Mask) -> Mask:
        """The mask of the weights masked in either mask (level ``"weight"`` unless both are neuron masks).

        Layers of only one mask are kept as they are; layers of both must have the same shape.

        Raises:
            EditMismatchError: A layer of both masks differs in shape.
        """
        mine, theirs = self.shapes(), other.shapes()
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                raise EditMismatchError(f"mask layer {name!r} has shape {mine[name]} here but {theirs[name]} there")
        same = mine.keys() == theirs.keys()
        level = "neuron" if same and self.level == other.level == "neuron" else "weight"
        layers = {n: m | other.layers[n] if n in other.layers else m.clone() for n, m in self.layers.items()}
        layers.update({n: m.clone() for n, m in other.layers.items() if n not in layers})
        return Mask(layers, level=level, meta={**self.meta, "union_of": [self.meta.get("method"), other.meta.get("method")]})

    # ----------------------------------------------------------------------------------------- the Edit protocol
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes())

    def edit_(self, params: Mapping[str, Tensor]) -> None:
        for name, weight in params.items():
            weight.masked_fill_(self.layers[name].to(weight.device), 0)

    def num_params_changed(self) -> int:
        return self.num_masked()

    def saved_entries(self, name: str, param: Tensor) -> Any:
        # only the masked entries: memory grows with the mask, not with the layers
        index = self.layers[name].to(param.device)
        return index, param.detach()[index].clone()

    def restore_entries(self, name: str, param: Tensor, saved: Any) -> None:
        index, values = saved
        param[index] = values

    def tensors(self) -> dict[str, Tensor]:
        return {n: idx.contiguous() for n, idx in self.indices().items()}

    def header(self) -> dict[str, Any]:
        return {"level": self.level, "layers": [[n, list(s)] for n, s in self.shapes().items()]}

    def summary(self) -> dict[str, Any]:
        return {"counts": self.counts(), "level": self.level}

    @classmethod
    def from_storage(cls, header: dict[str, Any], tensors: dict[str, Tensor], meta: dict[str, Any]) -> Mask:
        shapes = {n: tuple(int(d) for d in s) for n, s in header["layers"]}
        return cls.from_indices(tensors, shapes, level=header.get("level", "weight"), meta=meta)


def mask_iou(a: Mask, b: Mask) -> dict[str, Any]:
    """Intersection over union of two masks, per layer and over all layers.

    Two empty layers (or masks) count as identical, IoU 1.0.

    Args:
        a: First mask.
        b: Second mask, on the same layers and shapes.

    Returns:
        ``{"per_layer": {name: iou}, "overall": iou}``.

    Raises:
        EditMismatchError: The masks cover different layers or shapes.
    """
    a.check_compatible(b)
    per_layer: dict[str, float] = {}
    inter_total = union_total = 0
    for name, ma in a.layers.items():
        mb = b.layers[name]
        inter = int((ma & mb).count_nonzero())
        union = int((ma | mb).count_nonzero())
        per_layer[name] = inter / union if union else 1.0
        inter_total += inter
        union_total += union
    return {"per_layer": per_layer, "overall": inter_total / union_total if union_total else 1.0}


def chance_iou(a: Mask, b: Mask) -> float:
    """Expected IoU of two random masks with the per-layer sizes of ``a`` and ``b``.

    Raises:
        EditMismatchError: The masks cover different layers or shapes.
    """
    a.check_compatible(b)
    inter_total = union_total = 0.0
    for name, ma in a.layers.items():
        n = ma.numel()
        ka, kb = int(ma.count_nonzero()), int(b.layers[name].count_nonzero())
        inter = ka * kb / n if n else 0.0
        inter_total += inter
        union_total += ka + kb - inter
    return inter_total / union_total if union_total else 1.0
