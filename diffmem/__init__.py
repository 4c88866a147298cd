"""diffmem: locate and delete memorization in text-to-image diffusion models.

Record the denoiser's feed-forward activations for memorized and ordinary prompts (:func:`record`), locate the
weights or directions that memorized prompts share (:func:`locate`, an :class:`Edit`), apply the edit reversibly
(:func:`apply_edit`) or export an edited pipeline that plain diffusers loads (:func:`export_edited`), and measure
the effect: detection without training data (:func:`detect`), replication before and after (:func:`evaluate`),
generate-and-filter extraction (:func:`extraction_attack`) and re-extraction by optimising the conditioning
(:func:`reextract`). Attributes are imported on first use, so ``import diffmem`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    # configs and errors
    "RecordConfig": "diffmem.config",
    "LocateConfig": "diffmem.config",
    "SamplerConfig": "diffmem.config",
    "DiffmemError": "diffmem.errors",
    "ConfigError": "diffmem.errors",
    "EditMismatchError": "diffmem.errors",
    "MaskMismatchError": "diffmem.errors",
    "PromptFileError": "diffmem.errors",
    "ModelLoadError": "diffmem.errors",
    "TargetNotFoundError": "diffmem.errors",
    "ExportError": "diffmem.errors",
    "PushError": "diffmem.errors",
    # models and data
    "load_pipeline": "diffmem.pipelines",
    "find_targets": "diffmem.targets",
    "get_denoiser": "diffmem.targets",
    "read_prompts": "diffmem.data",
    "read_manifest": "diffmem.data",
    "read_entries": "diffmem.data",
    "load_reference": "diffmem.data",
    # record
    "ActivationRecorder": "diffmem.recording",
    "record": "diffmem.recording",
    "ActivationStats": "diffmem.stats",
    # locate
    "locate": "diffmem.localization",
    "register_locator": "diffmem.localization",
    "wanda_scores": "diffmem.localization",
    # edits
    "Edit": "diffmem.edits",
    "apply_edit": "diffmem.edits",
    "export_edited": "diffmem.edits",
    "load_edit": "diffmem.edits",
    "write_model_card": "diffmem.modelcard",
    "push_to_hub": "diffmem.modelcard",
    "Mask": "diffmem.edits",
    "mask_iou": "diffmem.edits",
    "DirectionBasis": "diffmem.edits",
    "subspace_overlap": "diffmem.edits",
    "WeightDelta": "diffmem.edits",
    # measure
    "get_scorer": "diffmem.score",
    "list_scorers": "diffmem.score",
    "DetectConfig": "diffmem.detection",
    "detect": "diffmem.detection",
    "EvalConfig": "diffmem.evaluation",
    "evaluate": "diffmem.evaluation",
    "evaluate_edit": "diffmem.evaluation",
    "ExtractionConfig": "diffmem.extraction",
    "AttackConfig": "diffmem.extraction",  # deprecated alias of ExtractionConfig
    "extraction_attack": "diffmem.extraction",
    "ReextractConfig": "diffmem.reextraction",
    "reextract": "diffmem.reextraction",
    "generate_images": "diffmem.sampling",
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
