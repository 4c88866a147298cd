"""Streaming per-neuron statistics of FFN activations, kept apart per CFG half, layer and denoising step.

For every target layer and recorded step the statistics hold, in fp32, the number of token rows seen and the
per-neuron sum, sum of squares and sum of squares of the L2-normalised token rows (Chavhan et al.'s
``||X_j||^2``). Their size depends on the model only, never on the number of prompts. Statistics are saved as
a safetensors file plus a JSON sidecar and merge across shards or resumed runs with :meth:`ActivationStats.merge_`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, DiffmemError
from .files import atomic_write_bytes, atomic_write_text, pair_paths, read_json

logger = logging.getLogger(__name__)

__all__ = [
    "HALVES",
    "LayerStats",
    "ActivationStats",
    "row_moments",
    "prompts_sha256",
    "check_same_layers",
    "provenance",
]

HALVES = ("uncond", "cond")
FORMAT = "diffmem.activation_stats"
FORMAT_VERSION = 1


def prompts_sha256(prompts: Iterable[str]) -> str:
    """Hex sha256 of ``"\\n".join(prompts)``, used to tie statistics to the prompts that made them.

    Args:
        prompts: The prompts, in order.

    Returns:
        The hex digest.
    """
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def row_moments(rows: Tensor) -> Tensor:
    """Per-neuron moments of a block of token rows.

    Args:
        rows: ``[R, N]`` activations, one token per row (cast to fp32 here if needed). Leading batch dimensions
            (``[..., R, N]``) give one result per block, computed in one reduction.

    Returns:
        ``[3, N]`` (``[..., 3, N]``) fp32: the sum, the sum of squares and the sum of squares of the
        L2-normalised rows (a zero row contributes zero).
    """
    rows = rows.float()
    sq = rows * rows
    inv_norm2 = sq.sum(dim=-1).clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
    # one matrix product gives both weighted column sums: ones -> sum of squares, 1/||x||^2 -> normalised sum
    weights = torch.stack([torch.ones_like(inv_norm2), inv_norm2], dim=-2)
    return torch.cat([rows.sum(dim=-2, keepdim=True), weights @ sq], dim=-2)


@dataclass
class LayerStats:
    """Statistics of one target layer in one CFG half; ``T`` recorded steps, ``N`` input features.

    Args:
        count: int64 ``[T]``, token rows seen at each step.
        sum: fp32 ``[T, N]``, sum of the activations.
        sumsq: fp32 ``[T, N]``, sum of their squares.
        normsq: fp32 ``[T, N]``, sum over token rows of ``(x_j / ||x||_2)^2``.
    """

    count: Tensor
    sum: Tensor
    sumsq: Tensor
    normsq: Tensor

    @classmethod
    def zeros(cls, steps: int, features: int) -> LayerStats:
        """Empty statistics.

        Args:
            steps: Number of recorded steps ``T``.
            features: Number of input features ``N``.

        Returns:
            Zero-filled statistics on the CPU.
        """
        return cls(
            count=torch.zeros(steps, dtype=torch.int64),
            sum=torch.zeros(steps, features, dtype=torch.float32),
            sumsq=torch.zeros(steps, features, dtype=torch.float32),
            normsq=torch.zeros(steps, features, dtype=torch.float32),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(T, N)``."""
        return tuple(self.sum.shape)  # type: ignore[return-value]

    def tensors(self) -> dict[str, Tensor]:
        """The four tensors by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add_at_(self, step: int, count: int, moments: Tensor) -> None:
        """Add one block of rows, summarised by :func:`row_moments`, at a step.

        Args:
            step: Step index in ``[0, T)``.
            count: Number of rows in the block.
            moments: ``[3, N]`` sum, sum of squares and normalised sum of squares.
        """
        moments = moments.to(self.sum.device, torch.float32)
        self.count[step].add_(count)
        self.sum[step].add_(moments[0])
        self.sumsq[step].add_(moments[1])
        self.normsq[step].add_(moments[2])

    def add_steps_(self, count: Tensor | Sequence[int], moments: Tensor) -> None:
        """Add the moments of every step at once (a whole batch, summarised by :func:`row_moments`).

        Args:
            count: ``[T]`` rows added at each step.
            moments: ``[T, 3, N]`` sums, sums of squares and normalised sums of squares per step.
        """
        moments = moments.to(self.sum.device, torch.float32)
        self.count += torch.as_tensor(count, dtype=torch.int64).to(self.count.device)
        self.sum += moments[:, 0]
        self.sumsq += moments[:, 1]
        self.normsq += moments[:, 2]

    def add_(self, other: LayerStats) -> LayerStats:
        """Add another layer's statistics in place.

        Args:
            other: Statistics of the same shape.

        Returns:
            ``self``.
        """
        for name, tensor in self.tensors().items():
            tensor += getattr(other, name).to(tensor.device)
        return self

    def to(self, device: torch.device | str) -> LayerStats:
        """Move the tensors to a device.

        Args:
            device: Target device.

        Returns:
            ``self``.
        """
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device))
        return self


class ActivationStats:
    """Recorded statistics of every target layer, per CFG half.

    Args:
        layers: Layer name -> weight shape ``(out, in)`` of the target Linear, in module order.
        steps: Number of recorded denoising steps ``T``.
        halves: Half (``"uncond"``/``"cond"``) -> layer -> :class:`LayerStats`; empty halves are added on demand.
        meta: Provenance: model id, ``prompts_sha256``, ``num_prompts``, record config, diffmem version.
        signatures: Optional layer -> fp32 ``[P, N]`` mean activation of each prompt (cond half, over recorded
            steps, tokens and seeds), in prompt order.
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[int, int]],
        steps: int,
        halves: Mapping[str, Mapping[str, LayerStats]] | None = None,
        meta: Mapping[str, Any] | None = None,
        signatures: Mapping[str, Tensor] | None = None,
    ) -> None:
        if steps < 1:
            raise ConfigError(f"steps={steps!r} is invalid: must be >= 1")
        self.layers: dict[str, tuple[int, int]] = {name: (int(s[0]), int(s[1])) for name, s in layers.items()}
        self.steps = int(steps)
        self.halves: dict[str, dict[str, LayerStats]] = {}
        for half in HALVES:
            if halves is not None and half in halves:
                self.halves[half] = dict(halves[half])
        self.meta: dict[str, Any] = dict(meta or {})
        self.signatures: dict[str, Tensor] | None = dict(signatures) if signatures is not None else None

    def __repr__(self) -> str:
        return (
            f"ActivationStats(layers={len(self.layers)}, steps={self.steps}, halves={list(self.halves)}, "
            f"num_prompts={self.meta.get('num_prompts')}, signatures={self.signatures is not None})"
        )

    def ensure_half(self, half: str) -> dict[str, LayerStats]:
        """Return a half's statistics, creating zeros for every layer if it is absent.

        Args:
            half: ``"uncond"`` or ``"cond"``.

        Returns:
            Layer -> statistics for that half.
        """
        if half not in HALVES:
            raise ConfigError(f"half={half!r} is invalid: choose one of {', '.join(HALVES)}")
        if half not in self.halves:
            self.halves[half] = {name: LayerStats.zeros(self.steps, shape[1]) for name, shape in self.layers.items()}
            self.halves = {h: self.halves[h] for h in HALVES if h in self.halves}
        return self.halves[half]

    def layer_stats(self, layer: str, half: str = "cond") -> LayerStats:
        """Statistics of one layer in one half.

        Args:
            layer: Target layer name.
            half: ``"uncond"`` or ``"cond"``.

        Returns:
            The layer's :class:`LayerStats`.

        Raises:
            DiffmemError: The half was not recorded, or the layer is unknown.
        """
        if half not in self.halves:
            recorded = ", ".join(self.halves) or "none"
            hint = " (recorded without classifier-free guidance)" if half == "uncond" else ""
            raise DiffmemError(f"statistics have no {half!r} half{hint}; recorded halves: {recorded}")
        if layer not in self.halves[half]:
            raise DiffmemError(f"statistics have no layer {layer!r} ({len(self.layers)} layers recorded)")
        return self.halves[half][layer]

    def mean(self, layer: str, half: str = "cond") -> Tensor:
        """Per-step mean activation.

        Args:
            layer: Target layer name.
            half: CFG half.

        Returns:
            fp32 ``[T, N]``.
        """
        s = self.layer_stats(layer, half)
        return s.sum / s.count.clamp_min(1).unsqueeze(1).to(s.sum.dtype)

    def var(self, layer: str, half: str = "cond") -> Tensor:
        """Per-step (population) variance of the activation.

        Args:
            layer: Target layer name.
            half: CFG half.

        Returns:
            fp32 ``[T, N]``, clamped at zero.
        """
        s = self.layer_stats(layer, half)
        n = s.count.clamp_min(1).unsqueeze(1).to(s.sum.dtype)
        mean = s.sum / n
        return (s.sumsq / n - mean * mean).clamp_min(0.0)

    def act_norm(self, layer: str, half: str = "cond") -> Tensor:
        """Per-step activation norm used by the Wanda score: ``sqrt(normsq / count)``.

        Args:
            layer: Target layer name.
            half: CFG half.

        Returns:
            fp32 ``[T, N]``, the per-token RMS of the row-normalised input.
        """
        s = self.layer_stats(layer, half)
        return (s.normsq / s.count.clamp_min(1).unsqueeze(1).to(s.normsq.dtype)).sqrt()

    def to(self, device: torch.device | str) -> ActivationStats:
        """Move all tensors to a device.

        Args:
            device: Target device.

        Returns:
            ``self``.
        """
        for per_layer in self.halves.values():
            for s in per_layer.values():
                s.to(device)
        if self.signatures is not None:
            self.signatures = {k: v.to(device) for k, v in self.signatures.items()}
        return self

    def _check_compatible(self, other: ActivationStats) -> None:
        if list(self.layers.items()) != list(other.layers.items()):
            mine, theirs = set(self.layers.items()), set(other.layers.items())
            diff = sorted({name for name, _ in mine ^ theirs}) or ["layer order"]
            raise DiffmemError(f"cannot merge statistics of different layers (first difference: {diff[0]})")
        if self.steps != other.steps:
            raise DiffmemError(f"cannot merge statistics with {self.steps} and {other.steps} recorded steps")
        if set(self.halves) != set(other.halves):
            raise DiffmemError(
                f"cannot merge statistics with halves {sorted(self.halves)} and {sorted(other.halves)} "
                "(one was recorded without classifier-free guidance)"
            )
        if (self.signatures is None) != (other.signatures is None):
            raise DiffmemError("cannot merge statistics with and without per-prompt signatures")

    def merge_(self, other: ActivationStats) -> ActivationStats:
        """Add another run's statistics in place (sharded or resumed recording).

        Counts and sums add. Signatures are concatenated (``self``'s prompts first). ``num_prompts`` adds up,
        ``meta["parts"]`` lists each part's ``prompts_sha256`` and ``num_prompts``, and ``prompts_sha256``
        becomes the sha256 of the parts' hashes joined by newlines.

        Args:
            other: Statistics of the same layers, steps and halves.

        Returns:
            ``self``.

        Raises:
            DiffmemError: The layers, steps, halves or presence of signatures differ.
        """
        self._check_compatible(other)
        for half, per_layer in self.halves.items():
            for name, s in per_layer.items():
                s.add_(other.halves[half][name])
        if self.signatures is not None and other.signatures is not None:
            self.signatures = {
                name: torch.cat([sig, other.signatures[name].to(sig.device)]) for name, sig in self.signatures.items()
            }
        parts = [*(self.meta.get("parts") or [_part(self.meta)]), *(other.meta.get("parts") or [_part(other.meta)])]
        self.meta["parts"] = parts
        self.meta["num_prompts"] = sum(int(p.get("num_prompts") or 0) for p in parts)
        self.meta["prompts_sha256"] = prompts_sha256(str(p.get("prompts_sha256")) for p in parts)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """All tensors under flat keys ``f"{half}/{layer}/{field}"`` and ``f"signatures/{layer}"``.

        Returns:
            Contiguous CPU tensors.
        """
        out: dict[str, Tensor] = {}
        for half, per_layer in self.halves.items():
            for name, s in per_layer.items():
                for field_name, tensor in s.tensors().items():
                    out[f"{half}/{name}/{field_name}"] = tensor.detach().cpu().contiguous()
        if self.signatures is not None:
            for name, sig in self.signatures.items():
                out[f"signatures/{name}"] = sig.detach().cpu().float().contiguous()
        return out

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layers": [[name, list(shape)] for name, shape in self.layers.items()],
            "steps": self.steps,
            "halves": list(self.halves),
            "signatures": self.signatures is not None,
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` and the ``<path>.json`` sidecar, each atomically.

        Args:
            path: Output path, with or without a ``.safetensors`` / ``.json`` suffix.

        Returns:
            The safetensors path.
        """
        from safetensors.torch import save

        tensor_path, json_path = stats_paths(path)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps(self._header(), sort_keys=True, indent=2, default=str)
        atomic_write_bytes(tensor_path, save(self.state_dict(), metadata={"format": FORMAT}))
        atomic_write_text(json_path, header + "\n")
        logger.info("saved activation statistics to %s", tensor_path)
        return tensor_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationStats:
        """Read statistics written by :meth:`save`.

        Args:
            path: The path given to :meth:`save`, or either file it wrote.

        Returns:
            The statistics, on the CPU.

        Raises:
            DiffmemError: A file is missing or malformed.
        """
        from safetensors.torch import load_file

        tensor_path, json_path = stats_paths(path)
        for p in (tensor_path, json_path):
            if not p.is_file():
                raise DiffmemError(f"activation statistics file not found: {p}")
        header = read_json(json_path, "activation statistics file", fmt=FORMAT)
        try:
            tensors = load_file(str(tensor_path))
        except Exception as err:  # safetensors raises its own error types
            raise DiffmemError(f"cannot read {tensor_path}: {err}") from None

        def get(key: str) -> Tensor:
            if key not in tensors:
                raise DiffmemError(f"{tensor_path} lacks tensor {key!r}")
            return tensors[key]

        layers = {name: (int(shape[0]), int(shape[1])) for name, shape in header["layers"]}
        halves = {
            half: {
                name: LayerStats(**{f.name: get(f"{half}/{name}/{f.name}") for f in fields(LayerStats)})
                for name in layers
            }
            for half in header["halves"]
        }
        signatures = {name: get(f"signatures/{name}") for name in layers} if header.get("signatures") else None
        return cls(layers, int(header["steps"]), halves=halves, meta=header.get("meta") or {}, signatures=signatures)


def _part(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"prompts_sha256": meta.get("prompts_sha256"), "num_prompts": meta.get("num_prompts")}


def stats_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The safetensors and JSON paths that :meth:`ActivationStats.save` writes for ``path``."""
    return pair_paths(path)


def check_same_layers(stats_mem: ActivationStats, stats_base: ActivationStats) -> None:
    """Raise a one-line :class:`DiffmemError` unless both statistics describe the same layers and shapes."""
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


def provenance(method: str, config: Any, stats_mem: ActivationStats, stats_base: ActivationStats) -> dict[str, Any]:
    """The ``meta`` of an edit located from two statistics: method, settings and what the statistics saw."""
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
