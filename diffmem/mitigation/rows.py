"""Manifest rows loaded once for mitigation: prompts, reference pixels at the model's size, and their latents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import ManifestEntry, load_reference
from ..errors import DiffmemError
from ..objective import encode_reference
from ..reextraction import ReextractItem

__all__ = ["Rows", "load_rows"]


@dataclass
class Rows:
    """Rows of a manifest with their training images, loaded once and passed down.

    Attributes:
        entries: The manifest rows.
        pixels: Each row's reference image, uint8 ``[H, W, 3]`` at the model's sampling size.
    """

    entries: list[ManifestEntry]
    pixels: list[np.ndarray]
    _latents: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.entries]

    def items(self, kind: str = "memorized") -> list[ReextractItem]:
        """The rows as re-extraction targets."""
        return [ReextractItem(e.prompt, p, kind) for e, p in zip(self.entries, self.pixels)]

    def latents(self, pipe: Any) -> torch.Tensor:
        """The training latents ``[N, C, h, w]`` (VAE posterior means), encoded on first use and kept."""
        if self._latents is None:
            with torch.no_grad():
                self._latents = torch.cat([encode_reference(pipe, p) for p in self.pixels])
        return self._latents

    def subset(self, indices: Sequence[int]) -> Rows:
        """The rows at ``indices`` (latents kept when already encoded)."""
        idx = list(indices)
        lat = None if self._latents is None else self._latents[idx]
        return Rows([self.entries[i] for i in idx], [self.pixels[i] for i in idx], lat)


def load_rows(entries: Sequence[ManifestEntry], size: tuple[int, int], *, purpose: str = "the attack") -> Rows:
    """Load every row's reference image once, at ``size`` (height, width).

    Raises:
        DiffmemError: A row has no reference image.
    """
    pixels = []
    for e in entries:
        if e.reference is None:
            raise DiffmemError(f"manifest row {e.prompt!r} has no reference image; {purpose} needs the training image")
        pixels.append(load_reference(e.reference, size, row=e))
    return Rows(list(entries), pixels)


def as_rows(rows: Rows | Sequence[ManifestEntry], size: tuple[int, int], purpose: str) -> Rows:
    """``rows`` as :class:`Rows`, loading the references of plain manifest rows."""
    return rows if isinstance(rows, Rows) else load_rows(rows, size, purpose=purpose)
