"""Anisotropy of the log-probability: norm and angular alignment on pure noise (Asthana & Belagiannis, ICLR 2026).

Norm-based detectors (Wen et al.'s ``||s_c - s_u||``) measure the curvature of the log-density as if it were the
same in every direction, which holds at high and medium noise. At low noise the landscape is anisotropic, and
Asthana & Belagiannis show that memorized prompts then align the guidance vector ``s_c - s_u`` with the
unconditional score ``s_u``. Their metric adds the two, both computed on the *pure-noise* input ``x_T`` with no
denoising step at all:

    ``score = norm_weight * ||pred_c(x_T, t_first) - pred_u(x_T, t_first)||
              + cosine_weight * mean_pixels cos(pred_u(x_T, t_low), pred_c(x_T, t_low) - pred_u(x_T, t_low))``

The norm is Wen et al.'s first-step magnitude; the alignment feeds the same noise to the denoiser at a *low-noise*
timestep ``t_low`` (the released code takes the third from last timestep of the sampler's schedule) and takes the
cosine over the latent channels at every position, averaged over positions. Two ``[uncond; cond]`` denoiser passes
per prompt and seed, whatever the schedule's length.

:func:`anisotropy_scores` follows the released detection code (``rohanasthana/memorization-anisotropy``,
``local_model/pipe.py``, ``detect_eval.py``): the first timestep for the norm, ``timesteps[-3]`` for the
alignment, the unconditional-vs-guidance pair (mode ``"x,c|x"``), no normalisation, and the weights of its SD-1
setting (``gamma_1 = 1``, ``gamma_2 = 2``). Where diffmem's reading differs (the norm is on the raw prediction for
every prediction type) is documented in ``docs/faithfulness.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import require
from ..detection import DetectorConfig, denoiser_prediction, register_detector, score_first_steps
from ..errors import DiffmemError
from ..sampling import latent_shape

logger = logging.getLogger(__name__)

__all__ = ["AnisotropyConfig", "anisotropy_scores", "alignment_cosine", "ANISOTROPY_SCORES", "ALIGNMENTS"]

ANISOTROPY_SCORES = ("combined", "norm", "cosine")
ALIGNMENTS = ("uncond-guidance", "uncond-cond", "cond-guidance")


@dataclass
class AnisotropyConfig(DetectorConfig):
    """Settings of the anisotropy detector (Asthana & Belagiannis, ICLR 2026), besides those of
    :class:`~diffmem.detection.DetectorConfig`.

    Args:
        num_seeds: Pure-noise inputs per prompt (the released script's ``gen_num``: 1, with 4 as its other setting).
        sampler: The schedule the two timesteps come from (50 steps, as the paper). No step is taken, so its
            guidance (> 1, so that the pipeline evaluates both halves) and rescale do not change the score.
        score: ``"combined"``: ``norm_weight * norm + cosine_weight * alignment`` (the paper's metric);
            ``"norm"`` or ``"cosine"``: one term alone (diagnostics).
        norm_weight: Weight of the first-step norm (the released code's ``gamma_1``: 1 for SD 1 and SD 2).
        cosine_weight: Weight of the low-noise alignment (``gamma_2``: 2 for SD 1, 0.1 for SD 2).
        alignment: The pair whose cosine is taken at the low-noise timestep: ``"uncond-guidance"``
            (``pred_u`` and ``pred_c - pred_u``, the paper's), ``"uncond-cond"`` or ``"cond-guidance"``.
        low_noise_index: Position in the sampler's schedule of the low-noise timestep the alignment is read at
            (``-3``: the third from last timestep, as the released code).
    """

    num_seeds: int = 1
    score: str = "combined"
    norm_weight: float = 1.0
    cosine_weight: float = 2.0
    alignment: str = "uncond-guidance"
    low_noise_index: int = -3

    def check(self) -> None:
        super().check()
        require(self.score in ANISOTROPY_SCORES, "score", self.score, f"choose one of {', '.join(ANISOTROPY_SCORES)}")
        require(self.alignment in ALIGNMENTS, "alignment", self.alignment, f"choose one of {', '.join(ALIGNMENTS)}")
        for name in ("norm_weight", "cosine_weight"):
            v = getattr(self, name)
            require(v >= 0 and np.isfinite(v), name, v, "must be finite and >= 0")
        require(self.norm_weight > 0 or self.cosine_weight > 0, "cosine_weight", self.cosine_weight,
                "and norm_weight cannot both be 0")
        n = self.sampler.num_inference_steps
        require(-n <= self.low_noise_index < n, "low_noise_index", self.low_noise_index,
                f"must index the {n}-step schedule (in [-{n}, {n - 1}])")

    @property
    def score_steps(self) -> int:
        """Denoiser calls of the sampler that are scored: the first (both passes read the initial noise)."""
        return 1

def _timestep_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | int]:
    """The denoiser's timestep argument and where it sits (position 1 or the ``timestep`` keyword)."""
    if "timestep" in kwargs:
        return torch.as_tensor(kwargs["timestep"]), "timestep"
    if len(args) > 1:
        return torch.as_tensor(args[1]), 1
    raise DiffmemError("cannot find the denoiser's timestep argument")


def alignment_cosine(pred_u: torch.Tensor, pred_c: torch.Tensor, alignment: str = "uncond-guidance") -> torch.Tensor:
    """Cosine over the channels at every latent position, averaged over positions: ``[B, C, ...] -> [B]``.

    Args:
        pred_u: Unconditional prediction.
        pred_c: Conditional prediction of the same inputs.
        alignment: ``"uncond-guidance"`` (``pred_u`` vs ``pred_c - pred_u``), ``"uncond-cond"`` or
            ``"cond-guidance"``.
    """
    guidance = pred_c - pred_u
    a, b = {"uncond-guidance": (pred_u, guidance), "uncond-cond": (pred_u, pred_c),
            "cond-guidance": (pred_c, guidance)}[alignment]
    return F.cosine_similarity(a.float(), b.float(), dim=1).flatten(1).mean(1)


def anisotropy_scores(pipe, prompts: list[str], config: AnisotropyConfig | None = None, progress: bool = True,
                      *, first_index: int = 0) -> np.ndarray:
    """The anisotropy metric per prompt (see the module docstring): two ``[uncond; cond]`` passes on pure noise.

    The pipeline runs; :func:`~diffmem.detection.score_first_steps` hands its first denoiser call (the first
    timestep, on the initial noise) to a function that takes the norm of ``pred_c - pred_u``, calls the denoiser
    once more on the same input at the schedule's low-noise timestep for the alignment, and the pipeline stops. Any
    CFG pipeline whose prediction starts with the latent's channels works (Stable Diffusion, PixArt's learned-sigma
    output, SD3).

    Args:
        pipe: The pipeline to audit.
        prompts: Prompts to score.
        config: Detector settings (default: ``AnisotropyConfig()``, the released code's SD-1 setting).
        progress: Show a progress bar.
        first_index: Unused (the seeds are the same for every prompt); accepted for the detector protocol.

    Returns:
        ``float64 [len(prompts)]`` scores, in prompt order (larger: more likely memorized).
    """
    del first_index
    config = config or AnisotropyConfig()
    channels = latent_shape(pipe, *config.image_size(pipe))[0]
    if config.score == "combined":
        weights = (config.norm_weight, config.cosine_weight)
    else:
        weights = (float(config.score == "norm"), float(config.score == "cosine"))

    def metric(module, args, kwargs, output) -> torch.Tensor:
        pred_u, pred_c = denoiser_prediction(output, channels).float().chunk(2)
        norm = (pred_c - pred_u).flatten(1).norm(dim=1)
        t, where = _timestep_of(args, kwargs)
        t_low = torch.full_like(t, float(pipe.scheduler.timesteps[config.low_noise_index]))
        low = module(args[0], t_low, *args[2:], **kwargs) if where == 1 else module(*args, **{**kwargs, where: t_low})
        low_u, low_c = denoiser_prediction(low, channels).float().chunk(2)
        cosine = alignment_cosine(low_u, low_c, config.alignment)
        return (weights[0] * norm + weights[1] * cosine).double().cpu()

    with torch.no_grad():
        return score_first_steps(pipe, prompts, config, metric, desc="anisotropy", progress=progress)


register_detector("anisotropy", AnisotropyConfig, anisotropy_scores,
                  "Asthana & Belagiannis (ICLR 2026): first-step norm plus low-noise alignment of the guidance with "
                  "the unconditional prediction, on pure noise")
