"""The config family: one base (``DiffmemConfig``) with ``check``, ``to_dict`` and ``from_dict``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from diffmem.config import DiffmemConfig, LocateConfig, RecordConfig, SamplerConfig, require
from diffmem.errors import ConfigError


def _instances() -> list[DiffmemConfig]:
    from diffmem.data.formats import SplitConfig
    from diffmem.detection import DetectConfig
    from diffmem.detectors.anisotropy import AnisotropyConfig
    from diffmem.detectors.bright_ending import BrightEndingConfig
    from diffmem.detectors.sharpness import SharpnessConfig
    from diffmem.evaluation import EvalConfig
    from diffmem.extraction import ExtractionConfig
    from diffmem.mitigation import MitigateConfig
    from diffmem.reextraction import ReextractConfig
    from diffmem.workflows.audit import AuditConfig
    from diffmem.workflows.demo import DemoConfig
    from diffmem.workflows.mitigate import MitigateRunConfig
    from diffmem.zoo.designs import OverlapConfig
    from diffmem.zoo.train_memorizer import TrainConfig

    return [
        RecordConfig(), LocateConfig.from_preset("chavhan2024"), SamplerConfig(height=32, scheduler="DDIMScheduler"),
        EvalConfig(region="bright-ending"), DetectConfig(), AnisotropyConfig(), BrightEndingConfig(),
        SharpnessConfig(), ExtractionConfig(), ReextractConfig(checkpoints=(0, 5), opt_steps=5), SplitConfig(seed=3),
        AuditConfig(model="m", prompts="p.txt"), TrainConfig(design="overlap", dataset=OverlapConfig()),
        MitigateConfig(sampler=SamplerConfig(num_inference_steps=25), attack=ReextractConfig(opt_steps=5)),
        DemoConfig(sampler={"num_inference_steps": 4}), MitigateRunConfig(model="m", prompts="p.jsonl", out="o"),
    ]


def test_every_config_round_trips_through_json():
    for config in _instances():
        data = json.loads(json.dumps(config.to_dict()))
        assert data == config.to_dict(), type(config).__name__
        assert type(config).from_dict(data) == config, type(config).__name__


def test_to_dict_writes_json_types_and_nested_configs():
    @dataclasses.dataclass
    class Outer(DiffmemConfig):
        sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
        sizes: tuple[int, ...] = (1, 2)
        where: Path | None = None

    outer = Outer(SamplerConfig(num_inference_steps=3), (4,), Path("a/b"))
    data = outer.to_dict()
    assert data == {"sampler": SamplerConfig(num_inference_steps=3).to_dict(), "sizes": [4], "where": "a/b"}
    again = Outer.from_dict(data)
    assert again == outer and isinstance(again.sampler, SamplerConfig) and isinstance(again.where, Path)


def test_from_dict_names_every_unknown_key():
    with pytest.raises(ConfigError, match=r"SamplerConfig keys=\['colour', 'size'\] is invalid: unknown keys"):
        SamplerConfig.from_dict({"num_inference_steps": 3, "size": 1, "colour": "red"})


def test_a_failed_check_names_the_field_and_value_on_one_line():
    with pytest.raises(ConfigError) as err:
        RecordConfig(num_seeds=0)
    assert str(err.value) == "num_seeds=0 is invalid: must be >= 1"
    with pytest.raises(ConfigError, match=r"^ratio=2 is invalid: must be in \(0, 1\]$"):
        require(False, "ratio", 2, "must be in (0, 1]")
    require(True, "ratio", 2, "never raised")


def test_check_runs_on_creation_and_on_replace():
    with pytest.raises(ConfigError, match="batch_size=0 is invalid"):
        dataclasses.replace(RecordConfig(), batch_size=0)


def test_the_names_one_config_family_uses():
    import diffmem
    from diffmem.workflows import mitigate

    assert diffmem.AttackConfig is diffmem.ExtractionConfig  # the old name stays, as an alias
    assert {"ExtractionConfig", "AttackConfig", "SamplerConfig"} <= set(diffmem.__all__)
    assert mitigate.MitigateRun is mitigate.MitigateRunConfig
    for config in _instances():
        assert type(config).__name__.endswith("Config")
        seeds = [f.name for f in dataclasses.fields(config) if "seed" in f.name and f.name != "per_prompt_seeds"]
        assert all(n == "seed" or n.endswith("_seed") or n.endswith("num_seeds") for n in seeds), seeds


def test_workflow_configs_check_the_sampler_settings_they_are_given():
    from diffmem.workflows.demo import DemoConfig

    with pytest.raises(ConfigError, match=r"SamplerConfig keys=\['steps'\] is invalid"):
        DemoConfig(sampler={"steps": 4})
    assert DemoConfig(sampler={"guidance_scale": 2.0}).resolve_sampler("missing/folder").guidance_scale == 2.0


def test_mitigate_defaults_agree_across_the_library_the_run_config_the_cli_and_the_benchmark():
    """One default per setting: ``MitigateConfig``, ``diffmem mitigate``'s run config and flags, and
    ``benchmarks/bench_mitigate.py`` must not drift apart (the benchmark measures what users get)."""
    import importlib.util

    from diffmem.cli import build_parser
    from diffmem.mitigation import MitigateConfig
    from diffmem.workflows.mitigate import MitigateRunConfig

    fields = ("robust_aggregate", "robust_fraction", "margin_steps", "min_rounds", "folds", "redirect")
    lib = {f.name: f.default for f in dataclasses.fields(MitigateConfig)}
    run = {f.name: f.default for f in dataclasses.fields(MitigateRunConfig)}
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "mitigate" in a.choices)
    cli = sub.choices["mitigate"].parse_args(["model", "--prompts", "p.jsonl", "--out", "o"])
    spec = importlib.util.spec_from_file_location("bench_mitigate", Path(__file__).parents[1] / "benchmarks" /
                                                  "bench_mitigate.py")
    bench_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_mod)
    bench = bench_mod.parse_args([])
    for name in fields:
        assert lib[name] == run[name] == getattr(cli, name) == getattr(bench, name), name
    assert lib["robust_gate"] == run["robust_gate"] == cli.robust_gate == bench.robust_gate
    assert lib["repair_steps"] == run["repair"] == cli.repair == bench.repair
