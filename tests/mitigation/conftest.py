"""Fixtures of the mitigation tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def self_referenced_manifest(tiny_pipe, tmp_path):
    """A factory of manifests whose references are the tiny pipeline's own generations: ``memorized`` prompts as
    ``locate`` rows (8 duplicates), ``ordinary`` ones as ``nonmem`` rows, images saved under ``tmp_path``."""
    from PIL import Image

    from diffmem.data import ManifestEntry
    from diffmem.sampling import generate_images

    def make(memorized: list[str], ordinary: list[str], sampler) -> list[ManifestEntry]:
        prompts = memorized + ordinary
        images = generate_images(tiny_pipe, prompts, num_seeds=1, seed=0, sampler=sampler)
        out = []
        for i, p in enumerate(prompts):
            Image.fromarray(images[i, 0]).save(tmp_path / f"ref{i}.png")
            split = "locate" if i < len(memorized) else "nonmem"
            out.append(ManifestEntry(prompt=p, memorized=split == "locate", duplicates=8 if split == "locate" else 1,
                                     reference=tmp_path / f"ref{i}.png", split=split))
        return out

    return make
