"""CLIP score: how well images follow their prompts (torchmetrics' convention)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from ..score.base import Images, to_uint8_list

__all__ = ["clip_score"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _clip_scorer(model: Any, arch: str, device: str | torch.device, batch_size: int) -> tuple[Any, str | None]:
    """The CLIP scorer meant by ``model`` (see :func:`clip_score`), or ``(None, reason)`` when there is none."""
    from ..score.clip import ClipScorer

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

