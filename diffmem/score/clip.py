"""CLIP image embeddings (open_clip) for image-image similarity, and the CLIP score of images against prompts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ModelLoadError
from .base import EmbeddingScorer, Images, register_scorer, to_uint8_list

__all__ = ["ClipScorer"]

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@register_scorer("clip")
class ClipScorer(EmbeddingScorer):
    """Cosine similarity of open_clip image embeddings.

    Args:
        model_name: open_clip model name (``open_clip.list_models()``), or an ``hf-hub:`` / ``local-dir:`` id.
        pretrained: A pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``; downloaded into the
            open_clip / Hugging Face cache at first use), a local weights file, or ``None`` for random weights
            (plumbing tests only: the numbers mean nothing).
        device: Torch device for the model.
        batch_size: Images or prompts per forward pass.
        threshold: Replication threshold on image-image cosine similarity (default 0.95).
        cache_dir: Where open_clip caches downloaded weights.
        **model_kwargs: Overrides of the model config passed to ``open_clip.create_model_and_transforms``
            (e.g. ``embed_dim``, ``vision_cfg``, ``text_cfg``).
    """

    threshold = 0.95

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | Path | None = "openai",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        threshold: float | None = None,
        cache_dir: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        import open_clip

        self._set_options(batch_size, device, threshold)
        self.model_name = model_name
        self.random_weights = pretrained is None
        if pretrained is not None:
            as_path = Path(pretrained).expanduser()
            looks_like_path = (
                isinstance(pretrained, Path)
                or any(sep in str(pretrained) for sep in ("/", "\\"))
                or as_path.suffix.lower() in _WEIGHT_SUFFIXES
            )
            if looks_like_path and not as_path.is_file():
                raise ModelLoadError(f"CLIP weights file {str(as_path)!r} does not exist")
            pretrained = str(as_path.resolve()) if looks_like_path else str(pretrained)
        self.pretrained = pretrained
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device, cache_dir=cache_dir, **model_kwargs
            )
            self.tokenizer = open_clip.get_tokenizer(model_name, context_length=getattr(net, "context_length", None))
        except (RuntimeError, ValueError, OSError, KeyError) as err:
            raise ModelLoadError(
                f"cannot build open_clip model {model_name!r} (pretrained={pretrained!r}): {_first_line(err)}"
            ) from None
        self.model = net.eval()
        self.preprocess = preprocess
        if self.random_weights:
            logger.warning(
                "CLIP scorer %r has random weights (pretrained=None): its similarities are meaningless", model_name
            )

    @torch.inference_mode()
    def embed(self, images: Images) -> torch.Tensor:
        """CLIP image embeddings, L2-normalised.

        Args:
            images: PIL images or uint8 ``[B, H, W, 3]`` arrays.

        Returns:
            float32 ``[B, D]`` tensor on the CPU.
        """
        arrays = to_uint8_list(images)
        outs = []
        for i in range(0, len(arrays), self.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in arrays[i : i + self.batch_size]])
            outs.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
        return F.normalize(torch.cat(outs), dim=1)

    @torch.inference_mode()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings, L2-normalised.

        Args:
            prompts: Texts.

        Returns:
            float32 ``[len(prompts), D]`` tensor on the CPU.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        outs = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[i : i + self.batch_size]))
            outs.append(self.model.encode_text(tokens.to(self.device)).float().cpu())
        return F.normalize(torch.cat(outs), dim=1)

    def clip_score(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP score of each image against its prompt: ``max(100 * cosine, 0)``, as torchmetrics' CLIPScore.

        Args:
            images: One image per prompt.
            prompts: Texts, as many as images.

        Returns:
            float32 ``[B]`` tensor (torchmetrics reports the mean of it).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        img = self.embed(images)
        if img.shape[0] != len(prompts):
            raise ValueError(
                f"clip_score needs one prompt per image, got {img.shape[0]} images and {len(prompts)} prompts"
            )
        txt = self.embed_text(prompts)
        return (100.0 * (img * txt).sum(dim=1)).clamp(min=0.0)

    def describe(self) -> dict[str, Any]:
        cfg = getattr(getattr(self.model, "visual", None), "preprocess_cfg", None) or {}
        if cfg:
            size = cfg.get("size")
            preprocessing = (
                f"open_clip eval transform: resize ({cfg.get('resize_mode')}) to {size} {cfg.get('interpolation')}, "
                f"centre crop, normalise with mean {tuple(np.round(cfg.get('mean', ()), 4))} "
                f"and std {tuple(np.round(cfg.get('std', ()), 4))}"
            )
        else:
            preprocessing = "open_clip eval transform"
        return {
            **super().describe(),
            "source": f"open_clip:{self.model_name} "
            + (f"pretrained={self.pretrained}" if self.pretrained else "(random)"),
            "preprocessing": preprocessing,
            "random_weights": self.random_weights,
            "similarity": "cosine of L2-normalised image embeddings; clip_score = max(100 * cos(image, text), 0)",
        }
