"""Shared fixtures: tiny, seeded, randomly initialised models built from configs (nothing is downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch

# The test machines have two cores shared with other jobs; one intra-op thread is far faster than two there.
torch.set_num_threads(1)

PROMPTS = [
    "a red cat",
    "a blue dog on the sky",
    "the green tree",
    "a photo of a yellow star",
    "a white house with a black car",
    "an orange circle on pink background",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """Folder holding the tiny CLIP vocabulary (written by ``build_tiny_pipeline``)."""
    return tmp_path_factory.mktemp("tiny-tokenizer")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_tokenizer_dir):
    """A seeded tiny ``StableDiffusionPipeline`` shared by the session; treat it as read-only."""
    from diffmem.zoo.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture
def fresh_tiny_pipe(tiny_pipe):
    """A private copy of ``tiny_pipe`` for tests that change weights, hooks or components."""
    return copy.deepcopy(tiny_pipe)


@pytest.fixture
def prompts() -> list[str]:
    """Six short prompts spelled with the tiny vocabulary."""
    return list(PROMPTS)


def make_tiny_pixart(sample_size: int = 8):
    """A seeded tiny ``PixArtTransformer2DModel`` (2 blocks, 32-d captions, learned sigma: 8 output channels)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=sample_size,
        patch_size=2,
        caption_channels=32,
        norm_num_groups=1,
    ).eval()


def make_tiny_sd3():
    """A seeded tiny ``SD3Transformer2DModel`` (2 joint blocks, 8x8 latents, 32-d text, 24-d pooled text)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


@pytest.fixture
def tiny_pixart():
    """A tiny ``PixArtTransformer2DModel`` (2 blocks, 8x8 latents, 32-d captions)."""
    return make_tiny_pixart()


@pytest.fixture
def tiny_sd3():
    """A tiny ``SD3Transformer2DModel`` (2 joint blocks, 8x8 latents, 32-d text)."""
    return make_tiny_sd3()


def _tiny_vae():
    """A tiny two-level ``AutoencoderKL`` (scale factor 2); text-to-latent tests never decode with it."""
    from diffmem.zoo.tiny import tiny_vae

    torch.manual_seed(0)
    return tiny_vae(16, channels=(8, 16)).eval()


def _tiny_tokenizer(folder):
    from transformers import CLIPTokenizer

    from diffmem.zoo.tiny import DEFAULT_WORDS, write_word_vocab

    return CLIPTokenizer.from_pretrained(str(write_word_vocab(folder, DEFAULT_WORDS)))


@pytest.fixture(scope="session")
def tiny_pixart_pipe(tmp_path_factory):
    """A seeded tiny ``PixArtAlphaPipeline``: a tiny T5 encoder behind the tiny word tokenizer; treat it as read-only.

    Its transformer has ``sample_size=32`` because the pipeline's resolution binning knows only 32, 64 and 128;
    run it at 16 px (8x8 latents).
    """
    from diffusers import DDIMScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tiny_tokenizer(tmp_path_factory.mktemp("pixart-tok"))
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                           num_heads=4, pad_token_id=tokenizer.pad_token_id)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(),
                               transformer=make_tiny_pixart(sample_size=32), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd3_pipe(tmp_path_factory):
    """A seeded tiny ``StableDiffusion3Pipeline`` with two tiny CLIP encoders and no T5; treat it as read-only."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = _tiny_tokenizer(tmp_path_factory.mktemp("sd3-tok"))

    def clip(seed: int):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, projection_dim=12, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()

    # 16 + 16 CLIP features make the 32-d joint text; 12 + 12 pooled features the 24-d pooled projection
    pipe = StableDiffusion3Pipeline(
        transformer=make_tiny_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(),
        text_encoder=clip(1), tokenizer=tokenizer, text_encoder_2=clip(2), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
