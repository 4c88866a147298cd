"""Locate memorization: pure scoring functions, mask selection and overlap between masks.

The weight-level rule follows Chavhan et al. (2024): at each of the first ``tau`` denoising steps and for each
feed-forward output layer, score every weight with a Wanda-style importance ``|W_ij| * ||X_j||`` once on the
statistics of memorized prompts and once on those of base prompts. In each output row the top ``ratio`` of the
memorized scores are candidates, and a candidate is kept where its memorized score exceeds its base score. The
selections of the steps are then united (optionally requiring a minimum number of steps).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import LocateConfig
from .errors import DiffmemError, MaskMismatchError
from .targets import get_denoiser

if TYPE_CHECKING:
    from .stats import ActivationStats

logger = logging.getLogger(__name__)

__all__ = [
    "Mask",
    "MASK_LEVELS",
    "wanda_scores",
    "stats_act_norm",
    "neuron_contrast",
    "select_wanda",
    "select_neurons",
    "locate",
    "mask_iou",
    "register_selector",
    "mask_paths",
]

MASK_LEVELS = ("weight", "neuron")
_FORMAT = "diffmem.mask"
_FORMAT_VERSION = 1
_HEADER_KEY = "diffmem_mask"


def mask_paths(path: str | Path) -> tuple[Path, Path]:
    """Return the ``(safetensors, json)`` file pair of a mask saved at ``path``.

    ``path`` may name either file or their common stem: ``out/mask``, ``out/mask.safetensors`` and
    ``out/mask.json`` all give ``(out/mask.safetensors, out/mask.json)``.

    Args:
        path: Mask path or stem.

    Returns:
        The tensor file and its JSON sidecar.
    """
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then move it into place with ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(eq=False)
class Mask:
    """A set of feed-forward weights to zero, per target layer.

    Args:
        layers: Layer name (relative to the denoiser) -> bool tensor ``[out, in]`` shaped like the layer's
            weight; ``True`` marks a weight to zero. Kept in module order.
        level: ``"weight"`` (any pattern) or ``"neuron"`` (whole input columns, i.e. FFN hidden neurons).
        meta: Provenance: method, locate config, model id, hashes of the prompts behind the statistics.
    """

    layers: dict[str, Tensor]
    level: str = "weight"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in MASK_LEVELS:
            raise ValueError(f"level={self.level!r} is invalid: choose one of {', '.join(MASK_LEVELS)}")
        layers: dict[str, Tensor] = {}
        for name, m in self.layers.items():
            m = torch.as_tensor(m)
            if m.dim() != 2:
                raise ValueError(f"mask layer {name!r} must be 2-D [out, in], got shape {tuple(m.shape)}")
            m = m.detach().to(device="cpu", dtype=torch.bool)
            if self.level == "neuron" and not torch.equal(m.any(dim=0), m.all(dim=0)):
                raise ValueError(f"mask layer {name!r} has level 'neuron' but masks partial columns")
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
            MaskMismatchError: A layer has no indices, or an index falls outside its layer.
        """
        layers: dict[str, Tensor] = {}
        for name, (out_f, in_f) in shapes.items():
            if name not in indices:
                raise MaskMismatchError(f"mask layer {name!r} has a shape but no indices")
            idx = torch.as_tensor(indices[name]).to(torch.int64).flatten()
            numel = int(out_f) * int(in_f)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise MaskMismatchError(f"mask layer {name!r} has indices outside its shape ({out_f}, {in_f})")
            flat = torch.zeros(numel, dtype=torch.bool)
            flat[idx] = True
            layers[name] = flat.view(int(out_f), int(in_f))
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
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Return layer name -> weight shape ``(out, in)``, in layer order."""
        return {n: (int(m.shape[0]), int(m.shape[1])) for n, m in self.layers.items()}

    def counts(self) -> dict[str, int]:
        """Return layer name -> number of masked weights."""
        return {n: int(m.count_nonzero()) for n, m in self.layers.items()}

    def num_masked(self) -> int:
        """Return the number of masked weights over all layers."""
        return sum(self.counts().values())

    def num_total(self) -> int:
        """Return the number of weights of all masked layers together."""
        return sum(m.numel() for m in self.layers.values())

    def fraction(self) -> float:
        """Return the masked share of the weights of the mask's layers (0 for a mask without layers)."""
        total = self.num_total()
        return self.num_masked() / total if total else 0.0

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
            MaskMismatchError: Naming the first layer that is missing on one side or differs in shape.
        """
        mine, theirs = self.shapes(), other.shapes()
        for name, shape in mine.items():
            if name not in theirs:
                raise MaskMismatchError(f"mask layer {name!r} is missing from the other mask")
            if theirs[name] != shape:
                raise MaskMismatchError(
                    f"mask layer {name!r} has shape {shape} here but {theirs[name]} in the other mask"
                )
        for name in theirs:
            if name not in mine:
                raise MaskMismatchError(f"mask layer {name!r} of the other mask is missing from this mask")

    # ----------------------------------------------------------------------------------------- storage
    def _header(self) -> dict[str, str]:
        # A single metadata entry: safetensors writes metadata keys in no fixed order, and the bytes must be
        # deterministic for their sha256 to identify the mask.
        header = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "level": self.level,
            "layers": [[n, list(s)] for n, s in self.shapes().items()],
        }
        return {_HEADER_KEY: json.dumps(header, sort_keys=True)}

    def to_bytes(self) -> bytes:
        """Serialise the mask content (indices, shapes, level; not ``meta``) as safetensors bytes.

        The bytes are deterministic, so their sha256 identifies the mask; :meth:`save` writes exactly them.

        Returns:
            The safetensors file content.
        """
        from safetensors.torch import save

        return save({n: idx.contiguous() for n, idx in self.indices().items()}, metadata=self._header())

    def sha256(self) -> str:
        """Return the hex sha256 of :meth:`to_bytes`."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Save as ``<stem>.safetensors`` (int64 flat indices per layer) and ``<stem>.json`` (shapes, level, meta).

        Both files are written atomically (temporary file, then ``os.replace``).

        Args:
            path: Stem or either file name, see :func:`mask_paths`.

        Returns:
            The path of the safetensors file.
        """
        st_path, json_path = mask_paths(path)
        _atomic_write_bytes(st_path, self.to_bytes())
        sidecar = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "level": self.level,
            "layers": [[n, list(s)] for n, s in self.shapes().items()],
            "counts": self.counts(),
            "num_masked": self.num_masked(),
            "num_total": self.num_total(),
            "meta": self.meta,
        }
        text = json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write_bytes(json_path, text.encode("utf-8"))
        logger.info("saved mask (%d weights in %d layers) to %s", self.num_masked(), len(self.layers), st_path)
        return st_path

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """Load a mask written by :meth:`save`.

        Args:
            path: Stem or either file name, see :func:`mask_paths`.

        Returns:
            The mask; ``meta`` is empty when the JSON sidecar is missing.

        Raises:
            DiffmemError: The safetensors file is missing or is not a diffmem mask.
        """
        from safetensors import safe_open

        st_path, json_path = mask_paths(path)
        if not st_path.is_file():
            raise DiffmemError(f"mask file {st_path} does not exist")
        try:
            with safe_open(str(st_path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_HEADER_KEY)
                indices = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise DiffmemError(f"cannot read mask file {st_path}: {err}") from None
        header = json.loads(raw) if raw else {}
        if header.get("format") != _FORMAT:
            raise DiffmemError(f"{st_path} is not a diffmem mask (its header lacks {_HEADER_KEY!r})")
        shapes = {n: (int(s[0]), int(s[1])) for n, s in header["layers"]}
        meta: dict[str, Any] = {}
        if json_path.is_file():
            meta = json.loads(json_path.read_text(encoding="utf-8")).get("meta", {})
        else:
            logger.warning("mask sidecar %s is missing; loading the mask without its metadata", json_path)
        return cls.from_indices(indices, shapes, level=header.get("level", "weight"), meta=meta)


# --------------------------------------------------------------------------------------------- scoring
def wanda_scores(weight: Tensor, act_norm: Tensor) -> Tensor:
    """Wanda-style importance of each weight: ``|W_ij| * ||X_j||``.

    Args:
        weight: Linear weight ``[out, in]``.
        act_norm: Input-feature norms ``[in]`` (broadcast over rows).

    Returns:
        Scores ``[out, in]`` in fp32.
    """
    return weight.detach().float().abs() * act_norm.to(device=weight.device, dtype=torch.float32).unsqueeze(0)


def stats_act_norm(stats: ActivationStats, layer: str, half: str = "cond") -> Tensor:
    """Per-step input-feature norm ``sqrt(normsq / count)`` of one layer, with CFG halves chosen by ``half``.

    ``half="both"`` adds the token counts and the normalised squared sums of both halves before the square root,
    so that the two halves are pooled rather than averaged.

    Args:
        stats: Recorded statistics.
        layer: Layer name.
        half: ``"cond"``, ``"uncond"`` or ``"both"``.

    Returns:
        fp32 tensor ``[T, in]``.

    Raises:
        DiffmemError: The statistics lack the requested half or layer.
    """
    if half != "both":
        return stats.act_norm(layer, half).float()
    cond, uncond = stats.layer_stats(layer, "cond"), stats.layer_stats(layer, "uncond")
    count = (cond.count + uncond.count.to(cond.count.device)).clamp_min(1).unsqueeze(1).to(torch.float32)
    normsq = cond.normsq.float() + uncond.normsq.float().to(cond.normsq.device)
    return (normsq / count).sqrt()


def _ceil(x: float) -> int:
    """``ceil`` that ignores float noise, so that ``0.07 * 100`` gives 7, not 8."""
    return math.ceil(round(x, 9))


def _resolve_steps(stats_mem: ActivationStats, stats_base: ActivationStats, config: LocateConfig) -> int:
    tau = config.steps if config.steps is not None else min(stats_mem.steps, stats_base.steps)
    for label, st in (("memorized", stats_mem), ("base", stats_base)):
        if st.steps < tau:
            raise DiffmemError(
                f"LocateConfig.steps={tau} but the {label} statistics hold only {st.steps} recorded steps; "
                "record more steps or lower steps"
            )
    return tau


def _check_inputs(
    stats_mem: ActivationStats, stats_base: ActivationStats, weights: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Check that both statistics and the weights describe the same layers; return weights in layer order."""
    for name, shape in stats_mem.layers.items():
        if name not in stats_base.layers:
            raise DiffmemError(f"layer {name!r} of the memorized statistics is missing from the base statistics")
        if tuple(stats_base.layers[name]) != tuple(shape):
            raise DiffmemError(
                f"layer {name!r} has shape {tuple(shape)} in the memorized statistics "
                f"but {tuple(stats_base.layers[name])} in the base statistics"
            )
    for name in stats_base.layers:
        if name not in stats_mem.layers:
            raise DiffmemError(f"layer {name!r} of the base statistics is missing from the memorized statistics")
    ordered: dict[str, Tensor] = {}
    for name, shape in stats_mem.layers.items():
        if name not in weights:
            raise MaskMismatchError(f"statistics layer {name!r} is not in the model")
        w = weights[name]
        if tuple(w.shape) != tuple(shape):
            raise MaskMismatchError(
                f"statistics layer {name!r} has shape {tuple(shape)} but the model's is {tuple(w.shape)}"
            )
        ordered[name] = w
    return ordered


def _meta(method: str, config: LocateConfig, stats_mem: ActivationStats, stats_base: ActivationStats) -> dict:
    from . import __version__

    def summary(st: ActivationStats) -> dict[str, Any]:
        keys = ("prompts_sha256", "num_prompts", "model_id")
        return {k: st.meta[k] for k in keys if k in st.meta}

    meta: dict[str, Any] = {
        "method": method,
        "config": config.to_dict(),
        "stats_mem": summary(stats_mem),
        "stats_base": summary(stats_base),
        "diffmem_version": __version__,
    }
    if stats_mem.meta.get("model_id") is not None:
        meta["model_id"] = stats_mem.meta["model_id"]
    return meta


class _RowTopK:
    """Exact per-row top-k of ``|W| * a`` for a batch of vectors ``a``, reading few columns where a bound allows.

    For each row the ``m`` columns of largest ``|W|`` are fixed once; for each ``a`` the ``m`` columns of
    largest ``a`` are added. A column outside both sets scores at most ``floor_row * floor_a`` (the smallest
    ``|W|`` among the row's candidates times the smallest ``a`` among the added columns). Where the k-th best
    candidate beats that bound, the candidates' top-k is the row's top-k; other rows are ranked in full.
    Float multiplication is monotone, so the bound also holds for the rounded scores. Steps are batched to keep
    the number of kernel launches (and thread synchronisations) small.

    Args:
        absw: ``|W|``, fp32 ``[out, in]``.
        k: Columns kept per row.
    """

    def __init__(self, absw: Tensor, k: int) -> None:
        self.absw, self.k = absw, k
        out_f, in_f = absw.shape
        self.m = m = max(2 * k, in_f // 16)
        self.fast = 4 * m <= in_f
        self.width = 2 * m if self.fast else in_f
        if not self.fast:
            return
        cand_absw, cand_idx = torch.topk(absw, m, dim=1, sorted=False)
        self.cand_absw, self.cand_idx = cand_absw, cand_idx
        self.row_floor = cand_absw.amin(dim=1)
        self.absw_t = absw.t().contiguous()
        in_cand = torch.zeros(out_f, in_f, dtype=torch.bool, device=absw.device).scatter_(1, cand_idx, True)
        self.in_cand_t = in_cand.t().contiguous()

    def __call__(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Rank the rows for each vector of ``a``.

        Args:
            a: ``[T, in]``, one vector per step.

        Returns:
            The top-k scores and their columns, each ``[T, out, k]`` (unsorted within a row).
        """
        steps = a.shape[0]
        if not self.fast:
            return torch.topk(self.absw.unsqueeze(0) * a.unsqueeze(1), self.k, dim=2, sorted=False)
        m, out_f = self.m, self.absw.shape[0]
        a_top, a_idx = torch.topk(a, m, dim=1, sorted=False)
        scores = torch.empty(steps, out_f, 2 * m, dtype=self.absw.dtype, device=self.absw.device)
        a_cand = a.index_select(1, self.cand_idx.flatten()).view(steps, out_f, m)
        torch.mul(self.cand_absw.unsqueeze(0), a_cand, out=scores[:, :, :m])
        flat_idx = a_idx.flatten()
        extra = self.absw_t.index_select(0, flat_idx).view(steps, m, out_f).mul_(a_top.unsqueeze(2))
        in_cand = self.in_cand_t.index_select(0, flat_idx).view(steps, m, out_f)
        extra.masked_fill_(in_cand, float("-inf"))  # already among the row's candidates
        scores[:, :, m:] = extra.transpose(1, 2)
        cols = torch.empty(steps, out_f, 2 * m, dtype=torch.int64, device=self.absw.device)
        cols[:, :, :m] = self.cand_idx
        cols[:, :, m:] = a_idx.unsqueeze(1)
        values, pos = torch.topk(scores, self.k, dim=2, sorted=False)
        cols = cols.gather(2, pos)
        bound = self.row_floor.unsqueeze(0) * a_top.amin(dim=1, keepdim=True)
        step_idx, row_idx = torch.nonzero(values.amin(dim=2) <= bound).unbind(1)
        if step_idx.numel():
            redo = torch.topk(self.absw[row_idx] * a[step_idx], self.k, dim=1, sorted=False)
            values[step_idx, row_idx], cols[step_idx, row_idx] = redo
        return values, cols


_CHUNK_ELEMENTS = 1 << 23  # scores held at once when ranking several steps together (32 MiB in fp32)


def select_wanda(
    stats_mem: ActivationStats,
    stats_base: ActivationStats,
    weights: Mapping[str, Tensor],
    config: LocateConfig,
) -> Mask:
    """Chavhan et al.'s weight mask: per-row top-``ratio`` Wanda scores that beat the base scores, over steps.

    For each layer and step ``t < tau``: ``S_mem = |W| * act_norm_mem[t]`` and ``S_base = |W| * act_norm_base[t]``;
    in each row the ``ceil(ratio * in)`` largest ``S_mem`` are candidates and those with ``S_mem > S_base`` are
    selected. A weight is masked when selected in at least ``max(1, ceil(min_step_fraction * tau))`` steps.
    Work is done on the weights' device.

    Args:
        stats_mem: Statistics of memorized prompts.
        stats_base: Statistics of base (non-memorized) prompts.
        weights: Layer name -> weight ``[out, in]`` of every layer of the statistics.
        config: ``ratio``, ``steps``, ``min_step_fraction`` and ``half`` are used.

    Returns:
        A ``"weight"``-level mask in the statistics' layer order.
    """
    ordered = _check_inputs(stats_mem, stats_base, weights)
    tau = _resolve_steps(stats_mem, stats_base, config)
    min_count = max(1, _ceil(config.min_step_fraction * tau))
    layers: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, w in ordered.items():
            absw = w.detach().float().abs()
            out_f, in_f = absw.shape
            k = min(in_f, max(1, _ceil(config.ratio * in_f)))
            a_mem = stats_act_norm(stats_mem, name, config.half)[:tau].to(absw.device)
            a_base = stats_act_norm(stats_base, name, config.half)[:tau].to(absw.device)
            hits = torch.zeros(out_f, in_f, dtype=torch.int32, device=absw.device)
            row_topk = _RowTopK(absw, k)
            chunk = max(1, _CHUNK_ELEMENTS // (out_f * row_topk.width))
            for t0 in range(0, tau, chunk):
                a_chunk, b_chunk = a_mem[t0 : t0 + chunk], a_base[t0 : t0 + chunk]
                n = a_chunk.shape[0]
                top_mem, top_idx = row_topk(a_chunk)  # [n, out, k]
                top_base = absw.unsqueeze(0).expand(n, -1, -1).gather(2, top_idx)
                top_base.mul_(b_chunk.gather(1, top_idx.view(n, -1)).view(n, out_f, k))
                beats = (top_mem > top_base).to(torch.int32).transpose(0, 1).reshape(out_f, -1)
                hits.scatter_add_(1, top_idx.transpose(0, 1).reshape(out_f, -1), beats)
            layers[name] = (hits >= min_count).cpu()
    mask = Mask(layers, level="weight", meta=_meta("wanda", config, stats_mem, stats_base))
    if logger.isEnabledFor(logging.INFO):
        logger.info("wanda mask: %d weights (%.4f%% of %d)", mask.num_masked(), 100 * mask.fraction(), mask.num_total())
    return mask


def neuron_contrast(weight: Tensor, act_mem: Tensor, act_base: Tensor) -> Tensor:
    """Contrast of each hidden neuron: ``mean_t(act_mem[t] - act_base[t]) * ||W[:, j]||_2``.

    Args:
        weight: Linear weight ``[out, in]``.
        act_mem: Memorized input-feature norms ``[T, in]``.
        act_base: Base input-feature norms ``[T, in]``.

    Returns:
        fp32 tensor ``[in]``; positive where the neuron is more active on memorized prompts.
    """
    col_norm = weight.detach().float().norm(dim=0)
    diff = (act_mem.float() - act_base.float()).mean(dim=0).to(col_norm.device)
    return diff * col_norm


def select_neurons(
    stats_mem: ActivationStats,
    stats_base: ActivationStats,
    weights: Mapping[str, Tensor],
    config: LocateConfig,
) -> Mask:
    """Neuron-level mask: per layer, the top ``ceil(ratio * in)`` hidden neurons with a positive contrast.

    Neurons are ranked by :func:`neuron_contrast` over the first ``tau`` steps; the mask zeroes their whole
    input column of the layer's weight. ``min_step_fraction`` does not apply at this level.

    Args:
        stats_mem: Statistics of memorized prompts.
        stats_base: Statistics of base prompts.
        weights: Layer name -> weight ``[out, in]`` of every layer of the statistics.
        config: ``ratio``, ``steps`` and ``half`` are used.

    Returns:
        A ``"neuron"``-level mask in the statistics' layer order.
    """
    ordered = _check_inputs(stats_mem, stats_base, weights)
    tau = _resolve_steps(stats_mem, stats_base, config)
    columns: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, w in ordered.items():
            in_f = w.shape[1]
            k = min(in_f, max(1, _ceil(config.ratio * in_f)))
            a_mem = stats_act_norm(stats_mem, name, config.half)[:tau]
            a_base = stats_act_norm(stats_base, name, config.half)[:tau]
            contrast = neuron_contrast(w, a_mem, a_base).cpu()
            values, idx = torch.topk(contrast, k)
            columns[name] = idx[values > 0]
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in ordered.items()}
    mask = Mask.from_columns(columns, shapes, meta=_meta("neuron", config, stats_mem, stats_base))
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "neuron mask: %d neurons, %d weights (%.4f%%)",
            sum(len(c) for c in columns.values()),
            mask.num_masked(),
            100 * mask.fraction(),
        )
    return mask


Selector = Callable[["ActivationStats", "ActivationStats", Mapping[str, Tensor], LocateConfig], Any]
_SELECTORS: dict[str, Selector] = {"wanda": select_wanda, "neuron": select_neurons}


def register_selector(method: str, fn: Selector) -> None:
    """Register the selection function of a locate method (``fn(stats_mem, stats_base, weights, config)``).

    Args:
        method: The ``LocateConfig.method`` name.
        fn: The selection function.

    Raises:
        ValueError: ``method`` is already registered to another function.
    """
    if method in _SELECTORS and _SELECTORS[method] is not fn:
        raise ValueError(f"locate method {method!r} is already registered")
    _SELECTORS[method] = fn


def _get_selector(method: str) -> Selector:
    if method not in _SELECTORS and method == "directions":
        name = f"{__package__}.directions"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            raise DiffmemError("method 'directions' needs diffmem.directions") from err
        # The module may register itself on import; otherwise its ``select_directions`` is the selector.
        if method not in _SELECTORS and callable(getattr(module, "select_directions", None)):
            register_selector(method, module.select_directions)
    if method not in _SELECTORS:
        raise DiffmemError(f"locate method {method!r} is not available; choose one of {', '.join(_SELECTORS)}")
    return _SELECTORS[method]


def locate(
    denoiser_or_pipe: Any,
    stats_mem: ActivationStats,
    stats_base: ActivationStats,
    config: LocateConfig | None = None,
) -> Mask:
    """Find the weights behind memorization in the layers recorded by the statistics.

    Args:
        denoiser_or_pipe: A diffusers pipeline or its denoiser (``unet`` / ``transformer``).
        stats_mem: Statistics of memorized prompts.
        stats_base: Statistics of base prompts, recorded on the same layers.
        config: Locate settings; defaults to ``LocateConfig()``.

    Returns:
        The mask chosen by ``config.method`` (for ``"directions"``, the result of ``diffmem.directions``).

    Raises:
        MaskMismatchError: A layer of the statistics is missing from the model or differs in shape.
        DiffmemError: The statistics do not match each other or the configuration.
    """
    config = config or LocateConfig()
    selector = _get_selector(config.method)
    denoiser: nn.Module = get_denoiser(denoiser_or_pipe)
    modules = dict(denoiser.named_modules())
    weights: dict[str, Tensor] = {}
    for name in stats_mem.layers:
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if module is None or not isinstance(weight, Tensor):
            raise MaskMismatchError(f"statistics layer {name!r} is not in the model")
        weights[name] = weight
    return selector(stats_mem, stats_base, weights, config)


def mask_iou(a: Mask, b: Mask) -> dict[str, Any]:
    """Intersection over union of two masks, per layer and over all layers.

    Two empty layers (or masks) count as identical, IoU 1.0.

    Args:
        a: First mask.
        b: Second mask, on the same layers and shapes.

    Returns:
        ``{"per_layer": {name: iou}, "overall": iou}``.

    Raises:
        MaskMismatchError: The masks cover different layers or shapes.
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
