"""Memorization detection without training data (Wen et al., ICLR 2024).

The score of a prompt is the magnitude of the text-conditional part of the denoiser's prediction,
``||pred(x_t, c) - pred(x_t, empty)||``, averaged over the first ``k`` sampling steps and ``n`` seeds. Memorized
prompts pull the prediction hard towards one image, so their score is large. ``k = 1`` is the cheap mode: one
denoiser call per prompt and seed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.metrics import roc_auc, tpr_at_fpr
from diffmem.sampling import image_size, initial_latents

logger = logging.getLogger(__name__)

__all__ = ["DetectConfig", "noise_norm_scores", "detect", "DetectionResult", "flag_calibrated"]


@dataclass
class DetectConfig:
    """How to compute the Wen et al. score.

    Args:
        steps: Leading sampling steps to average over (k); 1 is the cheap mode.
        num_seeds: Initial noises per prompt (n).
        seed: First seed; noise ``j`` of every prompt uses ``seed + j``, independent of batching.
        num_inference_steps: Length of the sampler schedule the leading steps are taken from.
        guidance_scale: Guidance used to advance the latent between the ``k`` steps.
        guidance_rescale: Guidance rescale (Lin et al. 2023) used to advance the latent.
        batch_size: Prompts per denoiser call (each call holds ``2 * batch_size * num_seeds`` rows at most).
        height: Image height (pipeline default when ``None``).
        width: Image width (pipeline default when ``None``).
        space: ``"model"`` compares the raw denoiser outputs (epsilon or v, as the model predicts);
            ``"epsilon"`` converts v-predictions to epsilon first. With a zero-terminal-SNR schedule the first
            step's epsilon carries no text signal, so ``"model"`` is the default.
    """

    steps: int = 1
    num_seeds: int = 4
    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    space: str = "model"

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= self.num_inference_steps:
            raise ValueError(f"steps={self.steps!r} is invalid: must be in [1, num_inference_steps]")
        if self.num_seeds < 1:
            raise ValueError(f"num_seeds={self.num_seeds!r} is invalid: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} is invalid: must be >= 1")
        if self.space not in ("model", "epsilon"):
            raise ValueError(f"space={self.space!r} is invalid: choose 'model' or 'epsilon'")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def noise_norm_scores(pipe, prompts: list[str], config: DetectConfig | None = None,
                      progress: bool = True) -> np.ndarray:
    """Wen et al.'s text-conditional prediction magnitude for each prompt.

    Args:
        pipe: A Stable Diffusion style pipeline (``unet``, ``scheduler``, ``encode_prompt``).
        prompts: Prompts to score.
        config: Detection settings.
        progress: Show a progress bar.

    Returns:
        ``float64 [len(prompts)]`` scores, in prompt order.
    """
    config = config or DetectConfig()
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    height, width = image_size(pipe, config.height, config.width)
    out = np.zeros(len(prompts), dtype=np.float64)
    sched = pipe.scheduler
    pred_type = sched.config.get("prediction_type", "epsilon")
    bar = tqdm(range(0, len(prompts), config.batch_size), desc="detect", disable=not progress)
    for start in bar:
        batch = prompts[start : start + config.batch_size]
        b, n = len(batch), config.num_seeds
        cond, uncond = pipe.encode_prompt(batch, device, n, True, negative_prompt=[""] * b)
        embeds = torch.cat([uncond, cond]).to(dtype)
        seeds = [config.seed + j for _ in batch for j in range(n)]
        latents = initial_latents(pipe, seeds, height, width).to(device, dtype)
        latents = latents * sched.init_noise_sigma
        sched.set_timesteps(config.num_inference_steps, device=device)
        total = torch.zeros(b * n, dtype=torch.float64)
        for i, t in enumerate(sched.timesteps[: config.steps]):
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            pred = unet(inp, t, encoder_hidden_states=embeds).sample
            pred_u, pred_c = pred.float().chunk(2)
            diff = pred_c - pred_u
            if config.space == "epsilon" and pred_type == "v_prediction":
                a = sched.alphas_cumprod.to(device)[int(t)].float()
                diff = diff * a.sqrt()
            total += diff.flatten(1).norm(dim=1).double().cpu()
            if i + 1 < config.steps:
                guided = pred_u + config.guidance_scale * (pred_c - pred_u)
                if config.guidance_rescale > 0:
                    std_c = pred_c.std(dim=list(range(1, pred_c.ndim)), keepdim=True)
                    std_g = guided.std(dim=list(range(1, guided.ndim)), keepdim=True)
                    rescaled = guided * (std_c / std_g)
                    guided = config.guidance_rescale * rescaled + (1 - config.guidance_rescale) * guided
                latents = sched.step(guided.to(dtype), t, latents).prev_sample
        out[start : start + b] = (total / config.steps).view(b, n).mean(1).numpy()
    return out


@dataclass
class DetectionResult:
    """Scores and, with labels, the detection quality."""

    prompts: list[str]
    scores: np.ndarray
    labels: np.ndarray | None = None
    auc: float | None = None
    tpr_at_1fpr: float | None = None
    threshold: float | None = None
    flagged: np.ndarray | None = None

    def ranked(self) -> list[dict]:
        """Rows sorted by decreasing score."""
        order = np.argsort(-self.scores, kind="stable")
        rows = []
        for rank, i in enumerate(order):
            row = {"rank": rank + 1, "prompt": self.prompts[i], "score": float(self.scores[i])}
            if self.labels is not None:
                row["memorized"] = bool(self.labels[i])
            if self.flagged is not None:
                row["flagged"] = bool(self.flagged[i])
            rows.append(row)
        return rows

    def summary(self) -> dict:
        return {
            "num_prompts": len(self.prompts),
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1fpr,
            "threshold": self.threshold,
            "num_flagged": None if self.flagged is None else int(self.flagged.sum()),
        }


def flag_calibrated(scores: np.ndarray, reference_scores: np.ndarray, m: float = 3.0) -> tuple[np.ndarray, float]:
    """Flag scores above ``mean + m * std`` of scores of known non-memorized prompts.

    Returns:
        The boolean flags and the threshold.
    """
    ref = np.asarray(reference_scores, dtype=np.float64)
    if ref.size < 2:
        raise ValueError("calibration needs at least 2 non-memorized prompts")
    thr = float(ref.mean() + m * ref.std(ddof=1))
    return np.asarray(scores) > thr, thr


def detect(pipe, prompts: list[str], config: DetectConfig | None = None, labels: list[bool] | None = None,
           calibration_prompts: list[str] | None = None, m: float = 3.0, progress: bool = True) -> DetectionResult:
    """Score prompts, and report AUC/TPR@1%FPR with labels or flag them with a calibrated threshold.

    Args:
        pipe: The pipeline to audit.
        prompts: Prompts to score.
        config: Detection settings.
        labels: Optional ground truth (True = memorized) for AUC and TPR at 1% FPR.
        calibration_prompts: Known non-memorized prompts; flags prompts above ``mean + m * std`` of theirs.
        m: Width of the calibrated threshold in standard deviations.
        progress: Show progress bars.

    Returns:
        A :class:`DetectionResult`.
    """
    config = config or DetectConfig()
    scores = noise_norm_scores(pipe, prompts, config, progress=progress)
    res = DetectionResult(list(prompts), scores)
    if labels is not None:
        lab = np.asarray(labels, dtype=bool)
        res.labels = lab
        if lab.any() and (~lab).any():
            res.auc = roc_auc(scores, lab)
            res.tpr_at_1fpr = tpr_at_fpr(scores, lab, 0.01)
    if calibration_prompts:
        ref = noise_norm_scores(pipe, calibration_prompts, config, progress=progress)
        res.flagged, res.threshold = flag_calibrated(scores, ref, m)
    return res
