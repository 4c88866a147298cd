"""diffmem: locate and delete memorization in text-to-image diffusion models.

Record the denoiser's feed-forward activations for memorized and ordinary prompts, score and select the weights
(or directions) that memorized prompts share, and remove them reversibly or in an exported pipeline that plain
diffusers loads. Attributes are imported lazily. The verbs ``locate``, ``detect`` and ``evaluate`` live in the
modules of the same name (``from diffmem.locate import locate``), so that ``diffmem.locate`` stays a module.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # configs and errors
    "RecordConfig": "diffmem.config",
    "LocateConfig": "diffmem.config",
    "DiffmemError": "diffmem.errors",
    "MaskMismatchError": "diffmem.errors",
    "PromptFileError": "diffmem.errors",
    "ModelLoadError": "diffmem.errors",
    "TargetNotFoundError": "diffmem.errors",
    "ExportError": "diffmem.errors",
    # record
    "find_targets": "diffmem.targets",
    "get_denoiser": "diffmem.targets",
    "ActivationRecorder": "diffmem.hooks",
    "record": "diffmem.hooks",
    "ActivationStats": "diffmem.stats",
    "load_pipeline": "diffmem.pipelines",
    # locate / prune
    "Mask": "diffmem.locate",
    "wanda_scores": "diffmem.locate",
    "mask_iou": "diffmem.locate",
    "apply_mask": "diffmem.prune",
    "bake": "diffmem.prune",
    "export_pruned": "diffmem.prune",
    # directions
    "DirectionBasis": "diffmem.directions",
    "locate_directions": "diffmem.directions",
    "apply_projection": "diffmem.directions",
    "export_projected": "diffmem.directions",
    "subspace_overlap": "diffmem.directions",
    # data, scoring, detection, attack, evaluation
    "read_prompts": "diffmem.data",
    "read_manifest": "diffmem.data",
    "get_scorer": "diffmem.score",
    "list_scorers": "diffmem.score",
    "DetectConfig": "diffmem.detect",
    "noise_norm_scores": "diffmem.detect",
    "AttackConfig": "diffmem.attack",
    "extraction_attack": "diffmem.attack",
    "EvalConfig": "diffmem.evaluate",
    "evaluate_edit": "diffmem.evaluate",
    "generate_images": "diffmem.sampling",
    "DemoConfig": "diffmem.demo",
    "run_demo": "diffmem.demo",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffmem' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
