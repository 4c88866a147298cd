"""Sharpness of the probability landscape at the first step (Jeon et al., ICML 2025).

Memorized prompts put the sample in a sharp peak of the conditional density. Jeon et al. measure it with the
difference of the conditional and unconditional Hessians of the log density, applied to the guidance direction:

    ``score = || (H_c(x_t) - H_u(x_t)) (s_c(x_t) - s_u(x_t)) ||``

where ``s = grad log p`` is the score and ``H`` its Jacobian. Their released detection code takes the exact
Hessian-vector product with forward-mode AD (``torch.func.jvp`` of the score along ``s_c - s_u``) at the first
sampler step (``hvp_sampling_num = 1``), averaged over 4 initial noises shared by every prompt.

diffmem computes the same product on the denoiser's raw prediction (epsilon, v or flow velocity). At one timestep
the score is an affine function of the prediction with a coefficient shared by every prompt (``-1/sigma`` for
epsilon, ``-alpha/sigma`` for v), so the score-space value is that coefficient squared times the prediction-space
value: the ranking of prompts, hence AUC and TPR, are the same. The prediction space also keeps the signal on a
zero-terminal-SNR schedule, where ``alpha = 0`` at the first step makes the score-space value vanish for every
prompt. ``hvp="finite"`` replaces the exact product by a finite difference (one more denoiser pass per step,
as the SAIL mitigation of the same paper does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import require
from ..detection import DetectorConfig, check_score_steps, denoiser_prediction, register_detector, score_first_steps
from ..errors import DiffmemError
from ..sampling import latent_shape

logger = logging.getLogger(__name__)

__all__ = ["SharpnessConfig", "sharpness_scores"]


@dataclass
class SharpnessConfig(DetectorConfig):
    """Settings of the sharpness detector (Jeon et al. 2025), besides those of
    :class:`~diffmem.detection.DetectorConfig`.

    Args:
        num_seeds: Initial noises per prompt (the paper's ``gen_num``; 4 in its detection runs); every prompt uses
            the same seeds, as the paper seeds each prompt alike.
        sampler: The sampler whose guidance (> 1) advances the latent between scored steps.
        score_steps: Leading sampler steps whose Hessian-score products are averaged (the paper's
            ``hvp_sampling_num``; 1: the first step only, the published setting).
        hvp: ``"jvp"``: the exact Hessian-vector product by forward-mode AD, as the paper; ``"finite"``: a forward
            difference along the guidance direction, one more ``[uncond; cond]`` pass per step.
        fd_eps: Size of the finite-difference step relative to the norm of the latent (``hvp="finite"``).
    """

    score_steps: int = 1
    hvp: str = "jvp"
    fd_eps: float = 1e-3

    def check(self) -> None:
        super().check()
        check_score_steps(self.score_steps, self.sampler)
        require(self.hvp in ("jvp", "finite"), "hvp", self.hvp, "choose 'jvp' or 'finite'")
        require(0 < self.fd_eps < 1, "fd_eps", self.fd_eps, "must be in (0, 1)")


def _sample_arg(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | int]:
    """The denoiser's noisy input and where it sits (position 0 or a keyword)."""
    if args:
        return args[0], 0
    for key in ("sample", "hidden_states"):
        if key in kwargs:
            return kwargs[key], key
    raise DiffmemError("cannot find the denoiser's latent input (sample / hidden_states)")


def sharpness_scores(pipe, prompts: list[str], config: SharpnessConfig | None = None, progress: bool = True,
                     *, first_index: int = 0) -> np.ndarray:
    """Jeon et al.'s ``||(H_c - H_u)(s_c - s_u)||`` per prompt, in the denoiser's prediction space.

    The pipeline runs; :func:`~diffmem.detection.score_first_steps` hands each of the first ``score_steps``
    evaluations to a function that takes the ``[uncond; cond]`` prediction, evaluates the denoiser's
    Jacobian-vector product along ``pred_c - pred_u`` at the same input, and stops the call after the last scored
    step. Any CFG pipeline whose prediction has the latent's shape (Stable Diffusion, PixArt's first half of a
    learned-sigma output, SD3) works.

    Args:
        pipe: The pipeline to audit.
        prompts: Prompts to score.
        config: Detector settings (default: ``SharpnessConfig()``, the published exact product at the first step).
        progress: Show a progress bar.
        first_index: Unused (the seeds are the same for every prompt); accepted for the detector protocol.

    Returns:
        ``float64 [len(prompts)]`` scores, in prompt order.
    """
    del first_index
    config = config or SharpnessConfig()
    channels = latent_shape(pipe, *config.image_size(pipe))[0]

    def hessian_score(module, args, kwargs, output) -> torch.Tensor:
        x, where = _sample_arg(args, kwargs)
        pred = denoiser_prediction(output, channels).float()
        pred_u, pred_c = pred.chunk(2)
        direction = torch.cat([pred_c - pred_u] * 2).to(x.dtype)
        if direction.shape != x.shape:
            raise DiffmemError(f"the prediction {tuple(direction.shape)} does not have the latent's shape "
                               f"{tuple(x.shape)}")

        def f(z: torch.Tensor) -> torch.Tensor:
            if where == 0:
                o = module(z, *args[1:], **kwargs)
            else:
                o = module(*args, **{**kwargs, where: z})
            return denoiser_prediction(o, channels).float()

        if config.hvp == "jvp":
            # fused attention kernels have no forward-mode derivative; the math kernel has (as in the paper)
            with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
                _, jv = torch.func.jvp(f, (x,), (direction,))
        else:
            norm_x = x.float().flatten(1).norm(dim=1)
            norm_v = direction.float().flatten(1).norm(dim=1).clamp_min(1e-12)
            h = (config.fd_eps * norm_x / norm_v).view(-1, *([1] * (x.dim() - 1)))
            jv = (f(x + (h * direction).to(x.dtype)) - pred) / h
        jv_u, jv_c = jv.float().chunk(2)
        return (jv_c - jv_u).flatten(1).norm(dim=1).double().cpu()

    return score_first_steps(pipe, prompts, config, hessian_score, desc="sharpness", progress=progress)


register_detector("sharpness", SharpnessConfig, sharpness_scores,
                  "Jeon et al. (ICML 2025): Hessian-score product ||(H_c - H_u)(s_c - s_u)|| at the first step")
