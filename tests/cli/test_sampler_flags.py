"""One set of sampler flags on every command that samples, ``SamplerConfig``, and the CPU thread choice."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from diffmem import parallel
from diffmem.cli import build_parser, main
from diffmem.config import SamplerConfig
from diffmem.errors import ConfigError
from diffmem.sampling import generate_images

FLAGS = ["--steps", "3", "--guidance", "5", "--guidance-rescale", "0.5", "--height", "16", "--width", "16",
         "--scheduler", "EulerDiscreteScheduler"]
EXPECTED = {"steps": 3, "guidance": 5.0, "guidance_rescale": 0.5, "height": 16, "width": 16,
            "scheduler": "EulerDiscreteScheduler"}
COMMANDS = {
    "record": ["M", "--out", "s.safetensors"],
    "detect": ["M", "--prompts", "p.txt", "--out", "t.jsonl"],
    "attack": ["M", "--prompts", "p.txt", "--out", "d"],
    "evaluate": ["M", "--prompts", "m.jsonl"],
    "reextract": ["M", "--prompts", "m.jsonl", "--out", "d"],
    "mitigate": ["M", "--prompts", "m.jsonl", "--out", "d"],
    "demo": [],
    "audit": ["M", "--prompts", "p.txt"],
}


@pytest.fixture(scope="module")
def model_dir(tiny_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("sampler") / "tiny-sd"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse rejects values before main's own handling
        code = exit_.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_sampling_command_takes_the_sampler_flags(command):
    args = build_parser().parse_args([command, *COMMANDS[command], *FLAGS])
    assert {k: getattr(args, k) for k in EXPECTED} == EXPECTED


def test_resolve_precedence_user_then_defaults_file_then_pipeline(tiny_pipe, model_dir, tmp_path):
    from diffmem.pipelines import load_pipeline

    bare = SamplerConfig.resolve(model_dir)  # no diffmem_defaults.json: StableDiffusionPipeline.__call__'s defaults
    assert (bare.num_inference_steps, bare.guidance_scale, bare.guidance_rescale) == (50, 7.5, 0.0)
    assert (bare.height, bare.width, bare.scheduler) == (None, None, None)
    loaded = SamplerConfig.resolve(tiny_pipe)  # a pipeline adds its image size and scheduler
    assert (loaded.height, loaded.width, loaded.scheduler) == (16, 16, "DDIMScheduler")

    folder = tmp_path / "with-defaults"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "diffmem_defaults.json").write_text(json.dumps({"num_inference_steps": 9, "guidance_scale": 3.0,
                                                              "guidance_rescale": 0.7}))
    from_file = SamplerConfig.resolve(folder)
    assert (from_file.num_inference_steps, from_file.guidance_scale, from_file.guidance_rescale) == (9, 3.0, 0.7)
    user = SamplerConfig.resolve(folder, num_inference_steps=4, guidance_scale=None, scheduler="PNDMScheduler")
    assert (user.num_inference_steps, user.guidance_scale, user.scheduler) == (4, 3.0, "PNDMScheduler")
    pipe = load_pipeline(folder)  # the loaded pipeline finds its folder's defaults through name_or_path
    on_pipe = SamplerConfig.resolve(pipe, guidance_scale=2.0)
    assert (on_pipe.num_inference_steps, on_pipe.guidance_scale, on_pipe.height) == (9, 2.0, 16)
    assert SamplerConfig.from_dict(on_pipe.to_dict()) == on_pipe


def test_call_kwargs_follow_the_pipeline(tiny_pipe, tiny_pixart_pipe):
    sampler = SamplerConfig(num_inference_steps=3, guidance_scale=4.0, guidance_rescale=0.5, height=16, width=16)
    assert sampler.call_kwargs(tiny_pipe) == {"num_inference_steps": 3, "guidance_scale": 4.0,
                                              "guidance_rescale": 0.5, "height": 16, "width": 16}
    assert "guidance_rescale" not in SamplerConfig(guidance_rescale=0.0).call_kwargs(tiny_pipe)
    pixart = sampler.call_kwargs(tiny_pixart_pipe)  # PixArt has no rescale; its size is explicit, so no binning
    assert "guidance_rescale" not in pixart and pixart["use_resolution_binning"] is False
    with pytest.raises(ConfigError, match="PixArtAlphaPipeline has no guidance rescale"):
        SamplerConfig.resolve(tiny_pixart_pipe, guidance_rescale=0.5)


def test_scheduler_swap_changes_the_output_and_keeps_the_model_settings():
    from diffmem.zoo.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(zero_snr=True)
    plain = SamplerConfig(num_inference_steps=3, guidance_scale=4.0, height=16, width=16)
    before = generate_images(pipe, ["a red cat"], progress=False, sampler=plain)
    sampler = dataclasses.replace(plain, scheduler="EulerDiscreteScheduler")
    with sampler.use_scheduler(pipe) as scheduler:
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.scheduler is scheduler
        config = pipe.scheduler.config
        assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
            "v_prediction", True, "trailing")
        swapped = generate_images(pipe, ["a red cat"], progress=False, sampler=plain)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert not np.array_equal(before, swapped)
    assert np.array_equal(before, generate_images(pipe, ["a red cat"], progress=False, sampler=plain))


def test_a_setting_the_new_scheduler_cannot_keep_is_named(fresh_tiny_pipe, caplog):
    from diffmem.zoo.tiny import build_tiny_pipeline

    heun = SamplerConfig(scheduler="HeunDiscreteScheduler")  # HeunDiscreteScheduler has no zero-SNR rescaling
    with caplog.at_level(logging.WARNING, logger="diffmem.config"):
        heun.apply_scheduler(fresh_tiny_pipe)
    assert "rescale_betas_zero_snr" not in caplog.text  # the model does not use it: nothing is lost
    with caplog.at_level(logging.WARNING, logger="diffmem.config"):
        heun.apply_scheduler(build_tiny_pipeline(zero_snr=True))
    assert "HeunDiscreteScheduler has no rescale_betas_zero_snr=True" in caplog.text


def test_record_stores_the_scheduler_it_used(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "s.safetensors"
    code, _ = _run(["record", model_dir, "--prompts", prompts, "--out", out, "--steps", "3", "--record-steps", "2",
                    "--scheduler", "EulerDiscreteScheduler"], capsys)
    assert code == 0
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert meta["scheduler"] == "EulerDiscreteScheduler"
    assert meta["record_config"]["sampler"]["num_inference_steps"] == 3


def test_a_bad_scheduler_name_is_one_line_naming_the_choices(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    code, out = _run(["detect", model_dir, "--prompts", prompts, "--out", tmp_path / "t.jsonl",
                      "--scheduler", "EulerScheduler"], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffmem: error:")
    assert "EulerDiscreteScheduler" in lines[0] and "DDIMScheduler" in lines[0]
    # a diffusers scheduler the model's scheduler cannot become: refused before the model loads
    code, out = _run(["detect", model_dir, "--prompts", prompts, "--out", tmp_path / "t.jsonl",
                      "--scheduler", "FlowMatchEulerDiscreteScheduler"], capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("diffmem: error:")
    assert "DDIMScheduler can become one of" in lines[0] and "UniPCMultistepScheduler" in lines[0]


def test_detect_preset_keeps_the_flags_given(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe green tree\n")
    out = tmp_path / "wen.jsonl"
    code, _ = _run(["detect", model_dir, "--prompts", prompts, "--out", out, "--preset", "wen2024", "--steps", "7",
                    "--height", "16", "--width", "16", "--scheduler", "EulerDiscreteScheduler"], capsys)
    assert code == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["sampler"]["num_inference_steps"] == 7 and summary["config"]["sampler"]["num_inference_steps"] == 7
    assert summary["config"]["score_steps"] == 7  # the preset averages over every step of the schedule given
    assert summary["config"]["sampler"]["guidance_scale"] == 7.5  # not given: the preset's
    assert summary["sampler"]["scheduler"] == "EulerDiscreteScheduler"


# --- threads -----------------------------------------------------------------------------------------------------

STAT_A = "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\ncpu1 50 0 50 400 0 0 0 0 0 0\nintr 1 2 3\n"
# 400 jiffies later: 100 user + 100 system + 150 idle + 50 iowait, so half the time of the two CPUs was idle
STAT_B = "cpu  200 0 200 950 50 0 0 0 7 7\ncpu0 100 0 100 475 25 0 0 0 0 0\ncpu1 100 0 100 475 25 0 0 0 0 0\n"


@pytest.fixture
def fake_stat(tmp_path, monkeypatch):
    """``/proc/stat`` reading ``STAT_A`` first and ``STAT_B`` after the sampling interval."""
    path = tmp_path / "stat"
    path.write_text(STAT_A)
    monkeypatch.setattr(parallel, "PROC_STAT", str(path))
    monkeypatch.setattr(parallel, "CGROUP_CPU_MAX", str(tmp_path / "no-cgroup"))
    monkeypatch.setattr(parallel.time, "sleep", lambda seconds: path.write_text(STAT_B))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    return path


def test_proc_stat_parsing(fake_stat, tmp_path):
    assert parallel._cpu_times(fake_stat) == (800, 1000, 2)
    assert parallel.idle_cpus() == pytest.approx(1.0)  # guest time (last two fields) is not counted twice
    bad = tmp_path / "bad"
    bad.write_text("intr 1 2\n")
    assert parallel._cpu_times(bad) is None and parallel._cpu_times(tmp_path / "missing") is None
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert parallel._cgroup_cpus(quota) == 1.5
    quota.write_text("max 100000\n")
    assert parallel._cgroup_cpus(quota) is None


def test_thread_choice(fake_stat, monkeypatch, tmp_path):
    assert parallel.choose_num_threads()[0] == 1  # one of the two CPUs idle
    fake_stat.write_text(STAT_A)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice always wins
    assert parallel.choose_num_threads() == (None, "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(parallel, "PROC_STAT", str(tmp_path / "missing"))  # no /proc/stat: every CPU
    assert parallel.choose_num_threads()[0] == 2
