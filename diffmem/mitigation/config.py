"""Settings and result of :func:`~diffmem.mitigation.mitigate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import DiffmemConfig, SamplerConfig, require
from ..crossfit import SAMPLER_NAMES
from ..edits import Edit
from ..localization import list_locators
from ..reextraction import ReextractConfig

__all__ = ["MitigateConfig", "MitigationResult", "DEFAULT_RATIOS", "DEFAULT_RANKS", "ROBUST"]

DEFAULT_RATIOS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_RANKS = (1, 2, 4, 8, 16)
ROBUST = ("none", "prune", "finetune")


@dataclass
class MitigateConfig(DiffmemConfig):
    """Settings of :func:`mitigate`.

    Args:
        method: Locate method: ``wanda``, ``neuron`` or ``directions``.
        ratio: Edit strength (the ratio; for ``directions`` the rank); ``None`` chooses it (``--ratio auto``).
        strengths: Strengths tried by the automatic choice, ascending.
        target: Largest acceptable ``locate`` replication (and, with ``robust``, attack rate).
        robust: ``none``, ``prune`` or ``finetune``.
        max_rounds: Rounds of the robust step.
        min_rounds: Rounds run even when the attack already fails on the given rows (at most ``max_rounds``): the
            given rows may be weaker memories than those not given, and a round's saliency (the training loss toward
            the memorized images under the attack's conditionings) points at their weights whether or not the
            conditionings replicate.
        record_steps: Leading sampler steps recorded and used to locate (tau).
        sweep_num_seeds: Seeds per prompt when choosing the strength.
        margin_steps: Strengths taken past the first one that meets ``target`` (each only while drift and the
            memorized prompts' plausibility still pass): the first to pass is the one whose noisy figure happened to
            be lowest, so it under-deletes images that were not given.
        sampler: The model's sampler: the recording, the strength sweep and the measurements use it, and the robust
            loop's attack samples at it and its :data:`~diffmem.crossfit.SAMPLER_NAMES` variants.
        attack: Settings of the re-extraction attack run during mitigation (``init="prompt"``); its sampler is set
            to each of ``robust_samplers`` in turn.
        robust_score: How a robust pruning round locates again: ``"saliency"`` (default) scores every denoiser
            weight by how much zeroing it raises the training loss toward the memorized images under the adversarial
            conditionings, minus ``robust_lambda`` times how much it changes the loss of the ``nonmem`` rows;
            ``"activations"`` records FFN statistics under the adversarial conditionings and reruns ``method``.
        robust_fraction: Share of the denoiser's weights a saliency round may add.
        robust_gate: Hold every robust round to the strength sweep's quality vetoes (needs ``nonmem`` rows): the
            memorized prompts must still render plausibly (their KID to ordinary generations within the unedited
            one's plus two standard deviations) and the ordinary prompts' drift must stay within the seed spread
            for at least half of them; a saliency round that breaks them is shrunk (the smallest size is kept
            when every size breaks them). Off by default: on the zoo it lowered the memorized prompts' KID a
            little but left the embedded model's held-out emblems replicating (docs/mitigation.md).
        robust_shrinks: Times a saliency round's addition may be halved to pass the gate.
        redirect: After the deletion, send the given memorized prompts to ordinary captions (a closed-form edit of
            every cross-attention layer's keys and values, :func:`~diffmem.mitigation.redirect.fit_redirect`), so
            that they render as plausible ordinary images instead of noise; the value is ``λ``, the weight on
            keeping the ordinary prompts' text features where they are. ``None`` (default): off.
        repair_steps: Last (after the robust rounds and the redirect), distil the edited denoiser toward the unedited
            one on ordinary rows for this many steps, holding the given memorized rows at the edited model
            (:func:`~diffmem.mitigation.repair.repair_edit`), so that ordinary prompts drift less; 0 (default): off.
        repair_share: Share of the ``nonmem`` rows the repair fits on (every other row, evenly spread); the rest
            stay unseen by it, so that the drift measured on them is not in-sample.
        robust_aggregate: How a saliency round combines the images: ``"sum"`` adds their scores; ``"shared"``
            normalises each (image, conditioning) term's scores and keeps only weights whose score is positive for
            at least ``robust_share`` of the terms (weights many memorized images share, the seed paper's
            subspace, located under attack).
        robust_share: Fraction of terms that must agree with ``robust_aggregate="shared"``.
        attack_inits: Starts of the robust loop's attack (``prompt``, ``random``): conditionings from every start
            enter the saliency round.
        robust_samplers: Sampler settings (names of :data:`diffmem.crossfit.SAMPLER_NAMES`) the robust loop's
            attack is sampled at; a round stops only when the rate is at most ``target`` at all of them.
        folds: Cross-fitting folds over the ``locate`` rows (0 turns it off): the strength is chosen on
            out-of-fold replication, and the whole fit is repeated leaving each fold out, to estimate the rates on
            memorized images that were not given.
        estimate_num_seeds: Generations per row and setting when measuring a left-out fold.
        robust_lambda: Weight of the non-memorized loss change in the saliency score.
        finetune_steps: Optimiser steps per robust fine-tuning round.
        finetune_lr: Learning rate of the fine-tuning.
        finetune_batch: Noise draws per fine-tuning step and loss term.
        seed: First seed.
    """

    method: str = "wanda"
    ratio: float | None = None
    strengths: tuple[float, ...] = DEFAULT_RATIOS
    target: float = 0.05
    robust: str = "none"
    max_rounds: int = 3
    min_rounds: int = 1
    robust_score: str = "saliency"
    robust_fraction: float = 0.002
    robust_gate: bool = False
    robust_shrinks: int = 2
    redirect: float | None = None
    repair_steps: int = 0
    repair_share: float = 0.5
    robust_aggregate: str = "shared"
    robust_share: float = 0.5
    attack_inits: tuple[str, ...] = ("prompt", "random")
    robust_samplers: tuple[str, ...] = ("model", "diffusers-default")
    folds: int = 3
    estimate_num_seeds: int = 2
    robust_lambda: float = 5.0
    record_steps: int = 10
    sweep_num_seeds: int = 2
    margin_steps: int = 1
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    attack: ReextractConfig = field(default_factory=lambda: ReextractConfig(checkpoints=(), num_seeds=2))
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    finetune_batch: int = 8
    seed: int = 0

    def check(self) -> None:
        require(self.method in list_locators(), "method", self.method, f"choose one of {', '.join(list_locators())}")
        require(self.robust in ROBUST, "robust", self.robust, f"choose one of {', '.join(ROBUST)}")
        require(not (self.robust == "prune" and self.method == "directions"), "robust", self.robust,
                "'prune' merges masks: use method wanda or neuron")
        require(self.robust_score in ("saliency", "activations"), "robust_score", self.robust_score,
                "choose saliency or activations")
        require(self.robust_aggregate in ("sum", "shared"), "robust_aggregate", self.robust_aggregate,
                "choose sum or shared")
        require(0 < self.robust_share <= 1, "robust_share", self.robust_share, "must be in (0, 1]")
        require(bool(self.attack_inits) and all(i in ("prompt", "random") for i in self.attack_inits),
                "attack_inits", self.attack_inits, "give prompt and/or random")
        require(bool(self.robust_samplers) and all(n in SAMPLER_NAMES for n in self.robust_samplers),
                "robust_samplers", self.robust_samplers, f"give names from {', '.join(SAMPLER_NAMES)}")
        require(self.folds == 0 or self.folds >= 2, "folds", self.folds, "0 (off) or >= 2")
        require(0 < self.robust_fraction <= 0.1, "robust_fraction", self.robust_fraction, "must be in (0, 0.1]")
        require(self.robust_shrinks >= 0, "robust_shrinks", self.robust_shrinks, "must be >= 0")
        require(self.redirect is None or self.redirect > 0, "redirect", self.redirect, "must be > 0 (or None: off)")
        require(self.repair_steps >= 0, "repair_steps", self.repair_steps, "must be >= 0 (0: off)")
        require(0 < self.repair_share <= 1, "repair_share", self.repair_share, "must be in (0, 1]")
        require(self.robust_lambda >= 0, "robust_lambda", self.robust_lambda, "must be >= 0")
        require(self.ratio is None or 0 < self.ratio <= 1 or (self.method == "directions" and self.ratio >= 1),
                "ratio", self.ratio, "must be in (0, 1] (a rank >= 1 for directions)")
        require(bool(self.strengths) and list(self.strengths) == sorted(self.strengths), "strengths", self.strengths,
                "give ascending values")
        require(0 <= self.target <= 1, "target", self.target, "must be in [0, 1]")
        require(0 <= self.min_rounds <= self.max_rounds, "min_rounds", self.min_rounds, "must be in [0, max_rounds]")
        require(self.margin_steps >= 0, "margin_steps", self.margin_steps, "must be >= 0")
        for name in ("max_rounds", "record_steps", "sweep_num_seeds", "estimate_num_seeds", "finetune_steps",
                     "finetune_batch"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.finetune_lr > 0, "finetune_lr", self.finetune_lr, "must be > 0")


@dataclass
class MitigationResult:
    """What :func:`mitigate` found: the edit, how its strength was chosen and what each robust round did.

    ``plain_edit`` is the located edit before any robust round; ``first_adversarial`` the conditionings the first
    robust round's attack found against it (``[P, L, D]``, one per ``locate`` row), or ``None``.
    """

    edit: Edit
    strength: float
    sweep: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    locality: dict[str, Any]
    timings_s: dict[str, float]
    plain_edit: Edit | None = None
    first_adversarial: torch.Tensor | None = None
    estimate: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "kind": self.edit.kind,
            "strength": self.strength,
            "parameters_changed": self.edit.num_params_changed(),
            "fraction_changed": self.edit.fraction_changed(),
            "sweep": self.sweep,
            "rounds": self.rounds,
            "locality": self.locality,
            "timings_s": self.timings_s,
        }
