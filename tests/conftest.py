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


@pytest.fixture
def tiny_pixart():
    """A tiny ``PixArtTransformer2DModel`` (2 blocks, 8x8 latents, 32-d captions)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=32,
        norm_num_groups=1,
    ).eval()


@pytest.fixture
def tiny_sd3():
    """A tiny ``SD3Transformer2DModel`` (2 joint blocks, 8x8 latents, 32-d text)."""
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
