"""The direction view of the shared memorization subspace: a basis to project out of the FFN, and overlaps.

Memorized prompts push the FFN hidden activations of a denoiser towards a common low-dimensional subspace
(Chavhan et al., 2024). Where a sparse :class:`~diffmem.edits.Mask` zeroes individual weights, a
:class:`DirectionBasis` describes the subspace itself: for each target layer an orthonormal basis ``U``
(``[in_features, k]``) of the layer's input space, located by
:func:`~diffmem.localization.locate_directions` from the memorized prompts' signatures.

A :class:`DirectionBasis` is an :class:`~diffmem.edits.Edit` that removes that subspace from the layer's input
side, ``W' = W (I - U U^T)``: the layer then ignores any activation component inside the subspace and acts on
the rest exactly as before. :func:`subspace_overlap` compares two bases, the counterpart of the mask IoU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, EditMismatchError
from .base import Edit, register_edit

__all__ = ["DirectionBasis", "subspace_overlap"]

_ORTHONORMAL_ATOL = 1e-4


# --------------------------------------------------------------------------------------------- the basis
@register_edit
@dataclass(eq=False)
class DirectionBasis(Edit):
    """An orthonormal basis of the memorization subspace of each target layer's input.

    Args:
        layers: Layer name (relative to the denoiser) -> fp32 ``[in_features, k]`` with orthonormal columns,
            most important direction first; ``k`` may be 0. Kept in module order.
        shapes: Layer name -> the layer's weight shape ``(out, in)``; same keys as ``layers``.
        meta: Provenance: method, locate config, explained-variance curves, hashes of the prompts.
    """

    format: ClassVar[str] = "diffmem.directions"
    kind: ClassVar[str] = "directions"

    layers: dict[str, Tensor]
    shapes: dict[str, tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {str(n): (int(s[0]), int(s[1])) for n, s in self.shapes.items()}
        if list(shapes) != list(self.layers):
            missing = next((n for n in [*self.layers, *shapes] if n not in shapes or n not in self.layers), None)
            raise ConfigError(f"layers and shapes must name the same layers in the same order (first: {missing!r})")
        layers: dict[str, Tensor] = {}
        for name, u in self.layers.items():
            u = torch.as_tensor(u).detach().to(device="cpu", dtype=torch.float32).contiguous()
            in_f = shapes[name][1]
            if u.dim() != 2 or u.shape[0] != in_f or u.shape[1] > in_f:
                raise ConfigError(
                    f"direction layer {name!r} must be [in_features={in_f}, k <= {in_f}], got {tuple(u.shape)}"
                )
            if u.shape[1]:
                gram = u.T @ u
                err = float((gram - torch.eye(u.shape[1])).abs().max())
                if err > _ORTHONORMAL_ATOL:
                    raise ConfigError(f"direction layer {name!r} is not orthonormal (max |U^T U - I| = {err:.2e})")
            layers[name] = u
        self.layers = layers
        self.shapes = shapes

    def __repr__(self) -> str:
        return f"DirectionBasis(layers={len(self.layers)}, ranks={list(self.ranks().values())})"

    # ----------------------------------------------------------------------------------------- summaries
    def ranks(self) -> dict[str, int]:
        """Return layer name -> number of directions ``k``."""
        return {n: int(u.shape[1]) for n, u in self.layers.items()}

    def num_params_changed(self) -> int:
        """Count the weight entries whose value the projection changes.

        ``W' - W = -(W U) U^T``: column ``j`` of ``W`` changes where row ``j`` of ``U`` is non-zero (for a weight
        in general position). Dense directions therefore change the whole ``out x in`` weight, while directions
        along coordinate axes change only the columns (hidden neurons) they touch, like a neuron mask.

        Returns:
            The number of changed entries over all layers.
        """
        total = 0
        for name, u in self.layers.items():
            if u.shape[1]:
                touched = int(u.ne(0).any(dim=1).sum())
                total += self.shapes[name][0] * touched
        return total

    def truncate(self, k: int) -> DirectionBasis:
        """Keep the first ``k`` directions of every layer (fewer where a layer has fewer).

        Args:
            k: Directions per layer, ``>= 0``.

        Returns:
            A new basis sharing this one's meta (with ``meta["truncated_to"] = k``).
        """
        if k < 0:
            raise ConfigError(f"k={k!r} is invalid: must be >= 0")
        layers = {n: u[:, :k].clone() for n, u in self.layers.items()}
        return DirectionBasis(layers, dict(self.shapes), meta={**self.meta, "truncated_to": int(k)})

    def check_compatible(self, other: DirectionBasis) -> None:
        """Raise if ``other`` does not cover the same layers with the same weight shapes.

        Args:
            other: The basis to compare with.

        Raises:
            EditMismatchError: Naming the first layer missing on one side or differing in shape.
        """
        for name, shape in self.shapes.items():
            if name not in other.shapes:
                raise EditMismatchError(f"direction layer {name!r} is missing from the other basis")
            if other.shapes[name] != shape:
                raise EditMismatchError(
                    f"direction layer {name!r} has shape {shape} here but {other.shapes[name]} in the other basis"
                )
        for name in other.shapes:
            if name not in self.shapes:
                raise EditMismatchError(f"direction layer {name!r} of the other basis is missing from this basis")

    # ----------------------------------------------------------------------------------------- the Edit protocol
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def edit_(self, params: Mapping[str, Tensor]) -> None:
        """``W <- W - (W U) U^T`` in fp32 on each weight's device, for the layers with ``k > 0``."""
        for name, weight in params.items():
            u = self.layers[name]
            if not u.shape[1]:
                continue
            u = u.to(weight.device)
            w = weight.float()
            weight.copy_((w - (w @ u) @ u.T).to(weight.dtype))

    def saved_entries(self, name: str, param: Tensor) -> Any:
        return param.detach().clone() if self.layers[name].shape[1] else None

    def restore_entries(self, name: str, param: Tensor, saved: Any) -> None:
        if saved is not None:
            param.copy_(saved)

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.layers)

    def header(self) -> dict[str, Any]:
        return {"layers": [[n, list(s)] for n, s in self.shapes.items()]}

    def summary(self) -> dict[str, Any]:
        return {"ranks": self.ranks()}

    @classmethod
    def from_storage(cls, header: dict[str, Any], tensors: dict[str, Tensor], meta: dict[str, Any]) -> DirectionBasis:
        shapes = {str(n): (int(s[0]), int(s[1])) for n, s in header["layers"]}
        return cls({n: tensors[n] for n in shapes}, shapes, meta=meta)


def subspace_overlap(a: DirectionBasis, b: DirectionBasis, k: int | None = None) -> dict[str, Any]:
    """Principal-angle overlap of two bases, per layer: the directional counterpart of the mask IoU.

    The cosines of the principal angles are ``svdvals(Ua^T Ub)``. The normalised overlap is their mean square,
    ``||Ua^T Ub||_F^2 / min(ka, kb)``: 1 when one subspace contains the other, 0 when they are orthogonal, and
    ``max(ka, kb) / N`` in expectation for random subspaces (``k / N`` at equal ``k``), reported as ``chance``.
    Two empty layers count as identical (1.0), one empty layer as disjoint (0.0).

    Args:
        a: First basis.
        b: Second basis, on the same layers and shapes.
        k: Compare only the first ``k`` directions of each layer; ``None`` uses all.

    Returns:
        ``{"per_layer": {name: overlap}, "cosines": {name: [...]}, "chance": {name: ...}, "ranks":
        {name: [ka, kb]}, "overall": mean overlap, "chance_overall": mean chance, "k": k}``.

    Raises:
        EditMismatchError: The bases cover different layers or shapes.
    """
    a.check_compatible(b)
    per_layer: dict[str, float] = {}
    cosines: dict[str, list[float]] = {}
    chance: dict[str, float] = {}
    ranks: dict[str, list[int]] = {}
    for name, ua in a.layers.items():
        ub = b.layers[name]
        if k is not None:
            ua, ub = ua[:, :k], ub[:, :k]
        ka, kb = int(ua.shape[1]), int(ub.shape[1])
        n = a.shapes[name][1]
        ranks[name] = [ka, kb]
        if ka == 0 or kb == 0:
            cosines[name] = []
            per_layer[name] = 1.0 if ka == kb else 0.0
            chance[name] = 1.0 if ka == kb else 0.0
            continue
        cos = torch.linalg.svdvals(ua.double().T @ ub.double()).clamp(0.0, 1.0)
        cosines[name] = [float(c) for c in cos]
        per_layer[name] = float((cos * cos).mean())
        chance[name] = max(ka, kb) / n
    count = len(per_layer)
    return {
        "per_layer": per_layer,
        "cosines": cosines,
        "chance": chance,
        "ranks": ranks,
        "overall": sum(per_layer.values()) / count if count else 1.0,
        "chance_overall": sum(chance.values()) / count if count else 1.0,
        "k": k,
    }
