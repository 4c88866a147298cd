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
    from diffmem.extraction import AttackConfig
    from diffmem.reextraction import ReextractConfig
    from diffmem.workflows.audit import AuditConfig
    from diffmem.zoo.designs import OverlapConfig
    from diffmem.zoo.train_memorizer import TrainConfig

    return [
        RecordConfig(), LocateConfig.from_preset("chavhan2024"), SamplerConfig(height=32, scheduler="DDIMScheduler"),
        EvalConfig(region="bright-ending"), DetectConfig(), AnisotropyConfig(), BrightEndingConfig(),
        SharpnessConfig(), AttackConfig(), ReextractConfig(checkpoints=(0, 5), opt_steps=5), SplitConfig(seed=3),
        AuditConfig(model="m", prompts="p.txt"), TrainConfig(design="overlap", dataset=OverlapConfig()),
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
