"""Is memorization local? Triggers from several starts for the same images, and the masks located from them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..config import LocateConfig, RecordConfig
from ..data import ManifestEntry
from ..edits import chance_iou, mask_iou
from ..localization import locate
from ..objective import encode_conditioning
from ..recording import record
from ..reextraction import ReextractConfig, reextract
from ..sampling import image_size
from .rows import load_rows
from .strength import _mean

__all__ = ["locality_evidence"]


def locality_evidence(
    pipe: Any,
    rows: list[ManifestEntry],
    base_prompts: list[str],
    attack: ReextractConfig,
    scorer: Any,
    *,
    ratio: float,
    record_steps: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Is memorization local? Triggers found from two random starts for the same images, and their masks.

    Finding DoRI questions the seed paper's claim that memorization sits in a few shared weights: if triggers for
    one image lie far apart and their masks differ, the memory is reachable through many paths. This measures:

    * the RMS distance between the two triggers of each image, against the RMS distance between the natural
      prompts' embeddings of different rows;
    * the IoU of the masks located from the two sets of triggers, against chance and against the mask located from
      the natural prompts.

    Args:
        attack: The re-extraction attack; its sampler is the model's (the triggers are sampled and the statistics
            recorded with it).

    Returns:
        A JSON-ready dictionary of those numbers (and whether each trigger replicates).
    """
    sampler = attack.sampler
    items = load_rows(rows, image_size(pipe, sampler.height, sampler.width)).items("memorized")
    triggers, rates = [], []
    for k in range(2):
        cfg = replace(attack, init="random", seed=attack.seed + 101 + k)
        res = reextract(pipe, items, cfg, scorer, progress=progress)
        triggers.append(torch.cat([res.adversarial_embeds[i] for i in sorted(res.adversarial_embeds)]))
        rates.append(res.summary()["memorization_rate"])
    natural = encode_conditioning(pipe, [e.prompt for e in rows])[0]

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean().sqrt())

    trigger_dist = [rms(triggers[0][i], triggers[1][i]) for i in range(len(rows))]
    natural_dist = [rms(natural[i], natural[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    rcfg = RecordConfig(sampler=sampler, record_steps=record_steps, batch_size=16)
    lcfg = LocateConfig(ratio=ratio, record_steps=record_steps)
    base = record(pipe, base_prompts, rcfg, progress=False)
    masks = [locate(pipe, record(pipe, None, rcfg, prompt_embeds=t, progress=False), base, lcfg) for t in triggers]
    prompt_mask = locate(pipe, record(pipe, [e.prompt for e in rows], rcfg, progress=False), base, lcfg)
    return {
        "rows": len(rows),
        "trigger_replication_rate": rates,
        "trigger_distance_rms": _mean(trigger_dist),
        "natural_prompt_distance_rms": _mean(natural_dist),
        "trigger_mask_iou": mask_iou(masks[0], masks[1])["overall"],
        "trigger_mask_iou_chance": chance_iou(masks[0], masks[1]),
        "trigger_vs_prompt_mask_iou": [mask_iou(m, prompt_mask)["overall"] for m in masks],
    }
