"""The direction view of the shared memorization subspace: locate it with an SVD, project it out of the FFN.

Memorized prompts push the FFN hidden activations of a denoiser towards a common low-dimensional subspace
(Chavhan et al., 2024). Where :mod:`diffmem.locate` turns that into a sparse set of weights to zero, this module
describes the subspace itself: for each target layer, the per-prompt signatures of the memorized prompts minus the
base mean are factored with an SVD, and the leading right singular vectors form an orthonormal basis ``U``
(``[in_features, k]``) of the layer's input space.

The editor removes that subspace from the layer's input side, ``W' = W (I - U U^T)``: the layer then ignores any
activation component inside the subspace and acts on the rest exactly as before. :func:`apply_projection` is the
reversible form (restored bit for bit on exit), :func:`bake_projection` writes it for good and
:func:`export_projected` saves an edited copy with unchanged shapes next to a ``diffmem_manifest.json``.
:func:`compare_with_mask` sets the projection against a sparse mask at matched strength for the demo report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import LocateConfig
from .errors import DiffmemError, ExportError, MaskMismatchError
from .locate import _atomic_write_bytes, _check_inputs, _meta, mask_paths, register_selector
from .prune import _MANIFEST_FORMAT, _sha256_file, _source_of
from .targets import get_denoiser

if TYPE_CHECKING:
    from .evaluate import EvalConfig, EvalResult
    from .locate import Mask
    from .stats import ActivationStats

logger = logging.getLogger(__name__)

__all__ = [
    "DirectionBasis",
    "locate_directions",
    "explained_variance_curves",
    "subspace_overlap",
    "validate_basis",
    "apply_projection",
    "bake_projection",
    "build_projection_manifest",
    "export_projected",
    "compare_with_mask",
]

_FORMAT = "diffmem.directions"
_FORMAT_VERSION = 1
_HEADER_KEY = "diffmem_directions"
_ORTHONORMAL_ATOL = 1e-4


# --------------------------------------------------------------------------------------------- the basis
@dataclass(eq=False)
class DirectionBasis:
    """An orthonormal basis of the memorization subspace of each target layer's input.

    Args:
        layers: Layer name (relative to the denoiser) -> fp32 ``[in_features, k]`` with orthonormal columns,
            most important direction first; ``k`` may be 0. Kept in module order.
        shapes: Layer name -> the layer's weight shape ``(out, in)``; same keys as ``layers``.
        meta: Provenance: method, locate config, explained-variance curves, hashes of the prompts.
    """

    layers: dict[str, Tensor]
    shapes: dict[str, tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {str(n): (int(s[0]), int(s[1])) for n, s in self.shapes.items()}
        if list(shapes) != list(self.layers):
            missing = next((n for n in [*self.layers, *shapes] if n not in shapes or n not in self.layers), None)
            raise ValueError(f"layers and shapes must name the same layers in the same order (first: {missing!r})")
        layers: dict[str, Tensor] = {}
        for name, u in self.layers.items():
            u = torch.as_tensor(u).detach().to(device="cpu", dtype=torch.float32).contiguous()
            in_f = shapes[name][1]
            if u.dim() != 2 or u.shape[0] != in_f or u.shape[1] > in_f:
                raise ValueError(
                    f"direction layer {name!r} must be [in_features={in_f}, k <= {in_f}], got {tuple(u.shape)}"
                )
            if u.shape[1]:
                gram = u.T @ u
                err = float((gram - torch.eye(u.shape[1])).abs().max())
                if err > _ORTHONORMAL_ATOL:
                    raise ValueError(f"direction layer {name!r} is not orthonormal (max |U^T U - I| = {err:.2e})")
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

    def num_total(self) -> int:
        """Return the number of weights of all the basis' layers together."""
        return sum(o * i for o, i in self.shapes.values())

    def truncate(self, k: int) -> DirectionBasis:
        """Keep the first ``k`` directions of every layer (fewer where a layer has fewer).

        Args:
            k: Directions per layer, ``>= 0``.

        Returns:
            A new basis sharing this one's meta (with ``meta["truncated_to"] = k``).
        """
        if k < 0:
            raise ValueError(f"k={k!r} is invalid: must be >= 0")
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

    # ----------------------------------------------------------------------------------------- storage
    def _header(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "layers": [[n, list(s)] for n, s in self.shapes.items()],
        }

    def to_bytes(self) -> bytes:
        """Serialise the directions and shapes (not ``meta``) as deterministic safetensors bytes.

        Returns:
            The safetensors file content that :meth:`save` writes.
        """
        from safetensors.torch import save

        metadata = {_HEADER_KEY: json.dumps(self._header(), sort_keys=True)}
        return save({n: u.contiguous() for n, u in self.layers.items()}, metadata=metadata)

    def sha256(self) -> str:
        """Return the hex sha256 of :meth:`to_bytes`."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``<stem>.safetensors`` and a ``<stem>.json`` sidecar (sorted keys), each written atomically.

        Args:
            path: Stem or either file name, see :func:`diffmem.locate.mask_paths`.

        Returns:
            The path of the safetensors file.
        """
        st_path, json_path = mask_paths(path)
        _atomic_write_bytes(st_path, self.to_bytes())
        sidecar = {
            **self._header(),
            "ranks": self.ranks(),
            "num_params_changed": self.num_params_changed(),
            "num_total": self.num_total(),
            "meta": self.meta,
        }
        text = json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write_bytes(json_path, text.encode("utf-8"))
        logger.info("saved direction basis (ranks %s) to %s", list(self.ranks().values()), st_path)
        return st_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DirectionBasis:
        """Load a basis written by :meth:`save`.

        Args:
            path: Stem or either file name, see :func:`diffmem.locate.mask_paths`.

        Returns:
            The basis; ``meta`` is empty when the JSON sidecar is missing (a warning is logged).

        Raises:
            DiffmemError: The safetensors file is missing, unreadable or not a diffmem direction basis, its
                tensors do not match its header, or the sidecar is not valid JSON.
        """
        from safetensors import safe_open

        st_path, json_path = mask_paths(path)
        if not st_path.is_file():
            raise DiffmemError(f"direction basis file {st_path} does not exist")
        try:
            with safe_open(str(st_path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_HEADER_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            header = json.loads(raw) if raw else {}
        except Exception as err:  # safetensors raises its own error types
            raise DiffmemError(f"cannot read direction basis file {st_path}: {err}") from None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise DiffmemError(f"{st_path} is not a diffmem direction basis (its header lacks {_HEADER_KEY!r})")
        meta: dict[str, Any] = {}
        if json_path.is_file():
            try:
                sidecar = json.loads(json_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DiffmemError(f"cannot read {json_path}: {err}") from None
            meta = sidecar.get("meta", {}) if isinstance(sidecar, dict) else {}
        else:
            logger.warning("direction basis sidecar %s is missing; loading the basis without its metadata", json_path)
        try:
            shapes = {str(n): (int(s[0]), int(s[1])) for n, s in header["layers"]}
            layers = {n: tensors[n] for n in shapes}
            return cls(layers, shapes, meta=meta)
        except KeyError as err:
            raise DiffmemError(f"{st_path} lacks the directions of layer {err}") from None
        except (TypeError, ValueError) as err:
            raise DiffmemError(f"{st_path} is malformed: {err}") from None


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


def _check_layers(stats_mem: ActivationStats, stats_base: ActivationStats) -> None:
    for name, shape in stats_mem.layers.items():
        if name not in stats_base.layers:
            raise DiffmemError(f"layer {name!r} of the memorized statistics is missing from the base statistics")
        if tuple(stats_base.layers[name]) != tuple(shape):
            raise DiffmemError(
                f"layer {name!r} has shape {tuple(shape)} in the memorized statistics "
                f"but {tuple(stats_base.layers[name])} in the base statistics"
            )


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
    _check_layers(stats_mem, stats_base)
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
    _check_layers(stats_mem, stats_base)
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
    meta = _meta("directions", config, stats_mem, stats_base)
    meta["base_mean"] = "signatures" if stats_base.signatures is not None else "statistics"
    meta["explained_variance"] = curves
    meta["available_rank"] = available
    meta["ranks"] = {n: int(u.shape[1]) for n, u in layers.items()}
    basis = DirectionBasis(layers, {n: tuple(s) for n, s in stats_mem.layers.items()}, meta=meta)
    logger.info("located directions: ranks %s in %d layers", list(basis.ranks().values()), len(layers))
    return basis


def _select_directions(
    stats_mem: ActivationStats, stats_base: ActivationStats, weights: Mapping[str, Tensor], config: LocateConfig
) -> DirectionBasis:
    """The ``"directions"`` locate method: check the statistics against the model, then :func:`locate_directions`."""
    _check_inputs(stats_mem, stats_base, weights)
    return locate_directions(stats_mem, stats_base, config)


register_selector("directions", _select_directions)


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


# --------------------------------------------------------------------------------------------- editing
def validate_basis(pipe_or_denoiser: Any, basis: DirectionBasis) -> dict[str, Tensor]:
    """Check that every basis layer exists in the denoiser with the recorded weight shape; touch nothing.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser.
        basis: The basis to check.

    Returns:
        Layer name -> the model's weight parameter, in basis order.

    Raises:
        MaskMismatchError: Naming the first basis layer that is missing from the model or differs in shape.
    """
    denoiser = get_denoiser(pipe_or_denoiser)
    modules = dict(denoiser.named_modules())
    weights: dict[str, Tensor] = {}
    for name, shape in basis.shapes.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None) if module is not None else None
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise MaskMismatchError(
                f"direction layer {name!r} is not a layer with a 2-D weight in the model ({type(denoiser).__name__})"
            )
        model_shape = (int(weight.shape[0]), int(weight.shape[1]))
        if model_shape != shape:
            raise MaskMismatchError(f"direction layer {name!r} has shape {shape} but the model's is {model_shape}")
        weights[name] = weight
    return weights


def _project_(weights: Mapping[str, Tensor], basis: DirectionBasis) -> None:
    """``W <- W - (W U) U^T`` in fp32 on each weight's device, for the layers with ``k > 0``."""
    with torch.no_grad():
        for name, weight in weights.items():
            u = basis.layers[name]
            if not u.shape[1]:
                continue
            u = u.to(weight.device)
            w = weight.float()
            weight.copy_((w - (w @ u) @ u.T).to(weight.dtype))


@contextlib.contextmanager
def apply_projection(pipe_or_denoiser: Any, basis: DirectionBasis) -> Iterator[Any]:
    """Project the basis out of the target weights' input side inside a ``with`` block; restore them on exit.

    The basis is validated before anything changes. On exit (also after an exception) every edited weight is
    copied back from a clone taken on entry, bit for bit.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser.
        basis: The directions to remove, ``W' = W (I - U U^T)``.

    Returns:
        A context manager yielding ``pipe_or_denoiser``.

    Raises:
        MaskMismatchError: The basis does not fit the model (nothing is changed).
    """
    ranks = basis.ranks()
    weights = {n: w for n, w in validate_basis(pipe_or_denoiser, basis).items() if ranks[n]}
    originals = {name: w.detach().clone() for name, w in weights.items()}
    try:
        _project_(weights, basis)
        logger.debug("applied projection to %d layers (ranks %s)", len(weights), list(ranks.values()))
        yield pipe_or_denoiser
    finally:
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(originals[name])
        logger.debug("restored %d projected layers", len(weights))


def bake_projection(pipe_or_denoiser: Any, basis: DirectionBasis) -> int:
    """Project the basis out of the target weights permanently.

    Args:
        pipe_or_denoiser: A diffusers pipeline or its denoiser.
        basis: The directions to remove.

    Returns:
        The number of changed weight entries (:meth:`DirectionBasis.num_params_changed`).

    Raises:
        MaskMismatchError: The basis does not fit the model (nothing is changed).
    """
    weights = validate_basis(pipe_or_denoiser, basis)
    _project_(weights, basis)
    n = basis.num_params_changed()
    logger.info("baked projection: %d weights changed in %d layers", n, sum(1 for k in basis.ranks().values() if k))
    return n


def build_projection_manifest(
    basis: DirectionBasis,
    *,
    source: str | None = None,
    basis_path: str | os.PathLike | None = None,
    config: dict | None = None,
    component: str | None = None,
) -> dict[str, Any]:
    """The provenance record written as ``diffmem_manifest.json`` beside a projected export.

    Args:
        basis: The basis baked into the export.
        source: The source model (path or hub id).
        basis_path: The basis file; its sha256 is recorded. Without it, the sha256 of
            :meth:`DirectionBasis.to_bytes` is recorded, which equals the file's when saved by diffmem.
        config: Settings to record; defaults to the locate config stored in the basis' meta.
        component: ``"pipeline"`` or the class name of an exported bare denoiser.

    Returns:
        A JSON-serialisable dictionary.

    Raises:
        ExportError: ``basis_path`` does not name an existing basis file.
    """
    from . import __version__

    if basis_path is not None:
        st_path = mask_paths(basis_path)[0]
        if not st_path.is_file():
            raise ExportError(f"direction basis file {st_path} does not exist")
        basis_sha, basis_file = _sha256_file(st_path), str(st_path)
    else:
        basis_sha, basis_file = basis.sha256(), None
    changed, total = basis.num_params_changed(), basis.num_total()
    return {
        "format": _MANIFEST_FORMAT,
        "edit": "projection",
        "source": source,
        "component": component,
        "basis_sha256": basis_sha,
        "basis_path": basis_file,
        "ranks": basis.ranks(),
        "num_params_changed": changed,
        "num_ffn_weights": total,
        "fraction_changed": changed / total if total else 0.0,
        "diffmem_version": __version__,
        "config": config if config is not None else basis.meta.get("config"),
    }


def export_projected(
    pipe: Any,
    basis: DirectionBasis,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    source: str | None = None,
    basis_path: str | os.PathLike | None = None,
    config: dict | None = None,
) -> Path:
    """Save a projected copy of a pipeline (or of a bare denoiser) with a ``diffmem_manifest.json``.

    Shapes are unchanged, so the export loads with a plain ``from_pretrained``. The projection is applied with
    :func:`apply_projection` around ``save_pretrained``, leaving the in-memory model as it was. Files go to a
    temporary folder beside ``out_dir`` that replaces it only once complete; on failure ``out_dir`` is left as it
    was.

    Args:
        pipe: A ``DiffusionPipeline``, or a diffusers ``ModelMixin`` denoiser, which is saved alone.
        basis: The directions to remove, relative to the denoiser.
        out_dir: Output folder; must not exist unless ``overwrite``.
        overwrite: Replace an existing ``out_dir``.
        source: Source model recorded in the manifest; defaults to the model's ``_name_or_path``.
        basis_path: Basis file whose sha256 is recorded (see :func:`build_projection_manifest`).
        config: Settings recorded in the manifest.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: ``out_dir`` exists without ``overwrite``, ``pipe`` cannot be saved, or writing failed.
        MaskMismatchError: The basis does not fit the model.
    """
    from .prune import check_out_dir, export_component, write_edited

    out_dir = Path(out_dir)
    component = export_component(pipe)
    check_out_dir(out_dir, overwrite)
    validate_basis(pipe, basis)
    manifest = build_projection_manifest(
        basis, source=source or _source_of(pipe), basis_path=basis_path, config=config, component=component
    )
    write_edited(pipe, out_dir, lambda: apply_projection(pipe, basis), manifest)
    logger.info(
        "exported %s with ranks %s projected out (%d weights changed) to %s",
        component, list(basis.ranks().values()), manifest["num_params_changed"], out_dir,
    )
    return out_dir


# --------------------------------------------------------------------------------------------- mask vs projection
def _split_mean(result: EvalResult, split: str, key: str) -> float | None:
    values = [r[key] for r in result.rows if r["split"] == split and r.get(key) is not None]
    return float(sum(values) / len(values)) if values else None


def _summary_value(summary: Mapping[str, Any], split: str, key: str) -> float | None:
    value = (summary.get(split) or {}).get(key)
    return None if value is None else float(value)


def compare_with_mask(
    pipe: Any,
    stats_mem: ActivationStats,
    stats_base: ActivationStats,
    stats_a: ActivationStats,
    stats_b: ActivationStats,
    mask: Mask,
    entries: Sequence[Any],
    ecfg: EvalConfig,
    scorer: Any,
    before: EvalResult,
    *,
    attack: tuple | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    target_replication: float = 0.1,
    ranks: Sequence[int] = (1, 2, 4, 8, 16),
    mask_after: EvalResult | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Set the low-rank projection editor against a sparse mask, both tuned to the same target on the same split.

    The projection strength ``k`` (directions per layer, capped at each layer's rank) is chosen on the
    ``locate`` split only: the smallest ``k`` in ``ranks`` whose ``locate`` replication rate is at most
    ``target_replication`` (else the ``k`` with the lowest rate), with at most 4 seeds per prompt. All entries
    are then evaluated under the chosen projection, against ``before``.

    Args:
        pipe: The pipeline the mask was located on.
        stats_mem: Statistics of the memorized ``locate`` prompts, with signatures.
        stats_base: Statistics of the base prompts.
        stats_a: Statistics of one half of the memorized prompts, with signatures.
        stats_b: Statistics of the other, disjoint half.
        mask: The sparse mask chosen by the demo.
        entries: Manifest entries (all splits).
        ecfg: Evaluation settings of the demo.
        scorer: Similarity scorer of the evaluation.
        before: The unedited evaluation of ``entries`` with ``ecfg``.
        attack: ``(attack_entries, attack_config, attack_scorer, references, calibration_prompts, call_kwargs)``
            to run the extraction attack under the projection.
        out: Folder for ``directions.safetensors`` and the attack's ``attack_projection`` output.
        progress: Show progress bars.
        target_replication: Target ``locate`` replication rate of the sweep.
        ranks: Values of ``k`` tried, ascending.
        mask_after: The evaluation of ``entries`` under ``mask`` (an ``EvalResult`` or its ``summary()``);
            evaluated here when not given.

    Returns:
        ``explained_variance``, ``ranks`` (chosen, per layer), ``k``, ``sweep``, ``overlap_subsets``,
        ``comparison`` (a flat mask-vs-projection table), ``summary_after``, ``headline``, and ``attack`` and
        ``basis_path`` when computed.
    """
    from .evaluate import evaluate
    from .prune import apply_mask

    ranks = sorted({int(k) for k in ranks})
    if not ranks or ranks[0] < 1:
        raise ValueError(f"ranks={ranks!r} is invalid: give at least one k >= 1")
    curves = explained_variance_curves(stats_mem, stats_base)
    full = locate_directions(stats_mem, stats_base, LocateConfig(method="directions", rank=ranks[-1]))

    # 1. strength chosen on the locate split only
    locate_entries = [e for e in entries if e.split == "locate"]
    sweep_cfg = replace(ecfg, num_seeds=min(ecfg.num_seeds, 4), seed=ecfg.seed + 1000)
    sweep: list[dict[str, Any]] = []
    if locate_entries:
        for k in ranks:
            candidate = full.truncate(k)
            with apply_projection(pipe, candidate), torch.no_grad():
                res = evaluate(pipe, locate_entries, sweep_cfg, scorer, progress=False, desc=f"sweep k={k}")
            rep = _split_mean(res, "locate", "replication_rate")
            sweep.append({"k": k, "ranks": candidate.ranks(), "parameters_changed": candidate.num_params_changed(),
                          "locate_replication": rep})
            logger.info("projection sweep k=%d: locate replication %s", k, rep)
        scored = [r for r in sweep if r["locate_replication"] is not None]
        ok = [r for r in scored if r["locate_replication"] <= target_replication]
        chosen_k = (ok[0] if ok else min(scored, key=lambda r: r["locate_replication"]))["k"] if scored else ranks[-1]
    else:
        logger.warning("no 'locate' entries to choose the projection strength on; using k=%d", ranks[-1])
        chosen_k = ranks[-1]
    basis = full.truncate(chosen_k)
    result: dict[str, Any] = {"explained_variance": curves, "ranks": basis.ranks(), "k": chosen_k, "sweep": sweep}
    if out is not None:
        result["basis_path"] = str(basis.save(Path(out) / "directions.safetensors"))

    # 2. every split under the chosen projection, and the attack
    with apply_projection(pipe, basis), torch.no_grad():
        after = evaluate(pipe, entries, ecfg, scorer, baseline=before, progress=progress, desc="projection")
        attack_summary = None
        if attack is not None:
            from .attack import extraction_attack

            att_entries, acfg, att_scorer, refs, calib, call = attack
            att = extraction_attack(
                pipe, [e.prompt for e in att_entries], acfg, att_scorer, references=refs,
                calibration_prompts=calib, call_kwargs=call,
                out_dir=None if out is None else Path(out) / "attack_projection", progress=progress,
            )
            attack_summary = att.summary()
    if attack_summary is not None:
        result["attack"] = attack_summary

    # 3. subspaces located from disjoint halves, at the chosen k
    cfg_k = LocateConfig(method="directions", rank=chosen_k)
    overlap = subspace_overlap(locate_directions(stats_a, stats_base, cfg_k),
                               locate_directions(stats_b, stats_base, cfg_k), k=chosen_k)

    # 4. the mask's numbers on the same entries
    if mask_after is None:
        with apply_mask(pipe, mask), torch.no_grad():
            mask_after = evaluate(pipe, entries, ecfg, scorer, baseline=before, progress=progress, desc="mask")
    mask_summary = mask_after.summary() if hasattr(mask_after, "summary") else dict(mask_after)
    summary_after = after.summary()
    comparison = {
        "heldout_replication_before": _summary_value(before.summary(), "heldout", "replication_rate"),
        "mask_heldout_replication_after": _summary_value(mask_summary, "heldout", "replication_rate"),
        "projection_heldout_replication_after": _summary_value(summary_after, "heldout", "replication_rate"),
        "mask_nonmem_drift_similarity": _summary_value(mask_summary, "nonmem", "drift_similarity"),
        "projection_nonmem_drift_similarity": _summary_value(summary_after, "nonmem", "drift_similarity"),
        "mask_parameters_changed": mask.num_masked(),
        "projection_parameters_changed": basis.num_params_changed(),
        "projection_verified_extractions_after": None if attack_summary is None
        else attack_summary["num_verified_prompts"],
    }
    result.update(
        overlap_subsets=overlap,
        comparison=comparison,
        summary_after=summary_after,
        headline={
            "heldout_replication_after": comparison["projection_heldout_replication_after"],
            "parameters_changed": comparison["projection_parameters_changed"],
            "k": chosen_k,
        },
    )
    logger.info(
        "projection k=%d: held-out replication %s (mask %s), %d parameters changed (mask %d), subset overlap %.3f",
        chosen_k, comparison["projection_heldout_replication_after"], comparison["mask_heldout_replication_after"],
        comparison["projection_parameters_changed"], comparison["mask_parameters_changed"], overlap["overall"],
    )
    return result
