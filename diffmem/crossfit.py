"""Honest figures for an edit: folds over the given rows, and replication measured at several samplers and starts.

An edit fitted on some memorized images is judged on others. :func:`make_folds` deals the ``locate`` rows into
folds (stratified by duplication count); mitigation fits on all folds but one and measures the one left out, so
the out-of-fold rate estimates what the edit does on memorized images the user did not list.
:func:`measure_rows` is that measurement: replication with the prompt at each sampler setting, and under the
re-extraction attack from each start (the prompt's conditioning, a random one), sampled at each sampler setting.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .config import SamplerConfig, pipeline_call_defaults
from .data import ManifestEntry, load_reference
from .edits import Edit, apply_edit
from .evaluation import EvalConfig, evaluate
from .reextraction import ReextractConfig, ReextractItem, reextract
from .sampling import generate_images, image_size

logger = logging.getLogger(__name__)

__all__ = ["sampler_variants", "make_folds", "measure_rows", "summarise_rows", "attack_from_starts", "any_start",
           "SAMPLER_NAMES"]

SAMPLER_NAMES = ("model", "diffusers-default", "high-guidance")
"""The sampler settings every edit is reported at: the model's own, diffusers' defaults (50 steps, guidance 7.5,
no rescale) and the model's own with twice the guidance."""


def sampler_variants(sampler: SamplerConfig, names: tuple[str, ...] = SAMPLER_NAMES,
                     pipe: Any = None) -> dict[str, SamplerConfig]:
    """Sampler settings by name, derived from the model's own ``sampler`` (size and scheduler kept in all of them).

    Args:
        sampler: The model's sampler settings.
        names: Which variants to return, from :data:`SAMPLER_NAMES`.
        pipe: The pipeline, whose own defaults ``diffusers-default`` uses (else Stable Diffusion's 50 and 7.5).

    Returns:
        ``{name: sampler}`` in the order of ``names``.
    """
    out: dict[str, SamplerConfig] = {}
    for name in names:
        if name == "model":
            out[name] = sampler
        elif name == "diffusers-default":
            own = {"num_inference_steps": 50, "guidance_scale": 7.5,
                   **(pipeline_call_defaults(type(pipe)) if pipe is not None else {})}
            out[name] = replace(sampler, guidance_rescale=0.0, **own)
        elif name == "high-guidance":
            out[name] = replace(sampler, guidance_scale=2.0 * sampler.guidance_scale)
        else:
            raise ValueError(f"sampler {name!r} is unknown: expected one of {', '.join(SAMPLER_NAMES)}")
    return out


def make_folds(rows: list[ManifestEntry], folds: int, seed: int) -> list[list[int]]:
    """Deal row indices into ``folds`` folds, stratified by duplication count (seeded, deterministic).

    Args:
        rows: The memorized rows.
        folds: Number of folds (>= 2, at most ``len(rows)``).
        seed: Seed of the order within each duplication count.

    Returns:
        ``folds`` lists of row indices, every row in exactly one.
    """
    if not 2 <= folds <= len(rows):
        raise ValueError(f"folds={folds} is invalid: need 2 <= folds <= {len(rows)} (the number of rows)")
    rng = np.random.default_rng(seed)
    by_dup: dict[Any, list[int]] = defaultdict(list)
    for i, e in enumerate(rows):
        by_dup[e.duplicates].append(i)
    out: list[list[int]] = [[] for _ in range(folds)]
    k = 0
    for dup in sorted(by_dup, key=lambda d: (d is None, d or 0)):
        for i in rng.permutation(by_dup[dup]):
            out[k % folds].append(int(i))
            k += 1
    return [sorted(f) for f in out]


def _success(scorer: Any, images: np.ndarray, references: list[np.ndarray], threshold: float) -> list[list[bool]]:
    """Per row, per seed: does the generation reach ``threshold`` similarity to the row's reference?"""
    return [[bool(v >= threshold) for v in scorer.similarity(list(imgs), [ref]).float().numpy()[:, 0]]
            for imgs, ref in zip(images, references)]


def attack_from_starts(
    pipe: Any,
    edit: Edit | None,
    items: list[ReextractItem],
    configs: dict[str, ReextractConfig],
    samplers: dict[str, SamplerConfig],
    scorer: Any,
    *,
    progress: bool = False,
    summaries: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, list[list[bool]]]], dict[str, torch.Tensor]]:
    """Attack every item once per start and sample the found conditionings at every sampler.

    The conditioning is optimised with the model's training loss, which does not depend on the sampler; the first
    sampler is the attack's own (its result rows), the others sample the same conditionings again.

    Args:
        pipe: The pipeline (unchanged on return).
        edit: The edit applied during the attack, or ``None``.
        items: The attacked images (with their reference pixels).
        configs: ``{start: attack settings}``; each start's ``sampler`` should be the first sampler.
        samplers: ``{name: sampler}``, the attack's own sampler first.
        scorer: Similarity scorer (the attack's ``threshold``, else the scorer's, decides success).
        progress: Show progress bars.
        summaries: When given, receives each start's attack summary.

    Returns:
        ``({start: {sampler: per item, per seed success}}, {start: conditionings [N * seeds?, L, D]})``.
    """
    names = list(samplers)
    success: dict[str, dict[str, list[list[bool]]]] = {}
    found: dict[str, torch.Tensor] = {}
    refs = [it.reference for it in items]
    for init, cfg in configs.items():
        threshold = float(scorer.threshold if cfg.threshold is None else cfg.threshold)
        with apply_edit(pipe, edit):
            res = reextract(pipe, items, cfg, scorer, progress=progress)
            if summaries is not None:
                summaries[init] = res.summary()
            embeds = torch.cat([res.adversarial_embeds[i] for i in sorted(res.adversarial_embeds)])
            per_sampler = {names[0]: [list(r["success"]) for r in res.rows]}
            for name in names[1:]:
                with torch.no_grad():
                    gens = generate_images(pipe, prompt_embeds=embeds, num_seeds=cfg.num_seeds, seed=cfg.sample_seed,
                                           progress=False, sampler=samplers[name])
                per_sampler[name] = _success(scorer, gens, refs, threshold)
        success[init], found[init] = per_sampler, embeds
    return success, found


def any_start(success: dict[str, dict[str, list[list[bool]]]]) -> dict[str, list[list[bool]]]:
    """Per sampler, per item and seed: did any start succeed (the attacker keeps whichever start works)?"""
    worst: dict[str, list[list[bool]]] = {}
    for per_sampler in success.values():
        for name, succ in per_sampler.items():
            prev = worst.get(name)
            worst[name] = succ if prev is None else [[a or b for a, b in zip(p, s)] for p, s in zip(prev, succ)]
    return worst


def measure_rows(
    pipe: Any,
    edit: Edit | None,
    rows: list[ManifestEntry],
    scorer: Any,
    samplers: dict[str, SamplerConfig],
    *,
    attack: ReextractConfig | None,
    inits: tuple[str, ...] = ("prompt", "random"),
    attack_samplers: tuple[str, ...] | None = None,
    num_seeds: int = 4,
    seed: int = 0,
    progress: bool = False,
    summaries: dict[str, Any] | None = None,
    references: list[np.ndarray] | None = None,
    prompt: bool = True,
) -> list[dict[str, Any]]:
    """Replication of each row under ``edit``: with the prompt at each sampler, and under the attack.

    The attack optimises the conditioning once per start (``inits``) with the model's training loss, which does
    not depend on the sampler; its result is then sampled at every sampler of ``attack_samplers`` (default: all).

    Args:
        pipe: The pipeline (unchanged on return).
        edit: The edit to measure, or ``None`` for the unedited model.
        rows: Rows with reference images.
        scorer: Similarity scorer (its threshold decides replication).
        samplers: ``{name: sampler}`` (see :func:`sampler_variants`).
        attack: Attack settings, or ``None`` to measure with the prompt only.
        inits: Starts of the attack.
        attack_samplers: Sampler names the attack's result is sampled at.
        num_seeds: Generations per row and setting.
        seed: First generation seed (keep it apart from the seeds used to fit the edit).
        progress: Show progress bars.
        summaries: When given, receives each start's attack summary (``{init: summary}``, with the rate-vs-steps
            curve when ``attack.checkpoints`` asks for one), sampled at the first attack sampler.
        references: The rows' reference pixels at the model's size, when the caller has loaded them already.
        prompt: Measure the prompt at each sampler (``False``: the attack only; ``prompt_rate`` stays empty).

    Returns:
        One dict per row: ``prompt``, ``split``, ``duplicates``, ``prompt_rate`` ({sampler: rate}),
        ``attack_rate`` ({init: {sampler: rate}}) and ``attack_worst`` ({sampler: rate of seeds replicating under
        any start}).
    """
    if not rows:
        return []
    first = next(iter(samplers.values()))
    size = image_size(pipe, first.height, first.width)
    refs = references if references is not None else [load_reference(e.reference, size, row=e) for e in rows]
    out = [{"prompt": e.prompt, "split": e.split, "duplicates": e.duplicates, "prompt_rate": {}, "attack_rate": {},
            "attack_worst": {}} for e in rows]
    with apply_edit(pipe, edit), torch.no_grad():
        for name, sampler in samplers.items() if prompt else ():
            res = evaluate(pipe, rows, EvalConfig(num_seeds=num_seeds, seed=seed, sampler=sampler), scorer,
                           progress=False)
            for o, r in zip(out, res.rows):
                o["prompt_rate"][name] = r["replication_rate"]
    if attack is None:
        return out
    names = tuple(attack_samplers or samplers)
    items = [ReextractItem(e.prompt, ref, "memorized") for e, ref in zip(rows, refs)]
    configs = {init: replace(attack, init=init, num_seeds=num_seeds, sampler=samplers[names[0]]) for init in inits}
    success, _ = attack_from_starts(pipe, edit, items, configs, {n: samplers[n] for n in names}, scorer,
                                    progress=progress, summaries=summaries)
    for init, per_sampler in success.items():
        for name, succ in per_sampler.items():
            for o, s in zip(out, succ):
                o["attack_rate"].setdefault(init, {})[name] = float(np.mean(s))
    for name, succ in any_start(success).items():
        for o, s in zip(out, succ):
            o["attack_worst"][name] = float(np.mean(s))
    return out


def summarise_rows(rows: list[dict[str, Any]], groups: list[list[int]] | None = None) -> dict[str, Any]:
    """Mean rates over rows (and, with ``groups`` such as folds, the spread of the group means).

    Returns:
        ``{"rows": n, "prompt": {sampler: rate}, "attack": {sampler: worst-case rate},
        "attack_by_init": {init: {sampler: rate}}}``, plus ``"spread"`` (the same keys holding the standard
        deviation over groups, and ``"groups"``: each group's means) when ``groups`` is given.
    """

    def means(sel: list[dict[str, Any]]) -> dict[str, Any]:
        res: dict[str, Any] = {"rows": len(sel), "prompt": {}, "attack": {}, "attack_by_init": {}}
        if not sel:
            return res
        for name in sel[0]["prompt_rate"]:
            res["prompt"][name] = float(np.mean([r["prompt_rate"][name] for r in sel]))
        for name in sel[0]["attack_worst"]:
            res["attack"][name] = float(np.mean([r["attack_worst"][name] for r in sel]))
        for init, by in sel[0]["attack_rate"].items():
            res["attack_by_init"][init] = {n: float(np.mean([r["attack_rate"][init][n] for r in sel])) for n in by}
        return res

    out = means(rows)
    if groups:
        parts = [means([rows[i] for i in g]) for g in groups if g]
        spread: dict[str, Any] = {"groups": parts}
        for key in ("prompt", "attack"):
            spread[key] = {n: float(np.std([p[key][n] for p in parts])) for n in out[key]}
        out["spread"] = spread
    return out
