"""The typed record of one row of the edits table: written by ``edit_row`` (mitigate, demo), read by the report."""

from __future__ import annotations

from typing import TypedDict

__all__ = ["EditRow"]


class EditRow(TypedDict, total=False):
    """One edit measured on the held-out rows and the controls (rates are shares of generations, ``None`` when the
    manifest has no such rows)."""

    name: str
    heldout_replication_prompt: float | None  # with the prompt, at the model's sampler
    heldout_replication_attack: float | None  # under re-extraction from any start, at the model's sampler
    heldout_prompt_by_sampler: dict[str, float]  # {sampler name: rate}
    heldout_attack_by_sampler: dict[str, float]
    heldout_attack_by_start: dict[str, dict[str, float]]  # {start: {sampler name: rate}}
    heldout_rows_attacked: int  # held-out rows under the attack (a spread of them, or all)
    control_rate: float | None  # the attack on once-seen training images
    never_seen_rate: float | None  # the attack on images in no training set
    attack_advantage: float | None  # held-out under attack minus never-seen
    parameters_changed: int
    fraction_changed: float
    wall_time_s: float  # to find the edit
    measure_time_s: float  # to measure it
    drift_similarity: float | None  # ordinary prompts after the edit against before, same seed
    seed_similarity_before: float | None  # two seeds of the unedited model
    drift_within_spread: float | None  # share of ordinary prompts whose drift is within the seed spread
    drift_similarity_unseen: float | None  # the same on the nonmem rows a repair did not fit on
    drift_within_spread_unseen: float | None
    drift_unseen_rows: int
