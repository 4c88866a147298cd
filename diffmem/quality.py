"""Image quality after an edit: Fréchet distance, KID and CLIP score, on named features.

Everything here is a pure function of images or features, meant for the small sets a mitigation report has
(tens of images of 32-64 px):

* :func:`frechet_distance` and :func:`kernel_inception_distance` compare two sets of features;
* :func:`image_features` embeds images with a named feature extractor (:func:`get_feature_extractor`): a local
  Inception-v3 weights file, SSCD (the packaged ONNX model by default) or CLIP image features;
* :func:`clip_score` measures how well images follow their prompts (torchmetrics' convention);
* :func:`quality_report` puts them together for a before / after comparison, and :func:`memorized_becomes`
  measures what memorized prompts render after an edit, against the model's ordinary generations.

A distance is named after its features: ``FID`` and ``KID`` on Inception features only, ``FD_sscd`` or
``KID_clip-random`` otherwise, because a Fréchet distance on other features is not FID and is not on FID's scale.
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DiffmemError, ModelLoadError
from .score.base import EmbeddingScorer, Images, ScorerUnavailableError, get_scorer, to_uint8_list

__all__ = [
    "ImageFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "ScorerFeatures",
    "register_feature_extractor",
    "get_feature_extractor",
    "list_feature_extractors",
    "image_features",
    "frechet_distance",
    "kernel_inception_distance",
    "default_subset_size",
    "clip_score",
    "quality_report",
    "memorized_becomes",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")

SMALL_N_FD_NOTE = (
    "FD is biased upward at small n (two samples of one distribution give FD > 0, less as n grows): compare FD "
    "values only between sets of equal size; KID is unbiased at any n"
)


# ----------------------------------------------------------------------------------------------------------------
# Features


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


# ----------------------------------------------------------------------------------------------------------------
# Distances between feature sets


def _feature_matrix(feats: ImageFeatures | np.ndarray | torch.Tensor, arg: str, min_rows: int = 2) -> np.ndarray:
    values = feats.values if isinstance(feats, ImageFeatures) else feats
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    x = np.asarray(values)
    if x.ndim != 2:
        raise ValueError(f"{arg} must be a 2-D [N, D] feature array, got shape {tuple(x.shape)}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{arg} must hold numbers, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{arg} needs at least {min_rows} rows (images), got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{arg} has no feature columns")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{arg} holds NaN or inf")
    return x


def _check_pair(feats_a: Any, feats_b: Any, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(feats_a, ImageFeatures) and isinstance(feats_b, ImageFeatures) and feats_a.name != feats_b.name:
        raise ValueError(f"feats_a and feats_b come from different features: {feats_a.name!r} and {feats_b.name!r}")
    a = _feature_matrix(feats_a, "feats_a", min_rows)
    b = _feature_matrix(feats_b, "feats_b", min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b differ in feature dimension: {a.shape[1]} and {b.shape[1]}")
    return a, b


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    feats_a: ImageFeatures | np.ndarray | torch.Tensor, feats_b: ImageFeatures | np.ndarray | torch.Tensor
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with sample covariances (``ddof=1``), computed in
    float64. The trace of the matrix square root is taken as ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))``, the sum of
    the square roots of the eigenvalues of a symmetric PSD matrix, which stays real and stable when the covariances
    are singular (fewer images than feature dimensions, as in small reports).

    FD is biased upward at small n: two samples of one distribution give FD > 0. The bias falls like 1/n once n
    is well above the feature dimension, and more slowly below it (on 512-d SSCD features of synthetic images it
    fell from 0.72 at n = 8 to 0.36 at n = 64; see ``docs/scorers.md``). FD values are therefore comparable only
    between sets of the same size; at a few dozen images prefer KID.

    Args:
        feats_a: ``[N_a, D]`` features (array, tensor or :class:`ImageFeatures`), at least 2 rows.
        feats_b: ``[N_b, D]`` features of the same kind.

    Returns:
        The distance, ``>= 0`` (rounding below zero is clipped).

    Raises:
        ValueError: A feature array is not 2-D, has fewer than 2 rows, holds NaN, or the dimensions differ.
    """
    a, b = _check_pair(feats_a, feats_b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    """Unbiased MMD^2 with the kernel ``(gamma <x, y> + coef)^degree`` between two samples of equal size."""
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef) ** degree
    k_yy = (y @ y.T * gamma + coef) ** degree
    k_xy = (x @ y.T * gamma + coef) ** degree
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def default_subset_size(n_a: int, n_b: int) -> int:
    """KID subset size used when none is given: half the smaller set (at least 2, at most 1000)."""
    return int(min(1000, max(2, min(n_a, n_b) // 2)))


def kernel_inception_distance(
    feats_a: ImageFeatures | np.ndarray | torch.Tensor,
    feats_b: ImageFeatures | np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int | None = None,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel distance (KID; Bińkowski et al., 2018) between two feature sets: mean and std over random subsets.

    Each subset draws ``subset_size`` rows of each set without replacement and computes the unbiased MMD^2 with
    the cubic polynomial kernel ``k(x, y) = (<x, y> / D + 1)^3``, as torchmetrics and torch-fidelity do (the std
    over subsets is the population std, as theirs). The estimate is unbiased at any size: its expectation is 0
    for two samples of one distribution, so small negative values occur. ``subset_size`` equal to both set sizes
    gives the deterministic full-set estimate (std 0).

    Args:
        feats_a: ``[N_a, D]`` features (array, tensor or :class:`ImageFeatures`).
        feats_b: ``[N_b, D]`` features of the same kind.
        subsets: Number of random subsets.
        subset_size: Rows drawn from each set per subset, ``2 <= subset_size <= min(N_a, N_b)``; default half
            the smaller set (see :func:`default_subset_size`), so that the std says how much the estimate moves.
        degree: Kernel degree.
        gamma: Kernel scale; ``1 / D`` when ``None``.
        coef: Kernel offset.
        seed: Seed of the subset draws (results are deterministic).

    Returns:
        ``(mean, std)`` over the subsets.

    Raises:
        ValueError: Invalid features (see :func:`frechet_distance`), ``subsets < 1`` or a ``subset_size`` out of
            range.
    """
    a, b = _check_pair(feats_a, feats_b)
    if subsets < 1:
        raise ValueError(f"subsets={subsets} must be >= 1")
    size = default_subset_size(a.shape[0], b.shape[0]) if subset_size is None else int(subset_size)
    if size < 2:
        raise ValueError(f"subset_size={size} must be >= 2")
    for arg, x in (("feats_a", a), ("feats_b", b)):
        if size > x.shape[0]:
            raise ValueError(f"subset_size={size} exceeds the {x.shape[0]} rows of {arg}")
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        ia = rng.permutation(a.shape[0])[:size]
        ib = rng.permutation(b.shape[0])[:size]
        values[s] = _poly_mmd2_unbiased(a[ia], b[ib], degree, g, coef)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------------------------
# CLIP score


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _clip_scorer(model: Any, arch: str, device: str | torch.device, batch_size: int) -> tuple[Any, str | None]:
    """The CLIP scorer meant by ``model`` (see :func:`clip_score`), or ``(None, reason)`` when there is none."""
    from .score.clip import ClipScorer

    if isinstance(model, ClipScorer):
        return model, None
    if model is None:
        return None, "no CLIP weights: pass a local open_clip weights file or a pretrained tag (clip=...)"
    text = str(model)
    is_file = isinstance(model, Path) or any(s in text for s in ("/", "\\")) or Path(text).suffix != ""
    pretrained = None if text == "random" else text
    try:
        return ClipScorer(arch, pretrained=pretrained, device=device, batch_size=batch_size), None
    except ModelLoadError as err:
        if is_file:
            raise
        return None, f"CLIP weights {text!r} not available: {_first_line(err)}"


def clip_score(
    images: Images,
    prompts: Sequence[str],
    model: Any = None,
    arch: str = "ViT-B-32",
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict[str, Any]:
    """CLIP score of images against their prompts: ``100 * max(cos(image, text), 0)``, averaged (torchmetrics).

    Args:
        images: One image per prompt.
        prompts: The prompts the images were generated from.
        model: A built :class:`~diffmem.score.ClipScorer`; a local open_clip weights file or a pretrained tag for
            ``arch`` (``open_clip.create_model_and_transforms(arch, pretrained=model)``); ``"random"`` for random
            weights (plumbing tests: the score means nothing); or ``None`` (no weights: no score).
        arch: open_clip architecture when ``model`` is a file, tag or ``"random"``.
        device: Torch device when the model is built here.
        batch_size: Images or prompts per forward pass when the model is built here.

    Returns:
        ``{"clip_score", "clip_score_std", "per_image", "n", "model", "weights", "note"}`` where ``weights`` is
        ``"random"``, ``"file:<path>"`` or ``"tag:<tag>"`` and ``note`` is ``None`` unless the weights are random.
        Without usable weights (``model=None``, or a tag that cannot be loaded offline):
        ``{"clip_score": None, "reason": "<one line>"}``.

    Raises:
        ValueError: ``prompts`` does not give one prompt per image.
        ModelLoadError: ``model`` names a weights file that does not exist or cannot be loaded.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    n_images = len(to_uint8_list(images))
    if len(prompts) != n_images:
        raise ValueError(f"prompts must give one prompt per image: got {len(prompts)} prompts for {n_images} images")
    scorer, reason = _clip_scorer(model, arch, device, batch_size)
    if scorer is None:
        return {"clip_score": None, "reason": reason}
    if scorer.random_weights:
        weights = "random"
    elif scorer.pretrained is not None and Path(str(scorer.pretrained)).is_file():
        weights = f"file:{scorer.pretrained}"
    else:
        weights = f"tag:{scorer.pretrained}"
    per_image = scorer.clip_score(images, list(prompts)).double().numpy()
    return {
        "clip_score": float(per_image.mean()),
        "clip_score_std": float(per_image.std()),
        "per_image": [float(v) for v in per_image],
        "n": int(per_image.size),
        "model": scorer.model_name,
        "weights": weights,
        "note": "CLIP has random weights: the score is meaningless (plumbing only)" if scorer.random_weights else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# Reports


def _as_features(x: Images | ImageFeatures, extractor: FeatureExtractor | None, arg: str) -> ImageFeatures:
    if isinstance(x, ImageFeatures):
        if extractor is not None and x.name != extractor.name:
            raise ValueError(f"{arg} holds {x.name!r} features, but the extractor makes {extractor.name!r}")
        return x
    assert extractor is not None
    return extractor.features(x)


def _distances(
    fa: ImageFeatures, fb: ImageFeatures, subsets: int, subset_size: int | None, seed: int, names: tuple[str, str]
) -> dict[str, Any]:
    if fa.name != fb.name:
        raise ValueError(f"{names[0]} and {names[1]} hold different features: {fa.name!r} and {fb.name!r}")
    size = default_subset_size(fa.n, fb.n) if subset_size is None else int(subset_size)
    kid_mean, kid_std = kernel_inception_distance(fa, fb, subsets=subsets, subset_size=size, seed=seed)
    notes = [SMALL_N_FD_NOTE + f" (here n = {fa.n} and {fb.n})"]
    if fa.random_weights:
        notes.append(f"the {fa.name!r} features have random weights: the distances are plumbing only")
    if fa.is_inception:
        notes.append(
            "FID on these Inception weights is comparable within this report; published FIDs use the TensorFlow "
            "Inception weights"
        )
    elif not fa.random_weights:
        notes.append(f"{fa.fd_name} is a Fréchet distance on {fa.name} features, not FID: it is not on FID's scale")
    return {
        "features": fa.name,
        "features_source": fa.source,
        "random_weights": fa.random_weights,
        "fd_name": fa.fd_name,
        "fd": frechet_distance(fa, fb),
        "kid_name": fa.kid_name,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subsets": subsets,
        "kid_subset_size": size,
        "seed": seed,
        "notes": notes,
    }


def quality_report(
    before_images: Images | ImageFeatures,
    after_images: Images | ImageFeatures,
    prompts: Sequence[str] | None = None,
    extractor: str | Path | FeatureExtractor | EmbeddingScorer | None = None,
    clip: Any = None,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
    after_prompts: Sequence[str] | None = None,
    clip_arch: str = "ViT-B-32",
) -> dict[str, Any]:
    """Quality after an edit: distances between the images before and after it, and their CLIP scores.

    The distances say how far the edited model's generations moved from the original model's. Reports have a few
    dozen small images, and the two distances behave differently there:

    * KID is unbiased at any n; its ``kid_std`` (over subsets of ``kid_subset_size`` images) shows how much it
      moves. Small negative values mean "no measurable difference".
    * FD is biased upward at small n: two samples of one model give FD > 0, by an amount that shrinks as n
      grows. Compare FD only between reports of the same n, which the result records.

    Args:
        before_images: Generations of the original model (images, or :class:`ImageFeatures` already computed).
        after_images: Generations of the edited model for the same prompts and seeds.
        prompts: The prompts of ``before_images`` (one per image); enables the CLIP scores.
        extractor: Features for the distances, see :func:`image_features` (default SSCD).
        clip: CLIP model for the CLIP scores, see :func:`clip_score`; ``None`` skips them with a note.
        subsets: KID subsets.
        subset_size: KID subset size; default half the smaller set.
        seed: Seed of the KID subsets.
        after_prompts: The prompts of ``after_images`` when they differ from ``prompts``.
        clip_arch: open_clip architecture when ``clip`` is a weights file, a tag or ``"random"``.

    Returns:
        A JSON-ready dict: ``features``, ``features_source``, ``random_weights``, ``fd_name`` (``FID`` or
        ``FD_<features>``), ``fd``, ``kid_name``, ``kid_mean``, ``kid_std``, ``kid_subsets``, ``kid_subset_size``,
        ``seed``, ``n_before``, ``n_after``, ``clip_score_before`` and ``clip_score_after`` (dicts of
        :func:`clip_score`, or ``None``) and ``notes`` (lines the report should show).
    """
    needs_extractor = not (isinstance(before_images, ImageFeatures) and isinstance(after_images, ImageFeatures))
    ext = _resolve_extractor(extractor) if needs_extractor else None
    fa = _as_features(before_images, ext, "before_images")
    fb = _as_features(after_images, ext, "after_images")
    report = _distances(fa, fb, subsets, subset_size, seed, ("before_images", "after_images"))
    report["n_before"], report["n_after"] = fa.n, fb.n
    report["clip_score_before"] = report["clip_score_after"] = None
    if prompts is None:
        report["notes"].append("CLIP score not computed: no prompts given")
    elif isinstance(before_images, ImageFeatures) or isinstance(after_images, ImageFeatures):
        report["notes"].append("CLIP score not computed: pass images, not features")
    else:
        scorer, reason = _clip_scorer(clip, clip_arch, "cpu", 32)
        if scorer is None:
            before = after = {"clip_score": None, "reason": reason}
        else:
            before = clip_score(before_images, prompts, model=scorer)
            after = clip_score(after_images, list(after_prompts or prompts), model=scorer)
        report["clip_score_before"], report["clip_score_after"] = before, after
        if before["clip_score"] is None:
            report["notes"].append(f"CLIP score not computed: {before['reason']}")
        elif before.get("note"):
            report["notes"].append(before["note"])
    return report


def memorized_becomes(
    edited_mem_images: Images | ImageFeatures,
    ordinary_images: Images | ImageFeatures,
    extractor: str | Path | FeatureExtractor | EmbeddingScorer | None = None,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """What memorized prompts render after an edit, measured against the model's ordinary generations.

    KID and FD between the edited model's images for memorized prompts and the same model's images for ordinary
    (non-memorized) prompts, on the same features. Small means the memorized prompts now render as plausible
    ordinary images; large means something unlike them, e.g. dark, structureless noise. As a yardstick, the result
    also gives the KID between two random halves of the ordinary images (``baseline_kid_mean``): what a distance
    between two samples of ordinary images looks like at this size (at least 8 ordinary images).

    Args:
        edited_mem_images: Generations of the edited model for memorized prompts (or their features).
        ordinary_images: Generations of the same model for ordinary prompts (or their features).
        extractor: Features, see :func:`image_features` (default SSCD).
        subsets: KID subsets.
        subset_size: KID subset size; default half the smaller set.
        seed: Seed of the KID subsets and of the baseline split.

    Returns:
        The distance fields of :func:`quality_report` (``features``, ``fd_name``, ``fd``, ``kid_name``,
        ``kid_mean``, ``kid_std``, ...), ``n_memorized``, ``n_ordinary``, ``baseline_kid_mean``,
        ``baseline_kid_std`` (``None`` below 8 ordinary images) and ``notes``.
    """
    needs_extractor = not (isinstance(edited_mem_images, ImageFeatures) and isinstance(ordinary_images, ImageFeatures))
    ext = _resolve_extractor(extractor) if needs_extractor else None
    fm = _as_features(edited_mem_images, ext, "edited_mem_images")
    fo = _as_features(ordinary_images, ext, "ordinary_images")
    report = _distances(fm, fo, subsets, subset_size, seed, ("edited_mem_images", "ordinary_images"))
    report["n_memorized"], report["n_ordinary"] = fm.n, fo.n
    report["baseline_kid_mean"] = report["baseline_kid_std"] = None
    if fo.n >= 8:
        order = np.random.default_rng(seed).permutation(fo.n)
        half = fo.n // 2
        first, second = fo.values[order[:half]], fo.values[order[half : 2 * half]]
        size = min(report["kid_subset_size"], default_subset_size(half, half))
        mean, std = kernel_inception_distance(first, second, subsets=subsets, subset_size=size, seed=seed)
        report["baseline_kid_mean"], report["baseline_kid_std"] = mean, std
        report["baseline_kid_subset_size"] = size
    else:
        report["notes"].append(f"no baseline KID: it needs at least 8 ordinary images, got {fo.n}")
    return report

