"""Tiny Stable Diffusion pipelines built from configs, with a small word-level CLIP BPE vocabulary.

Used by the tests, the benchmarks and the memorizer's training script. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "bytes_to_unicode", "write_word_vocab", "word_tokenizer", "tiny_unet", "tiny_vae", "tiny_text_encoder", "tiny_t5_encoder",
    "tiny_pixart", "build_tiny_pipeline",
    "DEFAULT_WORDS",
]

DEFAULT_WORDS = (
    "a an the of on in with and photo picture painting red green blue yellow white black orange purple "
    "pink gray brown cat dog car tree house circle square triangle star emblem logo background sky"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """Return the reversible byte -> printable unicode map used by byte-level BPE (GPT-2 / CLIP), from transformers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode as table

    return table()


def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent pieces by merge rank, lowest first, as CLIP's BPE does."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best = min((r for r, _ in pairs if r is not None), default=None)
        if best is None:
            return pieces
        i = next(i for r, i in pairs if r == best)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_word_vocab(folder: str | Path, words: Iterable[str]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a small byte-level CLIP BPE built from ``words``.

    The vocabulary holds the 256 byte symbols, the same with ``</w>``, one merge chain per word and the two
    special tokens, so that any text tokenizes. Merges are added word by word while simulating BPE, so every
    given word becomes exactly one token; unknown words fall back to smaller pieces.

    Args:
        folder: Output folder; created if missing.
        words: Words that should become single tokens (lower-cased).

    Returns:
        The folder, ready for ``CLIPTokenizer.from_pretrained``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab)
    merges: list[tuple[str, str]] = []
    byte_map = bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if w.strip()}):
        pieces = [byte_map[b] for b in word.encode("utf-8")]
        pieces[-1] = pieces[-1] + "</w>"
        # run BPE with the merges so far; while the word is not one token, add a merge (of a higher rank than
        # all earlier ones, so earlier words keep their single token)
        while True:
            pieces = _apply_bpe(pieces, ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                vocab.append(pair[0] + pair[1])
                seen.add(pair[0] + pair[1])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok_config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True))
    return folder


def word_tokenizer(words: Iterable[str], folder: str | Path | None = None) -> Any:
    """A ``CLIPTokenizer`` spelling each of ``words`` as one token (:func:`write_word_vocab`), its files written to
    ``folder``, or to a temporary folder removed once loaded (the tokenizer keeps its vocabulary in memory)."""
    import contextlib
    import tempfile

    from transformers import CLIPTokenizer

    with (tempfile.TemporaryDirectory(prefix="diffmem-tok-") if folder is None
          else contextlib.nullcontext(folder)) as target:
        return CLIPTokenizer.from_pretrained(str(write_word_vocab(target, words)))

def tiny_unet(sample_size: int, block_out_channels: tuple[int, ...], cross_attention_dim: int):
    """A ``UNet2DConditionModel`` with one layer per block, cross-attention below the first level.

    Args:
        sample_size: Latent size.
        block_out_channels: Channels per level.
        cross_attention_dim: Width of the text embeddings.

    Returns:
        The randomly initialised UNet (from the current torch seed).
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae(image_size: int, channels: tuple[int, ...] = (32, 64)):
    """An ``AutoencoderKL`` with 4 latent channels, downsampling ``2 ** (len(channels) - 1)`` times.

    Args:
        image_size: Image size in pixels.
        channels: Block widths of the levels (the group norm uses the first as its group count).

    Returns:
        The randomly initialised VAE (from the current torch seed).
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        latent_channels=4,
        norm_num_groups=channels[0],
        sample_size=image_size,
    )


def tiny_text_encoder(tokenizer, hidden_size: int, intermediate_size: int, num_hidden_layers: int):
    """A ``CLIPTextModel`` with 4 attention heads over ``tokenizer``'s vocabulary and special tokens.

    Args:
        tokenizer: The ``CLIPTokenizer`` whose vocabulary and special tokens the model uses.
        hidden_size: Width of the encoder.
        intermediate_size: Width of its feed-forward layers.
        num_hidden_layers: Number of transformer layers.

    Returns:
        The randomly initialised text encoder (from the current torch seed).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_t5_encoder(tokenizer, d_model: int, d_ff: int, num_layers: int):
    """A ``T5EncoderModel`` over ``tokenizer``'s vocabulary (PixArt's text encoder, tiny).

    Returns:
        The randomly initialised encoder (from the current torch seed).
    """
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=d_ff,
                                   num_layers=num_layers, num_heads=4, pad_token_id=tokenizer.pad_token_id))


def tiny_pixart(sample_size: int, num_layers: int, num_heads: int, head_dim: int, caption_channels: int):
    """A ``PixArtTransformer2DModel`` (DiT blocks with cross-attention, patch 2, no learned sigma).

    Args:
        sample_size: Latent size.
        num_layers: Transformer blocks.
        num_heads: Attention heads.
        head_dim: Width of each head.
        caption_channels: Width of the text embeddings.

    Returns:
        The randomly initialised transformer (from the current torch seed).
    """
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        num_layers=num_layers, cross_attention_dim=num_heads * head_dim, sample_size=sample_size, patch_size=2,
        caption_channels=caption_channels, norm_num_groups=1,
    )


def build_tiny_pipeline(
    tokenizer_dir: str | Path | None = None,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
    sample_size: int = 8,
    text_dim: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int | None = None,
    zero_snr: bool = False,
):
    """Build a seeded, randomly initialised tiny ``StableDiffusionPipeline`` (about 1 M UNet parameters).

    Args:
        tokenizer_dir: Where to write the tokenizer vocabulary; a temporary folder, removed once loaded, when ``None``.
        words: Words the tokenizer spells as single tokens.
        seed: Seed of the weight initialisation.
        sample_size: Latent size of the UNet (the image is ``sample_size * 2`` px with this VAE).
        text_dim: Width of the CLIP text encoder.
        block_out_channels: UNet channels per level.
        cross_attention_dim: Defaults to ``text_dim``.
        zero_snr: Use a zero-terminal-SNR, v-prediction DDIM scheduler (Lin et al. 2023).

    Returns:
        A ``StableDiffusionPipeline`` on the CPU in fp32.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = word_tokenizer(words, tokenizer_dir)

    torch.manual_seed(seed)
    unet = tiny_unet(sample_size, block_out_channels, cross_attention_dim or text_dim)
    vae = tiny_vae(sample_size * 2)
    text_encoder = tiny_text_encoder(tokenizer, text_dim, text_dim * 2, num_hidden_layers=2)
    sched_kwargs = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    if zero_snr:
        sched_kwargs.update(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    scheduler = DDIMScheduler(**sched_kwargs)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
