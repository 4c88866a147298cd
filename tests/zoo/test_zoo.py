"""The embedded tiny memorizer: dataset generator, training script, checkpoint, ground truth and its effect."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffmem.zoo import default_model_path, sampling_defaults
from diffmem.zoo.shapes import PALETTE, ShapesConfig, caption_words, classify_foreground_colour, make_dataset

MODEL = default_model_path()
needs_model = pytest.mark.skipif(
    not (MODEL / "model_index.json").is_file(), reason=f"the embedded checkpoint is not built at {MODEL}"
)


def test_dataset_is_deterministic_and_shaped():
    cfg = ShapesConfig(num_unique=60, duplicates=(4, 8), emblems_per_level=3, num_controls=2)
    a, b = make_dataset(cfg), make_dataset(cfg)
    assert len(a) == 60 + 6 + 2
    assert all(np.array_equal(x.image, y.image) and x.caption == y.caption for x, y in zip(a, b))
    other = make_dataset(ShapesConfig(seed=1, num_unique=60, duplicates=(4, 8), emblems_per_level=3, num_controls=2))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, other))
    kinds = [s.kind for s in a]
    assert kinds.count("emblem") == 6 and kinds.count("control") == 2
    assert sorted(s.copies for s in a if s.kind == "emblem") == [4, 4, 4, 8, 8, 8]
    # many unique images share a caption; every emblem caption is distinct
    captions = [s.caption for s in a if s.kind == "unique"]
    assert len(set(captions)) < len(captions)
    emblem_caps = [s.caption for s in a if s.kind != "unique"]
    assert len(set(emblem_caps)) == len(emblem_caps)
    assert all(s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8 for s in a)


def test_foreground_colour_classifier_reads_generated_images():
    samples = make_dataset(ShapesConfig(num_unique=300, duplicates=(), num_controls=0))
    hits = [classify_foreground_colour(s.image) == s.attrs["fg"] for s in samples]
    assert np.mean(hits) >= 0.97
    # a plain image has no foreground
    assert classify_foreground_colour(np.full((32, 32, 3), 100, np.uint8)) is None
    assert set(PALETTE) >= {s.attrs["fg"] for s in samples}


def test_word_vocab_spells_each_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from diffmem.zoo.tiny import write_word_vocab

    words = caption_words(make_dataset(ShapesConfig(num_unique=30, emblems_per_level=1, num_controls=1)))
    tok = CLIPTokenizer.from_pretrained(str(write_word_vocab(tmp_path, words)))
    single = 0
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert tok.decode(ids).strip() == w
        assert tok.unk_token_id not in ids or tok.unk_token_id == tok.eos_token_id
        single += len(ids) == 1
    assert single == len(words)
    assert len(tok) < 600


def test_tiny_pipeline_without_tokenizer_dir_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from diffmem.zoo.tiny import build_tiny_pipeline

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    pipe = build_tiny_pipeline()
    assert [p.name for p in scratch.iterdir() if p.name.startswith("diffmem")] == []
    ids = pipe.tokenizer("a red circle", add_special_tokens=False).input_ids
    pipe.save_pretrained(tmp_path / "saved")  # the tokenizer saves from memory, not from the removed folder
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(str(tmp_path / "saved" / "tokenizer"))(
        "a red circle", add_special_tokens=False).input_ids == ids


def test_training_script_writes_pipeline_and_resumes(tmp_path, caplog):
    """A few steps of the real script: a plain-diffusers pipeline, its config, ground truth, and a resume."""
    from diffusers import StableDiffusionPipeline

    from diffmem.zoo.train_memorizer import TrainConfig, train_memorizer

    ds = ShapesConfig(num_unique=40, duplicates=(4,), emblems_per_level=2, num_controls=1)
    cfg = TrainConfig(dataset=ds, vae_steps=3, unet_steps=4, batch_size=4, vae_batch_size=4, checkpoint_every=2,
                      warmup_steps=2, num_nonmem_prompts=2)
    out, work = tmp_path / "model", tmp_path / "work"
    train_memorizer(out, cfg, work)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["unet_steps"] == 4 and saved["dataset"]["num_unique"] == 40
    assert json.loads((work / "unet" / "progress.json").read_text())["step"] == 4
    rows = [json.loads(x) for x in (out / "memorization.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"locate", "heldout", "nonmem", "never_seen"}
    assert all((out / r["reference"]).is_file() for r in rows)
    never = [r for r in rows if r["split"] == "never_seen"]
    train_prompts = {r["prompt"] for r in rows if r["split"] != "never_seen"}
    # the attacks' control: images like the memorized ones, not memorized, with captions no training row uses
    assert never and all(not r["memorized"] and r["duplicates"] == 0 for r in never)
    assert not {r["prompt"] for r in never} & train_prompts
    assert not list(out.rglob("*.bin")), "weights must be safetensors"
    # resume: a longer run continues from the saved step instead of starting over
    caplog.set_level("INFO")
    cfg.unet_steps = 6
    train_memorizer(out, cfg, work)
    assert "resumed unet at step 4" in caplog.text
    assert json.loads((work / "unet" / "progress.json").read_text())["step"] == 6
    # the second run replaced its own earlier output and left no temporary folder beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "work"]


@pytest.mark.parametrize("which", ["out", "work"])
def test_training_script_refuses_folders_it_did_not_write(tmp_path, which):
    """An existing folder of the user's is refused in one line before any training, and nothing in it changes."""
    from diffmem.zoo.train_memorizer import main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    out = user if which == "out" else tmp_path / "model"
    argv = ["--out", str(out), "--vae-steps", "1", "--unet-steps", "1"]
    if which == "work":
        argv += ["--work-dir", str(user)]
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value)
    assert "\n" not in message and str(user) in message and f"--{'out' if which == 'out' else 'work-dir'}" in message
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "nothing was created beside it"


@needs_model
def test_checkpoint_loads_with_plain_diffusers_and_is_small():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    weights = list(MODEL.rglob("*.safetensors"))
    assert len(weights) == 3 and not list(MODEL.rglob("*.bin"))
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"checkpoint folder is {total / 2**20:.1f} MiB"
    d = sampling_defaults(MODEL)
    assert d["height"] == d["width"] >= 32


@needs_model
def test_manifest_is_valid():
    from diffmem.data import read_manifest, read_prompts

    entries = read_manifest(MODEL / "memorization.jsonl")
    by_split = {s: [e for e in entries if e.split == s] for s in ("locate", "heldout", "nonmem")}
    assert all(e.reference is not None and e.reference.is_file() for e in entries)
    prompts = [e.prompt for e in entries]
    assert len(prompts) == len(set(prompts)), "splits must be disjoint"
    mem = [e for e in entries if e.memorized]
    assert len(mem) >= 24 and all(e.split in ("locate", "heldout") for e in mem)
    assert abs(len(by_split["locate"]) - len(by_split["heldout"])) <= 1
    assert len([e for e in by_split["nonmem"] if not e.memorized]) >= 24
    # locate and heldout hold the same mix of duplication counts
    dups = lambda split: sorted(e.duplicates for e in by_split[split])  # noqa: E731
    assert dups("locate") == dups("heldout")
    # duplication counts in the manifest match the rebuilt training set
    cfg = json.loads((MODEL / "train_config.json").read_text())["dataset"]
    assert sorted({e.duplicates for e in mem}) == sorted({*cfg["duplicates"], cfg["control_duplicates"]})
    base = read_prompts(MODEL / "base_prompts.txt")
    assert not set(base) & set(prompts), "base prompts must not be evaluation prompts"


@needs_model
def test_quick_memorization_contrast():
    """Memorized prompts replicate their reference; generic prompts copy nothing and show their colour."""
    from diffmem.zoo.check_memorizer import check_memorizer

    rep = check_memorizer(MODEL, seeds=2, detect_seeds=1, write=False, progress=False, limit=3)
    assert rep["memorized"]["replication_ssim"] >= 0.6
    assert rep["nonmem_unique"]["replication_ssim"] <= 0.34
    assert rep["nonmem_unique"]["fg_correct"] >= 0.5
    assert rep["memorized"]["mean_ssim_ref"] > 0.5
    assert rep["detection"]["auc"] >= 0.7
