"""Named image features for the quality metrics: the feature-extractor registry, Inception-v3 pool features from a
local weights file, and the embeddings of the SSCD and CLIP scorers."""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiffmemError, ModelLoadError
from ..score.base import EmbeddingScorer, Images, ScorerUnavailableError, get_scorer, to_uint8_list

__all__ = [
    "ImageFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "ScorerFeatures",
    "register_feature_extractor",
    "get_feature_extractor",
    "list_feature_extractors",
    "image_features",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ImageFeatures:
    """Features of a set of images, with the name of what computed them.

    Attributes:
        values: ``[N, D]`` array, one row per image.
        name: Feature name, e.g. ``"inception"``, ``"sscd"``, ``"clip-random"``.
        source: Where the weights came from (a path or tag).
        random_weights: True when the extractor had random weights: distances on them are plumbing only.
        is_inception: True for Inception-v3 pool features, the only ones FID and KID are defined on.
    """

    values: np.ndarray
    name: str
    source: str = ""
    random_weights: bool = False
    is_inception: bool = False

    @property
    def n(self) -> int:
        """Number of images."""
        return int(self.values.shape[0])

    @property
    def fd_name(self) -> str:
        """``"FID"`` on Inception features, ``"FD_<name>"`` on any other features."""
        return "FID" if self.is_inception else f"FD_{self.name}"

    @property
    def kid_name(self) -> str:
        """``"KID"`` on Inception features, ``"KID_<name>"`` on any other features."""
        return "KID" if self.is_inception else f"KID_{self.name}"


class FeatureExtractor(abc.ABC):
    """Maps images to an ``[N, D]`` float32 feature array; subclasses set ``name`` and implement ``__call__``.

    Attributes:
        name: Feature name used in metric names (``FD_<name>``).
        source: Where the weights came from.
        random_weights: The weights are random (plumbing tests only).
        is_inception: Inception-v3 pool features (metrics are then called FID and KID).
    """

    name: str = ""
    source: str = ""
    random_weights: bool = False
    is_inception: bool = False

    @abc.abstractmethod
    def __call__(self, images: Images) -> np.ndarray:
        """Features ``[N, D]`` of ``images``; every extractor defines it."""

    def features(self, images: Images) -> ImageFeatures:
        """Features of ``images``, named.

        Args:
            images: PIL images, ``[H, W, 3]`` arrays or one ``[B, H, W, 3]`` array (uint8, or float in [0, 1]).

        Returns:
            The :class:`ImageFeatures`.
        """
        values = np.asarray(self(images), dtype=np.float32)
        return ImageFeatures(values, self.name, self.source, self.random_weights, self.is_inception)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, source={self.source!r})"


Factory = Callable[..., FeatureExtractor]
_EXTRACTORS: dict[str, Factory] = {}


def register_feature_extractor(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a feature-extractor factory under ``name`` (lower case).

    Args:
        name: Registry name.

    Returns:
        The decorator, which returns the factory unchanged.
    """
    key = name.strip().lower()

    def decorator(factory: Factory) -> Factory:
        if key in _EXTRACTORS:
            raise ValueError(f"a feature extractor named {key!r} is already registered")
        _EXTRACTORS[key] = factory
        return factory

    return decorator


def list_feature_extractors() -> list[str]:
    """Names of the registered feature extractors, sorted."""
    return sorted(_EXTRACTORS)


def get_feature_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build a feature extractor by name.

    Args:
        name: ``"inception"`` (needs ``weights=PATH``), ``"sscd"`` or ``"clip"`` (keyword arguments of the scorer
            of that name, e.g. ``pretrained=PATH``).
        **kwargs: Arguments of the extractor.

    Returns:
        The extractor.

    Raises:
        DiffmemError: Unknown name.
    """
    key = name.strip().lower()
    if key not in _EXTRACTORS:
        raise DiffmemError(f"unknown feature extractor {name!r}; available: {', '.join(list_feature_extractors())}")
    factory = _EXTRACTORS[key]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise DiffmemError(f"feature extractor {key!r}: {err}") from None
    return factory(**kwargs)


@register_feature_extractor("inception")
class InceptionFeatures(FeatureExtractor):
    """The 2048-d pool features of torchvision's Inception-v3, from a local weights file.

    Images are resized to 299x299 (bilinear, aspect ratio not kept, as FID implementations do) and normalised
    with the ImageNet mean and std. FID computed on these features is comparable between runs that use the same
    file; published FIDs use the TensorFlow Inception weights (pytorch-fid, clean-fid), so the absolute values of
    torchvision's ``IMAGENET1K_V1`` weights differ from those.

    Args:
        weights: Path to a state dict of ``torchvision.models.inception_v3``: ``.safetensors``, or a pickle
            (``.pth`` / ``.pt``) with ``allow_pickle=True``.
        allow_pickle: Accept a pickle file. It is read with ``torch.load(weights_only=True)``, but pickles are
            still refused unless the caller opts in.
        transform_input: torchvision's flag for its own pretrained weights, which expect it (True); set False for
            weights trained on plainly normalised inputs.
        device: Torch device.
        batch_size: Images per forward pass.
    """

    name = "inception"
    is_inception = True

    def __init__(
        self,
        weights: str | Path,
        allow_pickle: bool = False,
        transform_input: bool = True,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        from torchvision.models import Inception3

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"Inception weights file {str(path)!r} does not exist")
        state = _load_state_dict(path, allow_pickle)
        has_aux = any(k.startswith("AuxLogits.") for k in state)
        fc = state.get("fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None else 1000
        net = Inception3(
            num_classes=num_classes, aux_logits=has_aux, transform_input=transform_input, init_weights=False
        )
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(
                f"{str(path)!r} is not an inception_v3 state dict: {len(missing)} missing keys (e.g. "
                f"{missing[:1]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:1]})"
            )
        net.fc = torch.nn.Identity()
        self.device = torch.device(device)
        self.model = net.eval().to(self.device)
        self.batch_size = batch_size
        self.source = str(path.resolve())

    @torch.inference_mode()
    def __call__(self, images: Images) -> np.ndarray:
        from PIL import Image

        arrays = to_uint8_list(images)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        outs = []
        for i in range(0, len(arrays), self.batch_size):
            chunk = arrays[i : i + self.batch_size]
            batch = np.stack([np.asarray(Image.fromarray(a).resize((299, 299), Image.BILINEAR)) for a in chunk])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255.0)
            x = ((x - mean) / std).to(self.device)
            outs.append(self.model(x).float().cpu())
        return torch.cat(outs).numpy()


def _load_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ModelLoadError(f"cannot read {str(path)!r} as safetensors: {str(err).splitlines()[0]}") from None
    if not allow_pickle:
        raise ModelLoadError(
            f"Inception weights {str(path)!r} are not safetensors; a pickle can run code when loaded: pass "
            "allow_pickle=True only if you trust the file, or convert it with safetensors.torch.save_file"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle or runtime errors depending on the file
        raise ModelLoadError(f"cannot load {str(path)!r} as a state dict: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


class ScorerFeatures(FeatureExtractor):
    """The embeddings of an embedding scorer (``sscd`` or ``clip``) used as features (L2-normalised).

    Args:
        scorer: The scorer; its name and weights name the features (``"sscd"``, ``"sscd-distilled"``,
            ``"clip-ViT-B-32"``, ``"clip-random"``).
    """

    def __init__(self, scorer: EmbeddingScorer) -> None:
        if not isinstance(scorer, EmbeddingScorer):
            raise TypeError(f"scorer {getattr(scorer, 'name', scorer)!r} has no embedding; use sscd or clip")
        self.scorer = scorer
        self.random_weights = bool(getattr(scorer, "random_weights", False))
        base = scorer.name or type(scorer).__name__.lower()
        if self.random_weights:
            self.name = f"{base}-random"
        elif base == "clip":
            self.name = f"clip-{getattr(scorer, 'model_name', '')}".rstrip("-")
        elif base == "sscd" and "sscd_distilled" in str(getattr(scorer, "source", "")):
            self.name = "sscd-distilled"
        else:
            self.name = base
        desc = scorer.describe()
        self.source = str(desc.get("source") or "")

    def __call__(self, images: Images) -> np.ndarray:
        return self.scorer.embed(images).numpy()


@register_feature_extractor("sscd")
def _sscd_features(**kwargs: Any) -> ScorerFeatures:
    return ScorerFeatures(get_scorer("sscd", **kwargs))  # type: ignore[arg-type]


@register_feature_extractor("clip")
def _clip_features(**kwargs: Any) -> ScorerFeatures:
    return ScorerFeatures(get_scorer("clip", **kwargs))  # type: ignore[arg-type]


Extractor = str | Path | FeatureExtractor | EmbeddingScorer | None


def _resolve_extractor(extractor: Extractor, **kwargs: Any) -> FeatureExtractor:
    """The extractor meant by ``extractor``: an instance, a scorer, a weights file (Inception) or a registry name."""
    if isinstance(extractor, (FeatureExtractor, EmbeddingScorer)):
        if kwargs:
            raise ValueError(f"extractor is already built; it takes no arguments, got {', '.join(sorted(kwargs))}")
        return extractor if isinstance(extractor, FeatureExtractor) else ScorerFeatures(extractor)
    if extractor is None:
        try:
            return get_feature_extractor("sscd", **kwargs)
        except ScorerUnavailableError as err:
            logger.warning("no SSCD model (%s): using CLIP image features with random weights", err.reason)
            return get_feature_extractor("clip", pretrained=None)
    text = str(extractor)
    as_path = Path(text).expanduser()
    if as_path.suffix.lower() == ".onnx":
        return get_feature_extractor("sscd", weights=as_path, **kwargs)
    if isinstance(extractor, Path) or as_path.suffix.lower() in (".safetensors", *_PICKLE_SUFFIXES):
        return InceptionFeatures(as_path, **kwargs)
    return get_feature_extractor(text, **kwargs)


def image_features(
    images: Images, extractor: str | Path | FeatureExtractor | EmbeddingScorer | None = None, **kwargs: Any
) -> ImageFeatures:
    """Features of images, named after the extractor that made them.

    Args:
        images: PIL images, ``[H, W, 3]`` arrays or one ``[B, H, W, 3]`` array (uint8, or float in [0, 1]).
        extractor: A local Inception-v3 weights file (``.safetensors``; a pickle with ``allow_pickle=True``), an
            SSCD ``.onnx`` file, a registry name (``"inception"``, ``"sscd"``, ``"clip"``), a
            :class:`FeatureExtractor`, an embedding scorer, or ``None``: SSCD (the packaged ONNX model), else CLIP
            image features with random weights (named ``clip-random``).
        **kwargs: Arguments of the extractor when it is built here (e.g. ``allow_pickle=True``, ``pretrained=``).

    Returns:
        The :class:`ImageFeatures` (``.name`` says which features; ``.fd_name`` / ``.kid_name`` the metric names).
    """
    return _resolve_extractor(extractor, **kwargs).features(images)

