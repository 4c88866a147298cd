"""The zoo's shipped memorizers: plain diffusers loads them, their manifests hold every split, and every stage of
diffmem (hooks, locate with each method, every edit, export, re-extraction) runs on each denoiser, DiT included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.config import LocateConfig, RecordConfig, SamplerConfig
from diffmem.data import read_manifest
from diffmem.edits import WeightDelta, apply_edit, export_edited, load_edit
from diffmem.recording import record
from diffmem.localization import locate
from diffmem.pipelines import load_pipeline, sampling_defaults
from diffmem.reextraction import ReextractConfig, ReextractItem, reextract
from diffmem.sampling import generate_images
from diffmem.score import get_scorer
from diffmem.targets import get_denoiser
from diffmem.zoo.members import MEMBERS, member_config, zoo_model_path
from diffmem.zoo.train_memorizer import config_from_dict

NEW = [n for n in MEMBERS if n != "tiny-sd-memorizer"]


def _present(name: str):
    path = zoo_model_path(name)
    if not (path / "model_index.json").is_file():
        pytest.skip(f"zoo member {name} is not on disk at {path} (train it: python -m diffmem.zoo.train_memorizer "
                    f"--member {name} --out {path})")
    return path


@pytest.mark.parametrize("name", list(MEMBERS))
def test_member_ships_small_with_its_ground_truth(name):
    path = _present(name)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{name} is {size / 2**20:.1f} MB"
    entries = read_manifest(path / "memorization.jsonl")
    splits = {e.split for e in entries}
    assert {"locate", "heldout", "nonmem", "never_seen"} <= splits
    assert all(e.reference is not None and e.reference.is_file() for e in entries)
    assert all(not e.memorized for e in entries if e.split in ("nonmem", "never_seen"))
    cfg = json.loads((path / "train_config.json").read_text())
    # the shipped weights come from the member's one command (fields added since a checkpoint was trained take
    # their defaults, which reproduce what it was trained with)
    assert config_from_dict(cfg).to_dict() == member_config(name).to_dict()
    assert (path / "README.md").is_file() and (path / "diffmem_defaults.json").is_file()


@pytest.mark.parametrize("name", NEW)
def test_plain_diffusers_loads_and_generates_at_the_model_sampler(name):
    from diffusers import DiffusionPipeline

    path = _present(name)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    d = sampling_defaults(path)
    first = read_manifest(path / "memorization.jsonl")[0]
    images = generate_images(pipe, [first.prompt], num_seeds=1,
                             sampler=SamplerConfig(**{**d, "num_inference_steps": 4}))
    assert images.shape == (1, 1, d["height"], d["width"], 3) and images.std() > 0


def test_every_stage_on_the_dit_memorizer(tmp_path):
    """Hooks, each locate method, each edit kind, export and re-extraction on PixArt's feed-forward layers."""
    path = _present("tiny-pixart-memorizer")
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    d = sampling_defaults(path)
    entries = read_manifest(path / "memorization.jsonl")
    mem = [e.prompt for e in entries if e.split == "locate"][:3]
    base = [""] + [e.prompt for e in entries if e.split == "nonmem"][:3]
    sampler = SamplerConfig(**{**d, "num_inference_steps": 6})
    rcfg = RecordConfig(sampler=sampler, record_steps=2, signatures=True)
    stats_mem, stats_base = record(pipe, mem, rcfg, progress=False), record(pipe, base, rcfg, progress=False)
    assert all(".ff.net.2" in name for name in stats_mem.layers)  # the DiT blocks' feed-forward outputs
    denoiser = get_denoiser(pipe)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    plain = generate_images(pipe, mem[:1], num_seeds=1, sampler=sampler)
    for method, kw in (("wanda", {"ratio": 0.05}), ("neuron", {"ratio": 0.05}), ("directions", {"rank": 2})):
        edit = locate(pipe, stats_mem, stats_base, LocateConfig(method=method, record_steps=2, **kw))
        assert edit.num_params_changed() > 0
        with apply_edit(pipe, edit):
            edited = generate_images(pipe, mem[:1], num_seeds=1, sampler=sampler)
        assert not np.array_equal(edited, plain)  # the edit changes the generation ...
        assert all(torch.equal(before[n], p) for n, p in denoiser.named_parameters())  # ... and is undone
        edit.save(tmp_path / method)
        assert type(load_edit(tmp_path / method)) is type(edit)
    delta = WeightDelta.between(before, pipe)  # a delta of nothing changes nothing
    assert delta.num_params_changed() == 0
    out = export_edited(pipe, edit, tmp_path / "export", source=str(path))
    from diffusers import DiffusionPipeline

    again = DiffusionPipeline.from_pretrained(out)
    again.set_progress_bar_config(disable=True)
    with apply_edit(pipe, edit):
        expected = generate_images(pipe, mem[:1], num_seeds=1, sampler=sampler)
    np.testing.assert_array_equal(generate_images(again, mem[:1], num_seeds=1, sampler=sampler), expected)
    row = next(e for e in entries if e.split == "locate")
    from diffmem.data import load_reference

    item = ReextractItem(row.prompt, load_reference(row.reference, (d["height"], d["width"]), row=row), "memorized")
    res = reextract(pipe, [item], ReextractConfig(sampler=sampler, opt_steps=2, num_seeds=1, checkpoints=()),
                    get_scorer("ssim"), progress=False)
    embeds = res.adversarial_embeds[0]
    assert len(res.rows[0]["loss_curve"]) == 2 and torch.isfinite(embeds).all()
    # padded tokens (zero vectors, masked out) stay zero through the optimisation
    from diffmem.objective import encode_conditioning

    start = encode_conditioning(pipe, [row.prompt])[0][0]
    assert torch.equal(embeds[0].abs().sum(-1) > 0, start.abs().sum(-1) > 0)


def test_load_zoo_model_loads_a_member_with_its_sampler_and_names_a_missing_folder(tmp_path):
    from diffmem.zoo.members import load_zoo_model

    path, pipe, sampler, entries = load_zoo_model("tiny-sd-memorizer")
    assert path == zoo_model_path("tiny-sd-memorizer")
    assert sampler.to_dict() == SamplerConfig.resolve(pipe).to_dict()
    assert {e.split for e in entries} >= {"locate", "heldout", "nonmem"}
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_zoo_model(str(tmp_path / "nothing-here"))
