"""Locate memorization: pure scoring functions, selection into an edit, and the registry of locators.

The weight-level rule follows Chavhan et al. (2024): at each of the first ``tau`` denoising steps and for each
feed-forward output layer, score every weight with a Wanda-style importance ``|W_ij| * ||X_j||`` once on the
statistics of memorized prompts and once on those of base prompts. In each output row the top ``ratio`` of the
memorized scores are candidates, and a candidate is kept where its memorized score exceeds its base score. The
selections of the steps are then united (optionally requiring a minimum number of steps).

The direction view (:func:`locate_directions`) factors the memorized prompts' signatures around the base mean
with an SVD, per layer, and keeps the leading right singular vectors as the basis of the shared subspace.

Every locator takes ``(stats_mem, stats_base, weights, config)`` and returns an :class:`~diffmem.edits.Edit`:
``"wanda"`` and ``"neuron"`` give a :class:`~diffmem.edits.Mask`, ``"directions"`` a
:class:`~diffmem.edits.DirectionBasis`. :func:`register_locator` adds more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import LocateConfig
from .edits import DirectionBasis, Edit, Mask
from .errors import DiffmemError, EditMismatchError
from .stats import check_same_layers, provenance
from .targets import get_denoiser

if TYPE_CHECKING:
    from .stats import ActivationStats

logger = logging.getLogger(__name__)

__all__ = [
    "wanda_scores",
    "stats_act_norm",
    "neuron_contrast",
    "select_wanda",
    "select_neurons",
    "locate_directions",
    "explained_variance_curves",
    "select_directions",
    "locate",
    "register_locator",
    "list_locators",
]


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


def _per_layer_k(config: LocateConfig, in_f: int, layer: str) -> int:
    """Weights (or neurons) per row (or layer): ``max(1, ceil(ratio * in))``, or the original ``int(ratio * in)``."""
    if config.k_rounding == "floor":
        k = int(config.ratio * in_f)
        if k == 0:
            logger.warning("layer %s: int(ratio * %d) = 0 with ratio %g, so its mask is empty", layer, in_f, config.ratio)
        return k
    return min(in_f, max(1, _ceil(config.ratio * in_f)))


def _min_step_count(config: LocateConfig, tau: int) -> int:
    """Fewest steps a weight must be selected in: ``> f * tau`` (strict) or ``>= max(1, ceil(f * tau))``."""
    if config.strict_step_count:
        return math.floor(round(config.min_step_fraction * tau, 9)) + 1
    return max(1, _ceil(config.min_step_fraction * tau))


def _resolve_steps(stats_mem: ActivationStats, stats_base: ActivationStats, config: LocateConfig) -> int:
    tau = config.record_steps if config.record_steps is not None else min(stats_mem.steps, stats_base.steps)
    for label, st in (("memorized", stats_mem), ("base", stats_base)):
        if st.steps < tau:
            raise DiffmemError(
                f"record_steps={tau} but the {label} statistics hold only {st.steps} recorded steps; "
                "record more steps or lower --record-steps"
            )
    return tau


def _check_inputs(
    stats_mem: ActivationStats, stats_base: ActivationStats, weights: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Check that both statistics and the weights describe the same layers; return weights in layer order."""
    check_same_layers(stats_mem, stats_base)
    ordered: dict[str, Tensor] = {}
    for name, shape in stats_mem.layers.items():
        if name not in weights:
            raise EditMismatchError(f"statistics layer {name!r} is not in the model")
        w = weights[name]
        if tuple(w.shape) != tuple(shape):
            raise EditMismatchError(
                f"statistics layer {name!r} has shape {tuple(shape)} but the model's is {tuple(w.shape)}"
            )
        ordered[name] = w
    return ordered


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
    selected. A weight is masked when selected in at least ``max(1, ceil(min_step_fraction * tau))`` steps
    (with ``strict_step_count``: in more than ``min_step_fraction * tau`` steps, as the original code does).
    Work is done on the weights' device.

    Args:
        stats_mem: Statistics of memorized prompts.
        stats_base: Statistics of base (non-memorized) prompts.
        weights: Layer name -> weight ``[out, in]`` of every layer of the statistics.
        config: ``ratio``, ``record_steps``, ``min_step_fraction``, ``half``, ``k_rounding`` and
            ``strict_step_count`` are used.

    Returns:
        A ``"weight"``-level mask in the statistics' layer order.
    """
    ordered = _check_inputs(stats_mem, stats_base, weights)
    tau = _resolve_steps(stats_mem, stats_base, config)
    min_count = _min_step_count(config, tau)
    layers: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, w in ordered.items():
            absw = w.detach().float().abs()
            out_f, in_f = absw.shape
            k = _per_layer_k(config, in_f, name)
            if k == 0:
                layers[name] = torch.zeros(out_f, in_f, dtype=torch.bool)
                continue
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
    mask = Mask(layers, level="weight", meta=provenance("wanda", config, stats_mem, stats_base))
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
        config: ``ratio``, ``record_steps``, ``half`` and ``k_rounding`` are used.

    Returns:
        A ``"neuron"``-level mask in the statistics' layer order.
    """
    ordered = _check_inputs(stats_mem, stats_base, weights)
    tau = _resolve_steps(stats_mem, stats_base, config)
    columns: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, w in ordered.items():
            in_f = w.shape[1]
            k = _per_layer_k(config, in_f, name)
            a_mem = stats_act_norm(stats_mem, name, config.half)[:tau]
            a_base = stats_act_norm(stats_base, name, config.half)[:tau]
            contrast = neuron_contrast(w, a_mem, a_base).cpu()
            values, idx = torch.topk(contrast, k)
            columns[name] = idx[values > 0]
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in ordered.items()}
    mask = Mask.from_columns(columns, shapes, meta=provenance("neuron", config, stats_mem, stats_base))
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "neuron mask: %d neurons, %d weights (%.4f%%)",
            sum(len(c) for c in columns.values()),
            mask.num_masked(),
            100 * mask.fraction(),
        )
    return mask


# --------------------------------------------------------------------------------------------- directions
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


def select_directions(
    stats_mem: ActivationStats, stats_base: ActivationStats, weights: Mapping[str, Tensor], config: LocateConfig
) -> Edit:
    """The ``"directions"`` locator: check the statistics against the model, then locate a direction basis."""
    _check_inputs(stats_mem, stats_base, weights)
    return locate_directions(stats_mem, stats_base, config)


Locator = Callable[["ActivationStats", "ActivationStats", Mapping[str, Tensor], LocateConfig], Edit]
_LOCATORS: dict[str, Locator] = {"wanda": select_wanda, "neuron": select_neurons, "directions": select_directions}


def register_locator(method: str, fn: Locator) -> None:
    """Register a locate method: ``fn(stats_mem, stats_base, weights, config) -> Edit``.

    Args:
        method: The ``LocateConfig.method`` name.
        fn: The locator.

    Raises:
        ValueError: ``method`` is already registered to another function.
    """
    if method in _LOCATORS and _LOCATORS[method] is not fn:
        raise ValueError(f"locate method {method!r} is already registered")
    _LOCATORS[method] = fn


def list_locators() -> list[str]:
    """Names of the registered locate methods."""
    return sorted(_LOCATORS)


def locate(
    denoiser_or_pipe: Any,
    stats_mem: ActivationStats,
    stats_base: ActivationStats,
    config: LocateConfig | None = None,
) -> Edit:
    """Find the weights behind memorization in the layers recorded by the statistics.

    Args:
        denoiser_or_pipe: A diffusers pipeline or its denoiser (``unet`` / ``transformer``).
        stats_mem: Statistics of memorized prompts.
        stats_base: Statistics of base prompts, recorded on the same layers.
        config: Locate settings; defaults to ``LocateConfig()``.

    Returns:
        The edit chosen by ``config.method`` (a mask, or a direction basis).

    Raises:
        EditMismatchError: A layer of the statistics is missing from the model or differs in shape.
        DiffmemError: The statistics do not match each other or the configuration.
    """
    config = config or LocateConfig()
    locator = _LOCATORS.get(config.method)
    if locator is None:
        raise DiffmemError(f"locate method {config.method!r} is not available; choose one of {', '.join(list_locators())}")
    denoiser: nn.Module = get_denoiser(denoiser_or_pipe)
    modules = dict(denoiser.named_modules())
    weights: dict[str, Tensor] = {}
    for name in stats_mem.layers:
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if module is None or not isinstance(weight, Tensor):
            raise EditMismatchError(f"statistics layer {name!r} is not in the model")
        weights[name] = weight
    return locator(stats_mem, stats_base, weights, config)
