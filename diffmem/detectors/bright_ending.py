"""Bright Ending: end-token cross-attention at the last denoising step (Chen et al., ICLR 2025).

Chen et al. observe that at the final denoising step the image patches a model reproduces from its training data
attend abnormally strongly to the prompt's end token (``<|endoftext|>`` right after the prompt for CLIP
tokenizers, ``</s>`` for T5), while patches it composes freely attend to the prompt's words. The end-token
attention map, averaged over heads and cross-attention layers, is therefore a local memorization mask found
without any training data.

:func:`bright_ending_scores` runs the whole sampler (the map is read at the last step), captures the attention
probabilities of every cross-attention layer of the denoiser at that step through scoped processor wrappers
(:class:`EndTokenAttention`), and returns per prompt a score, the map upsampled to image size (min-max normalised
to [0, 1]) and the mask (map >= ``mask_threshold``). The score is one of

* ``"local_noise_norm"``: Chen et al.'s BE-enhanced magnitude: Wen et al.'s text-conditional prediction
  difference weighted by the map, ``mean_t ||m * (pred_c - pred_u)|| / mean(m)``, over every step of the same
  generation (the per-step differences are kept until the map is known);
* ``"attention"``: the mean end-token attention probability inside the mask;
* ``"contrast"``: that mean minus the mean outside the mask;
* ``"mean"``: the mean end-token attention probability over the whole image.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import require
from ..detection import DetectorConfig, DetectorOutput, denoiser_prediction, register_detector
from ..errors import DiffmemError
from ..sampling import initial_latents, latent_shape
from ..targets import get_denoiser

logger = logging.getLogger(__name__)

__all__ = ["BrightEndingConfig", "EndTokenAttention", "bright_ending_scores", "end_token_positions",
           "BRIGHT_ENDING_SCORES"]

BRIGHT_ENDING_SCORES = ("local_noise_norm", "attention", "contrast", "mean")


@dataclass
class BrightEndingConfig(DetectorConfig):
    """Settings of the Bright Ending detector, besides those of :class:`~diffmem.detection.DetectorConfig`.

    Args:
        num_seeds: Initial noises per prompt; scores and maps are averaged over them.
        sampler: The generation's sampler (the whole schedule runs; guidance > 1).
        score: How a prompt's map becomes its score (see the module docstring): ``"local_noise_norm"``,
            ``"attention"``, ``"contrast"`` or ``"mean"``.
        end_tokens: ``"first"``: the end token right after the prompt (the paper's); ``"all"``: it and every
            padding position after it.
        mask_threshold: A pixel is in the mask where the min-max normalised map reaches this value.
        layers: Regex on the names of the cross-attention modules to average (``None``: all of them).
    """

    num_seeds: int = 1
    score: str = "local_noise_norm"
    end_tokens: str = "first"
    mask_threshold: float = 0.5
    layers: str | None = None

    def check(self) -> None:
        super().check()
        require(self.score in BRIGHT_ENDING_SCORES, "score", self.score,
                f"choose one of {', '.join(BRIGHT_ENDING_SCORES)}")
        require(self.end_tokens in ("first", "all"), "end_tokens", self.end_tokens, "choose 'first' or 'all'")
        require(0 < self.mask_threshold < 1, "mask_threshold", self.mask_threshold, "must be in (0, 1)")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as err:
                require(False, "layers", self.layers, f"is not a regex ({err})")


def _sequence_length(pipe) -> int:
    """Length of the token sequence the pipeline encodes: its ``max_sequence_length`` default (PixArt: 120), else
    the tokenizer's ``model_max_length`` (CLIP: 77)."""
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if param is not None and isinstance(param.default, int):
        return param.default
    return min(int(pipe.tokenizer.model_max_length), 512)


def end_token_positions(pipe, prompts: list[str], which: str = "first") -> list[list[int]]:
    """Positions of the end token(s) of each prompt in the sequence the pipeline's text encoder sees.

    The first end token is the first ``eos_token_id`` after position 0 (CLIP: ``<|endoftext|>`` after the prompt;
    T5: ``</s>``); a prompt truncated by the tokenizer ends at its last position. ``which="all"`` adds every later
    position up to the pipeline's sequence length (the padding, which CLIP pads with the end token).

    Returns:
        One list of positions per prompt.
    """
    tok = getattr(pipe, "tokenizer", None)
    if tok is None or tok.eos_token_id is None:
        raise DiffmemError("Bright Ending needs the pipeline's tokenizer and its end-of-text token")
    max_len = _sequence_length(pipe)
    out = []
    for prompt in prompts:
        ids = tok(prompt, truncation=True, max_length=max_len, add_special_tokens=True).input_ids
        eos = [i for i, t in enumerate(ids) if t == tok.eos_token_id and i > 0]
        first = eos[0] if eos else len(ids) - 1
        out.append([first] if which == "first" else list(range(first, max_len)))
    return out


class EndTokenAttention:
    """Scoped capture of the cross-attention probabilities to given key positions, at chosen denoiser calls.

    On entry every cross-attention module of the denoiser (a diffusers ``Attention`` with
    ``is_cross_attention``; names filtered by ``layers``) gets a wrapper around its processor, which computes the
    probabilities explicitly while :attr:`active` is true and then calls the original processor, so the model's
    output is unchanged. On exit, also after an exception, the original processors are back.

    Args:
        denoiser: A UNet or transformer denoiser.
        layers: Regex on module names, or ``None`` for every cross-attention module.

    Raises:
        DiffmemError: The denoiser has no matching cross-attention module (e.g. SD3's joint attention).
    """

    def __init__(self, denoiser: torch.nn.Module, layers: str | None = None) -> None:
        from diffusers.models.attention_processor import Attention

        pattern = re.compile(layers) if layers else None
        self.modules = {n: m for n, m in denoiser.named_modules() if isinstance(m, Attention) and
                        getattr(m, "is_cross_attention", False) and (pattern is None or pattern.search(n))}
        if not self.modules:
            raise DiffmemError(f"the denoiser ({type(denoiser).__name__}) has no cross-attention layers"
                               f"{' matching ' + repr(layers) if layers else ''}; Bright Ending reads the "
                               "attention of image patches to the text (joint-attention models such as SD3 are "
                               "not supported)")
        self.active = False
        self.positions: list[list[int]] = []
        self.maps: dict[str, torch.Tensor] = {}
        self._saved: dict[str, object] = {}

    def _record(self, name: str, attn, hidden_states, encoder_hidden_states, attention_mask) -> None:
        h = hidden_states
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)
        batch, seq = encoder_hidden_states.shape[:2]
        mask = attn.prepare_attention_mask(attention_mask, seq, batch) if attention_mask is not None else None
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        e = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q, k = attn.to_q(h), attn.to_k(e)
        heads = attn.heads
        q = q.view(batch, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(batch, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
        if mask is not None:
            scores = scores + mask.float().view(batch, heads, -1, seq)
        probs = scores.softmax(-1)  # [B, heads, N, S]
        cond = probs[batch // 2 :].mean(1)  # the conditional half of [uncond; cond], mean over heads: [B/2, N, S]
        if len(self.positions) != cond.shape[0]:
            raise DiffmemError(f"{len(self.positions)} end-token rows for {cond.shape[0]} conditional rows")
        self.maps[name] = torch.stack([cond[i][:, pos].mean(-1) for i, pos in enumerate(self.positions)])

    def __enter__(self) -> EndTokenAttention:
        owner = self
        if any(isinstance(m.processor, _Wrapped) for m in self.modules.values()):
            raise DiffmemError("these cross-attention layers are already being captured (nested EndTokenAttention)")
        try:
            for name, module in self.modules.items():
                inner = module.processor

                def wrapper(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                            *args, _inner=inner, _name=name, **kwargs):
                    if owner.active and encoder_hidden_states is not None:
                        owner._record(_name, attn, hidden_states, encoder_hidden_states, attention_mask)
                    return _inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

                self._saved[name] = inner
                module.processor = _Wrapped(wrapper, inner)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name, inner in self._saved.items():
            self.modules[name].processor = inner
        self._saved.clear()
        self.active = False


class _Wrapped:
    """A processor that forwards to a capturing wrapper; keeps the original's signature visible to diffusers."""

    def __init__(self, fn, inner) -> None:
        self._fn = fn
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        return self._fn(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _to_grid(flat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, N]`` token values to ``[B, h, w]`` at ``size`` (the patch grid found from N and the aspect ratio)."""
    height, width = size
    stride = math.sqrt(height * width / flat.shape[1])
    gh = max(1, round(height / stride))
    gw = flat.shape[1] // gh
    if gh * gw != flat.shape[1]:
        raise DiffmemError(f"cannot lay {flat.shape[1]} tokens on a grid of aspect {height}x{width}")
    grid = flat.view(-1, 1, gh, gw)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``[h, w]`` map of a ``[B, h, w]`` batch to [0, 1] (a flat map becomes all ones)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 1e-12, (flat - lo) / span.clamp_min(1e-12), torch.ones_like(flat))
    return out.view_as(maps)


@torch.no_grad()
def bright_ending_scores(pipe, prompts: list[str], config: BrightEndingConfig | None = None, progress: bool = True,
                         *, first_index: int = 0) -> DetectorOutput:
    """Bright Ending scores, maps and masks per prompt (see the module docstring).

    Args:
        pipe: A CFG pipeline whose denoiser has cross-attention (Stable Diffusion, SDXL, PixArt).
        prompts: Prompts to score.
        config: Detector settings.
        progress: Show a progress bar.
        first_index: Unused (every prompt uses the same seeds); accepted for the detector protocol.

    Returns:
        A :class:`~diffmem.detection.DetectorOutput`: ``float64 [P]`` scores, ``float32 [P, H, W]`` maps in [0, 1]
        at image size (mean over seeds, normalised) and ``bool [P, H, W]`` masks.
    """
    del first_index
    config = config or BrightEndingConfig()
    denoiser = get_denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    height, width = config.image_size(pipe)
    channels, lh, lw = latent_shape(pipe, height, width)
    n = config.num_seeds
    scores = np.zeros(len(prompts), dtype=np.float64)
    maps_out = np.zeros((len(prompts), height, width), dtype=np.float32)
    diffs: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs) -> None:
        # the pipeline has set the scheduler's timesteps by its first denoiser call; the last one is the last step
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(torch.as_tensor(t).flatten()[0])
        capture.active = t == float(pipe.scheduler.timesteps[-1])
        if capture.active:
            capture.maps.clear()

    def hook(module, args, kwargs, output) -> None:
        if config.score == "local_noise_norm":
            pred_u, pred_c = denoiser_prediction(output, channels).float().chunk(2)
            diffs.append((pred_c - pred_u).cpu())

    capture = EndTokenAttention(denoiser, config.layers)
    handles = [denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True),
               denoiser.register_forward_hook(hook, with_kwargs=True)]
    try:
        with capture:
            for start in tqdm(range(0, len(prompts), config.batch_size), desc="bright ending", disable=not progress):
                batch = prompts[start : start + config.batch_size]
                positions = end_token_positions(pipe, batch, config.end_tokens)
                capture.positions = [p for p in positions for _ in range(n)]
                latents = initial_latents(pipe, [config.seed + j for _ in batch for j in range(n)], height, width)
                diffs.clear()
                capture.maps.clear()
                pipe(**config.call_kwargs(pipe, height, width), prompt=batch, latents=latents.to(device, dtype))
                if not capture.maps:
                    raise DiffmemError("the last denoising step was not seen (the scheduler's last timestep was not "
                                       "called)")
                raw = torch.stack([_to_grid(m.float().cpu(), (lh, lw)) for m in capture.maps.values()]).mean(0)
                norm = _normalise(raw)  # [B*n, lh, lw]
                mask = norm >= config.mask_threshold
                if config.score == "local_noise_norm":
                    w = norm[:, None]
                    per_step = [(w * d).flatten(1).norm(dim=1) / w.flatten(1).mean(1) for d in diffs]
                    row = torch.stack(per_step).mean(0)
                elif config.score == "mean":
                    row = raw.flatten(1).mean(1)
                else:
                    m = mask.flatten(1).float()
                    flat = raw.flatten(1)
                    inside = (flat * m).sum(1) / m.sum(1).clamp_min(1)
                    outside = (flat * (1 - m)).sum(1) / (1 - m).sum(1).clamp_min(1)
                    row = inside if config.score == "attention" else torch.where(m.sum(1) < m.shape[1],
                                                                                  inside - outside,
                                                                                  torch.zeros_like(inside))
                scores[start : start + len(batch)] = row.double().view(len(batch), n).mean(1).numpy()
                per_prompt = raw.view(len(batch), n, lh, lw).mean(1)
                up = F.interpolate(per_prompt[:, None], size=(height, width), mode="bilinear", align_corners=False)
                maps_out[start : start + len(batch)] = _normalise(up[:, 0]).numpy()
    finally:
        for h in handles:
            h.remove()
    return DetectorOutput(scores, maps_out, maps_out >= config.mask_threshold)


register_detector("bright_ending", BrightEndingConfig, bright_ending_scores,
                  "Chen et al. (ICLR 2025): end-token cross-attention at the last step; scores and per-pixel masks")
