"""The scorer interface, the registry of scorers by name, and image-batch helpers shared by every scorer."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar, Union

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DiffmemError

__all__ = [
    "Images",
    "Scorer",
    "EmbeddingScorer",
    "PixelScorer",
    "ScorerUnavailableError",
    "register_scorer",
    "get_scorer",
    "list_scorers",
    "to_uint8_batch",
    "to_uint8_list",
    "resize_uint8",
]

logger = logging.getLogger(__name__)

Images = Union[Sequence[Union[Image.Image, np.ndarray]], np.ndarray, Image.Image]
"""PIL images, ``[H, W, 3]`` arrays, or one ``[B, H, W, 3]`` array (uint8, or float in [0, 1])."""


class ScorerUnavailableError(DiffmemError):
    """A scorer has no source of weights on this machine (``get_scorer(..., fallback=...)`` may replace it).

    Args:
        message: The one-line message, naming what to do instead.
        reason: Short phrase saying what is missing, used in the fallback warning.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


# ----------------------------------------------------------------------------------------------------------------
# Image helpers


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """One ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` array as contiguous uint8 ``[H, W, 3]``."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image array of shape [H, W, 3], got {tuple(arr.shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if np.isnan(arr).any() or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1] (diffusers output_type='np'); got [{lo:.3g}, {hi:.3g}]")
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"image arrays must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def to_uint8_list(images: Images) -> list[np.ndarray]:
    """Convert images to a list of uint8 RGB arrays, keeping each image's own size.

    Args:
        images: A PIL image, a list of PIL images or ``[H, W, C]`` arrays, or one ``[B, H, W, C]`` array;
            arrays are uint8 or float in [0, 1]; grey and RGBA images become RGB.

    Returns:
        One contiguous uint8 ``[H, W, 3]`` array per image.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and images.shape[-1] in (1, 3, 4):
            images = images[None]  # one [H, W, C] image without a batch axis
        if images.ndim != 4:
            raise ValueError(f"an image batch array must be [B, H, W, 3], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("no images given")
        return [_array_to_uint8(a) for a in images]
    if isinstance(images, torch.Tensor):
        raise TypeError("pass images as PIL images or numpy arrays (e.g. pipeline output_type='np'), not tensors")
    out = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            out.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        elif isinstance(img, np.ndarray):
            out.append(_array_to_uint8(img))
        else:
            raise TypeError(f"image {i} is a {type(img).__name__}; expected a PIL image or a numpy array")
    if not out:
        raise ValueError("no images given")
    return out


def resize_uint8(image: np.ndarray, size: tuple[int, int], resample: int = Image.BICUBIC) -> np.ndarray:
    """Resize one uint8 ``[H, W, 3]`` image (aspect ratio not kept).

    Args:
        image: uint8 ``[H, W, 3]`` array.
        size: Target ``(height, width)``.
        resample: PIL resampling filter.

    Returns:
        uint8 ``[height, width, 3]`` array (the input itself when it already has that size).
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), resample=resample), dtype=np.uint8)


def to_uint8_batch(images: Images, size: tuple[int, int] | None = None) -> np.ndarray:
    """Convert images to one uint8 ``[B, H, W, 3]`` array.

    Args:
        images: See :func:`to_uint8_list`.
        size: ``(height, width)`` to resize every image to; required when the images differ in size.

    Returns:
        uint8 ``[B, H, W, 3]`` array.
    """
    arrays = to_uint8_list(images)
    if size is None:
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images differ in size ({sorted(s[:2] for s in shapes)}); pass size=(height, width)")
        return np.stack(arrays)
    return np.stack([resize_uint8(a, size) for a in arrays])


# ----------------------------------------------------------------------------------------------------------------
# Scorers


class Scorer(ABC):
    """Base class of image similarity scorers (higher similarity = more alike).

    Attributes:
        name: Registry name.
        threshold: Default "replication" threshold on similarity: a pair at or above it counts as a copy.
        report_thresholds: Thresholds worth reporting next to ``threshold`` (the literature uses several).
    """

    name: ClassVar[str] = ""
    threshold: float = 0.0
    report_thresholds: tuple[float, ...] = ()

    def embed(self, images: Images) -> torch.Tensor:
        """Embed images as L2-normalised ``[B, D]`` vectors (embedding scorers only).

        Args:
            images: See :func:`to_uint8_list`.

        Returns:
            float32 ``[B, D]`` tensor on the CPU.
        """
        raise TypeError(f"scorer {self.name!r} compares pixels and has no embedding")

    @abstractmethod
    def similarity(self, a: Images, b: Images) -> torch.Tensor:
        """Similarity of every image of ``a`` to every image of ``b``.

        Args:
            a: First images.
            b: Second images.

        Returns:
            float32 ``[len(a), len(b)]`` tensor, higher = more similar.
        """

    @abstractmethod
    def paired_similarity(self, a: Images, b: Images) -> torch.Tensor:
        """Similarity of ``a[i]`` to ``b[i]`` for each ``i`` (e.g. generations against their references).

        Args:
            a: First images.
            b: Second images, as many as ``a``.

        Returns:
            float32 ``[len(a)]`` tensor.
        """

    def is_replication(self, similarity: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Boolean mask of similarities at or above ``threshold`` (the scorer's default when ``None``)."""
        return similarity >= (self.threshold if threshold is None else threshold)

    def describe(self) -> dict[str, Any]:
        """What this scorer computes: name, weights source, preprocessing, random_weights flag and threshold."""
        return {
            "name": self.name,
            "source": None,
            "preprocessing": None,
            "random_weights": False,
            "threshold": self.threshold,
            "report_thresholds": list(self.report_thresholds or (self.threshold,)),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"


class EmbeddingScorer(Scorer):
    """A scorer whose similarity is the cosine of L2-normalised embeddings.

    ``similarity`` and ``paired_similarity`` also accept precomputed embeddings (a float ``[N, D]`` tensor from
    :meth:`embed`) in place of images, so that a large reference set is embedded once.
    """

    def _set_options(self, batch_size: int, device: str | torch.device, threshold: float | None) -> None:
        """Check and keep what every embedding model takes: images per forward pass, device, threshold override."""
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.device = torch.device(device)
        if threshold is not None:
            self.threshold = float(threshold)

    def _embeddings(self, x: Images | torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.ndim == 2 and x.is_floating_point():
            return x.detach().to("cpu", torch.float32)
        return self.embed(x)

    def similarity(self, a: Images | torch.Tensor, b: Images | torch.Tensor) -> torch.Tensor:
        ea, eb = self._embeddings(a), self._embeddings(b)
        return (ea @ eb.T).to(torch.float32)

    def paired_similarity(self, a: Images | torch.Tensor, b: Images | torch.Tensor) -> torch.Tensor:
        ea, eb = self._embeddings(a), self._embeddings(b)
        if ea.shape != eb.shape:
            raise ValueError(
                f"paired_similarity needs as many images in a as in b, got {ea.shape[0]} and {eb.shape[0]}"
            )
        return (ea * eb).sum(dim=1).to(torch.float32)


class PixelScorer(Scorer):
    """A scorer that compares two images pixel by pixel; the larger image is resized to the smaller's size."""

    @abstractmethod
    def _pair(self, x: np.ndarray, y: np.ndarray) -> float:
        """Similarity of two uint8 ``[H, W, 3]`` images of equal size."""

    def _score(self, xs: list[np.ndarray], ys: list[np.ndarray], pairs: list[tuple[int, int]]) -> list[float]:
        cache: dict[tuple[int, int, tuple[int, int]], np.ndarray] = {}

        def get(side: int, i: int, imgs: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
            key = (side, i, size)
            if key not in cache:
                cache[key] = resize_uint8(imgs[i], size)
            return cache[key]

        out = []
        for i, j in pairs:
            x, y = xs[i], ys[j]
            size = (min(x.shape[0], y.shape[0]), min(x.shape[1], y.shape[1]))
            out.append(self._pair(get(0, i, xs, size), get(1, j, ys, size)))
        return out

    def similarity(self, a: Images, b: Images) -> torch.Tensor:
        xs, ys = to_uint8_list(a), to_uint8_list(b)
        pairs = [(i, j) for i in range(len(xs)) for j in range(len(ys))]
        values = self._score(xs, ys, pairs)
        return torch.tensor(values, dtype=torch.float32).reshape(len(xs), len(ys))

    def paired_similarity(self, a: Images, b: Images) -> torch.Tensor:
        xs, ys = to_uint8_list(a), to_uint8_list(b)
        if len(xs) != len(ys):
            raise ValueError(f"paired_similarity needs as many images in a as in b, got {len(xs)} and {len(ys)}")
        return torch.tensor(self._score(xs, ys, [(i, i) for i in range(len(xs))]), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[..., Scorer]] = {}
S = TypeVar("S", bound=Callable[..., Scorer])


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_scorer(name: str) -> Callable[[S], S]:
    """Class decorator that registers a scorer under ``name`` (case-insensitive; ``_`` and ``-`` are the same).

    Args:
        name: Registry name, e.g. ``"sscd"``.

    Returns:
        The decorator, which returns the class unchanged.
    """
    key = _key(name)

    def decorator(factory: S) -> S:
        if key in _REGISTRY:
            raise ValueError(f"a scorer named {key!r} is already registered")
        if isinstance(factory, type):
            factory.name = key  # type: ignore[attr-defined]
        _REGISTRY[key] = factory
        return factory

    return decorator


def list_scorers() -> list[str]:
    """Names of the registered scorers, sorted."""
    return sorted(_REGISTRY)


def get_scorer(name: str, fallback: str | None = None, **kwargs: Any) -> Scorer:
    """Build a scorer by name.

    Args:
        name: A name from :func:`list_scorers`.
        fallback: Scorer to build instead (with default arguments) when ``name`` has no weights on this machine;
            one warning line names the substitution.
        **kwargs: Arguments of the scorer's constructor (e.g. ``weights=`` for ``sscd``).

    Returns:
        The scorer.

    Raises:
        DiffmemError: Unknown name, an argument the scorer does not take, or (without ``fallback``) no weights.
    """
    key = _key(name)
    if key not in _REGISTRY:
        raise DiffmemError(f"unknown scorer {name!r}; available: {', '.join(list_scorers())}")
    if fallback is not None and _key(fallback) not in _REGISTRY:
        raise DiffmemError(f"unknown fallback scorer {fallback!r}; available: {', '.join(list_scorers())}")
    factory = _REGISTRY[key]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        params = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        raise DiffmemError(f"scorer {key!r}: {err}; it takes: {', '.join(params) or 'no arguments'}") from None
    try:
        return factory(**kwargs)
    except ScorerUnavailableError as err:
        if fallback is None:
            raise
        substitute = get_scorer(fallback)
        logger.warning("scorer %r unavailable (%s); falling back to scorer %r (threshold %s)", key, err.reason,
                       substitute.name, substitute.threshold)
        return substitute
