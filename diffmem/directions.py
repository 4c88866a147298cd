"""The direction view of the shared memorization subspace: locate it with an SVD, project it out of the FFN.

Memorized prompts push the FFN hidden activations of a denoiser towards a common low-dimensional subspace
(Chavhan et al., 2024). Where a sparse :class:`~diffmem.masks.Mask` zeroes individual weights, this module
describes the subspace itself: for each target layer, the per-prompt signatures of the memorized prompts minus the
base mean are factored with an SVD, and the leading right singular vectors form an orthonormal basis ``U``
(``[in_features, k]``) of the layer's input space.

A :class:`DirectionBasis` is an :class:`~diffmem.edits.Edit` that removes that subspace from the layer's input
side, ``W' = W (I - U U^T)``: the layer then ignores any activation component inside the subspace and acts on
the rest exactly as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .config import LocateConfig
from .edits import Edit, load_edit, register_edit
from .errors import ConfigError, DiffmemError, MaskMismatchError

from .stats import check_same_layers, provenance

if TYPE_CHECKING:
    from .stats import ActivationStats

logger = logging.getLogger(__name__)

__all__ = ["DirectionBasis", "locate_directions", "explained_variance_curves", "subspace_overlap"]

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
            MaskMismatchError: Naming the first layer missing on one side or differing in shape.
        """
        for name, shape in self.shapes.items():
            if name not in other.shapes:
                raise MaskMismatchError(f"direction layer {name!r} is missing from the other basis")
            if other.shapes[name] != shape:
                raise MaskMismatchError(
                    f"direction layer {name!r} has shape {shape} here but {other.shapes[name]} in the other basis"
                )
        for name in other.shapes:
            if name not in self.shapes:
                raise MaskMismatchError(f"direction layer {name!r} of the other basis is missing from this basis")

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

    @classmethod
    def load(cls, path: str | os.PathLike) -> DirectionBasis:
        """Load a basis written by :meth:`save` (see :func:`diffmem.edits.load_edit`)."""
        return load_edit(path, expect=cls)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- locating
def _base_mean(stats_base: ActivationStats, layer: str) -> Tensor:
    """Mean base activation ``[N]``: of the signatures when recorded, else the pooled cond-half mean."""
    if stats_base.signatures is not None and layer in stats_base.signatures:
        sig = stats_base.signatures[layer]
        if sig.shape[0]:
            return sig.double().mean(dim=0)
    s = stats_base.layer_stats(layer, "cond")
    count = int(s.count.sum())
    if count == 0:
        raise DiffmemError(f"the base statistics saw no token in layer {layer!r}")
    return s.sum.double().sum(dim=0) / count


def _deviations(stats_mem: ActivationStats, stats_base: ActivationStats, layer: str) -> Tensor:
    """``D = signatures_mem - base mean``, fp64 ``[P, N]``."""
    if stats_mem.signatures is None:
        raise DiffmemError(
            "the memorized statistics hold no per-prompt signatures; record them with --signatures "
            "(RecordConfig(signatures=True))"
        )
    if layer not in stats_mem.signatures:
        raise DiffmemError(f"the memorized statistics hold no signatures for layer {layer!r}")
    sig = stats_mem.signatures[layer].double().cpu()
    base = _base_mean(stats_base, layer).cpu()
    if sig.shape[1] != base.shape[0]:
        raise DiffmemError(
            f"layer {layer!r} has {sig.shape[1]} features in the memorized signatures but {base.shape[0]} in the "
            "base statistics"
        )
    return sig - base


def _numerical_rank(s: Tensor, shape: tuple[int, int]) -> int:
    """Singular values above the fp32 noise floor of the signatures (as ``torch.linalg.matrix_rank`` for fp32)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def _cumulative_share(s: Tensor) -> list[float]:
    energy = s * s
    total = float(energy.sum())
    if total == 0.0:
        return [0.0] * int(s.numel())
    return [float(x) for x in (energy.cumsum(0) / total).clamp_max(1.0)]


def explained_variance_curves(stats_mem: ActivationStats, stats_base: ActivationStats) -> dict[str, list[float]]:
    """Cumulative share of the memorized-vs-base energy captured by the first k directions, per layer.

    Args:
        stats_mem: Statistics of memorized prompts, with signatures.
        stats_base: Statistics of base prompts on the same layers.

    Returns:
        Layer name -> ``curve`` with ``curve[k - 1]`` the share of ``sum s^2`` in the top ``k`` singular values
        (length ``min(P, N)``; all zeros for a layer without deviation).

    Raises:
        DiffmemError: The memorized statistics have no signatures or the layers differ.
    """
    check_same_layers(stats_mem, stats_base)
    return {
        name: _cumulative_share(torch.linalg.svdvals(_deviations(stats_mem, stats_base, name)))
        for name in stats_mem.layers
    }


def locate_directions(
    stats_mem: ActivationStats, stats_base: ActivationStats, config: LocateConfig | None = None
) -> DirectionBasis:
    """Principal directions of the memorized signatures around the base mean, per layer.

    For each layer ``D = signatures_mem - mu_base`` (``[P, N]``), where ``mu_base`` is the mean of the base
    signatures when recorded, else the cond-half mean over all recorded steps and tokens. The right singular
    vectors of ``D`` (``torch.linalg.svd``) are the directions, ordered by singular value and signed so that the
    memorized prompts project positively on average. ``k = config.rank`` when set, else the smallest ``k`` whose
    cumulative energy share reaches ``config.explained_variance``; either way ``k`` is capped at the numerical
    rank of ``D``. Signatures average the cond half over every recorded step, so ``steps`` and ``half`` of the
    config do not apply.

    Args:
        stats_mem: Statistics of memorized prompts, recorded with signatures.
        stats_base: Statistics of base prompts on the same layers.
        config: ``rank`` and ``explained_variance`` are used; defaults to ``LocateConfig(method="directions")``.

    Returns:
        The basis, with ``meta["explained_variance"]`` (the curves), ``meta["ranks"]`` and
        ``meta["available_rank"]`` per layer.

    Raises:
        DiffmemError: The memorized statistics have no signatures, or the statistics do not match.
    """
    config = config or LocateConfig(method="directions")
    check_same_layers(stats_mem, stats_base)
    layers: dict[str, Tensor] = {}
    curves: dict[str, list[float]] = {}
    available: dict[str, int] = {}
    for name, shape in stats_mem.layers.items():
        d = _deviations(stats_mem, stats_base, name)
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        curves[name] = _cumulative_share(s)
        avail = available[name] = _numerical_rank(s, tuple(d.shape))
        if config.rank is not None:
            k = min(config.rank, avail)
        else:
            reached = [i for i, c in enumerate(curves[name]) if c >= config.explained_variance - 1e-12]
            k = min(reached[0] + 1, avail) if reached else avail
        v = vh[:k].T  # [N, k]
        sign = torch.sign((d @ v).sum(dim=0))
        v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
        layers[name] = v.float()
    if config.rank is not None and any(r < config.rank for r in available.values()):
        logger.info("rank %d exceeds the numerical rank of some layers; capped there", config.rank)
    meta = provenance("directions", config, stats_mem, stats_base)
    meta["base_mean"] = "signatures" if stats_base.signatures is not None else "statistics"
    meta["explained_variance"] = curves
    meta["available_rank"] = available
    meta["ranks"] = {n: int(u.shape[1]) for n, u in layers.items()}
    basis = DirectionBasis(layers, {n: tuple(s) for n, s in stats_mem.layers.items()}, meta=meta)
    logger.info("located directions: ranks %s in %d layers", list(basis.ranks().values()), len(layers))
    return basis


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
        MaskMismatchError: The bases cover different layers or shapes.
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
