"""Redirect memorized prompts after their images are deleted: a closed-form edit of the cross-attention keys and
values so that each given memorized prompt reads, to the denoiser, like an ordinary caption.

A prune deletes what the memorized prompts recall, but the prompts still steer the denoiser toward the deleted
weights, and render as structureless noise. :func:`fit_redirect` solves, for every cross-attention layer, the
least-squares map ``M`` (applied as ``W_k M`` and ``W_v M``) that sends the memorized prompts' text features to
those of ordinary captions, token by token, while the ``keep`` prompts' features stay where they are:

    min_M  1/N_e Σ_e ||W M x_e - W a_e||² + λ/N_p Σ_p ||W M x_p - W x_p||²

solved for all ``W`` at once by ``M = (A^T X_e / N_e + λ X_p^T X_p / N_p + εI)(X_e^T X_e / N_e + λ X_p^T X_p / N_p
+ εI)^-1`` (the ridge ``ε`` pulls ``M`` toward the identity).
No image enters it, so it cannot teach the model anything about the deleted images; weights the edit zeroed stay
zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..edits import Edit, WeightDelta
from ..errors import DiffmemError
from ..objective import denoiser_call, encode_conditioning
from ..targets import get_denoiser

__all__ = ["cross_attention_layers", "fit_redirect", "token_pairs"]

logger = logging.getLogger(__name__)


def cross_attention_layers(denoiser: Any) -> dict[str, Any]:
    """Name -> attention module, for every cross-attention (text-reading) layer with ``to_k`` and ``to_v``."""
    return {name: m for name, m in denoiser.named_modules()
            if getattr(m, "is_cross_attention", False) and hasattr(m, "to_k") and hasattr(m, "to_v")}


def _features(pipe: Any, cond: torch.Tensor, layers: dict[str, Any], batch: int = 16) -> dict[str, torch.Tensor]:
    """The inputs of every layer's ``to_k`` for the conditionings ``cond`` ``[P, L, D]``: ``{name: [P, L, D']}``."""
    denoiser = get_denoiser(pipe)
    side = int(denoiser.config.get("sample_size") or 8)  # latent side; keys and values do not depend on it
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    predict = denoiser_call(pipe, side * scale, side * scale)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.to_k.register_forward_pre_hook(lambda _m, inp, n=n: seen[n].append(inp[0].detach().float().cpu()))
             for n, m in layers.items()]
    channels = int(denoiser.config.get("in_channels"))
    param = next(denoiser.parameters())
    try:
        with torch.no_grad():
            for i in range(0, cond.shape[0], batch):
                c = cond[i: i + batch].to(param.device, param.dtype)
                x = torch.zeros(c.shape[0], channels, side, side, device=param.device, dtype=param.dtype)
                predict(x, torch.tensor(500, device=param.device), c, None)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def token_pairs(pipe: Any, layers: dict[str, Any], prompts: Sequence[str], anchors: Sequence[str],
                keep: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The redirect's data per layer: ``(x_e, a_e, x_p)``, fp64 rows of ``to_k`` inputs (memorized tokens, their
    anchors' tokens, the kept prompts' tokens).

    Token ``j`` of prompt ``i`` is paired with token ``j`` of ``anchors[i % len(anchors)]``, or with the anchor's last
    real token past its end; padding tokens (zero conditioning vectors, masked out by the denoiser) are left out.
    """
    sent = [anchors[i % len(anchors)] for i in range(len(prompts))]
    c_mem, c_anchor, c_keep = (encode_conditioning(pipe, list(x))[0] for x in (prompts, sent, keep))
    valid_mem, valid_anchor, valid_keep = (c.abs().sum(-1) > 0 for c in (c_mem, c_anchor, c_keep))
    last = valid_anchor.long().cumsum(1).argmax(1)
    positions = torch.minimum(torch.arange(c_mem.shape[1])[None].expand(c_mem.shape[0], -1), last[:, None])
    f_mem, f_anchor, f_keep = (_features(pipe, c, layers) for c in (c_mem, c_anchor, c_keep))
    out = {}
    for name in layers:
        ae = torch.gather(f_anchor[name], 1, positions[..., None].expand(-1, -1, f_anchor[name].shape[-1]))
        out[name] = (f_mem[name][valid_mem].double(), ae[valid_mem].double(), f_keep[name][valid_keep].double())
    return out


def fit_redirect(pipe: Any, edit: Edit | None, prompts: Sequence[str], anchors: Sequence[str],
                 keep: Sequence[str], preserve: float = 1.0, ridge: float = 1e-3) -> WeightDelta:
    """``edit`` with every cross-attention layer's keys and values redirected (see the module docstring).

    Args:
        pipe: The pipeline (unchanged on return).
        edit: The deletion to build on (baked first; its zeros stay zero), or ``None``.
        prompts: The memorized prompts to redirect.
        anchors: Ordinary captions; prompt ``i`` is sent to ``anchors[i % len(anchors)]`` (sending each to the
            caption with the closest text features was tried: the memorized prompts' KID rose, docs/mitigation.md).
        keep: Prompts whose keys and values must not move (ordinary captions).
        preserve: ``λ``, the weight of ``keep`` against ``prompts`` (each term averaged over its tokens).
        ridge: ``ε`` relative to the mean eigenvalue of the normal matrix.

    Returns:
        The combined change (the edit and the redirect) as a :class:`~diffmem.edits.WeightDelta`.
    """
    if not prompts or not anchors or not keep:
        raise DiffmemError("redirect needs memorized prompts, ordinary anchor captions and prompts to keep")
    if not preserve > 0:
        raise DiffmemError(f"redirect: preserve must be > 0, got {preserve}")
    denoiser = get_denoiser(pipe)
    layers = cross_attention_layers(denoiser)
    if not layers:
        raise DiffmemError(f"redirect: {type(denoiser).__name__} has no cross-attention layers")
    originals = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    try:
        if edit is not None:
            edit.bake(pipe)
        zeroed = {n: (p.detach() == 0) & (originals[n] != 0) for n, p in denoiser.named_parameters()}
        pairs = token_pairs(pipe, layers, prompts, anchors, keep)
        with torch.no_grad():
            for name, module in layers.items():
                xe, ae, xp = pairs[name]
                gram_keep = preserve * xp.T @ xp / len(xp)
                normal = xe.T @ xe / len(xe) + gram_keep
                # the ridge pulls M toward the identity: directions neither set covers are left as they were
                eye = ridge * normal.diagonal().mean() * torch.eye(normal.shape[0], dtype=normal.dtype)
                normal += eye
                rhs = ae.T @ xe / len(xe) + gram_keep + eye
                mapping = torch.linalg.solve(normal, rhs, left=False)  # rhs @ normal^-1
                for proj in (module.to_k, module.to_v):
                    w = proj.weight
                    w.copy_((w.double() @ mapping).to(w.dtype))
        params = dict(denoiser.named_parameters())
        with torch.no_grad():
            for n, z in zeroed.items():
                if bool(z.any()):
                    params[n].masked_fill_(z, 0)
        delta = WeightDelta.between(originals, pipe, meta={"method": "redirect", "preserve": preserve,
                                                          "base_edit": None if edit is None else edit.kind,
                                                          "prompts": len(prompts), "layers": len(layers)})
    finally:
        with torch.no_grad():
            for n, p in denoiser.named_parameters():
                p.copy_(originals[n])
    logger.info("redirect: %d memorized prompts sent to ordinary captions in %d cross-attention layers (%d weights "
                "changed with the edit)", len(prompts), len(layers), delta.num_params_changed())
    return delta
