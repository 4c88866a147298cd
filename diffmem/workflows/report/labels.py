"""Human labels and fixed number formats of the report: every key gets a label, every value a format."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np

NOT_MEASURED = "not measured"

# key -> (human label, kind); the kind decides the number format (see _fmt).
_METRICS: dict[str, tuple[str, str]] = {
    # split summaries
    "num_prompts": ("Prompts", "count"),
    "replication_rate": ("Replication rate", "rate"),
    "replication_rate_strict": ("Replication rate, strict threshold", "rate"),
    "mean_similarity": ("Mean similarity to the training image", "similarity"),
    "max_similarity": ("Highest similarity to the training image", "similarity"),
    "diversity_similarity": ("Similarity between seeds", "similarity"),
    "drift_similarity": ("Similarity to the unedited image at the same seed", "similarity"),
    "seed_similarity_before": ("Similarity between seeds of the unedited model", "similarity"),
    "drift_within_seed_spread": ("Prompts whose drift stays within the seed spread", "rate"),
    "drift_within_spread": ("Prompts whose drift stays within the seed spread", "rate"),
    "drift_similarity_unseen": ("Similarity to the unedited image, prompts the repair did not see", "similarity"),
    "drift_within_spread_unseen": ("Prompts the repair did not see whose drift stays within the seed spread", "rate"),
    "drift_unseen_rows": ("Ordinary prompts the repair did not see", "count"),
    "within_spread_fraction": ("Prompts whose drift stays within the seed spread", "rate"),
    "pixel_drift": ("Mean absolute pixel change", "rate"),
    "clip_score": ("CLIP score, image against prompt", "similarity"),
    # edits
    "heldout_replication_prompt": ("Held-out replication, prompt", "rate"),
    "heldout_replication_attack": ("Held-out replication, attack", "rate"),
    "heldout_rows_attacked": ("Held-out rows attacked", "count"),
    "control_rate": ("Control re-extraction", "rate"),
    "never_seen_rate": ("Never-seen images under attack", "rate"),
    "attack_advantage": ("Held-out attack rate above the never-seen rate", "points"),
    "parameters_changed": ("Parameters changed", "count"),
    "fraction_changed": ("Share of weights changed", "share"),
    "wall_time_s": ("Wall time", "seconds"),
    "measure_time_s": ("Measurement time", "seconds"),
    # sweep
    "ratio": ("Mask ratio", "ratio"),
    "strength": ("Strength", "ratio"),
    "out_of_fold_replication": ("Replication, out of fold", "rate"),
    "fraction": ("Share of weights changed", "share"),
    "weights_zeroed": ("Parameters changed", "count"),
    "locate_replication": ("Replication, locate split", "rate"),
    "heldout_replication": ("Replication, held-out split", "rate"),
    # detection
    "auc": ("Area under the ROC curve", "similarity"),
    "tpr_at_1pct_fpr": ("True positives at 1% false positives", "rate"),
    # attack
    "num_flagged": ("Prompts flagged", "count"),
    "num_verified_prompts": ("Prompts with a verified extraction", "count"),
    "num_verified_generations": ("Verified extracted images", "count"),
    "extraction_rate": ("Share of prompts extracted", "rate"),
    "threshold": ("Similarity threshold", "similarity"),
    "false_flag_rate_target": ("Target false-flag rate", "rate"),
    "false_flag_rate_achieved": ("Achieved false-flag rate", "rate"),
    # re-extraction
    "memorization_rate": ("Memorized re-extraction", "rate"),
    # IoU
    "overall": ("Overlap (IoU) over all layers", "similarity"),
    "chance_overall": ("Overlap expected by chance", "similarity"),
    "subset_sizes": ("Prompts in each half", "count"),
    "weights": ("Weights in each mask", "count"),
    # run
    "total_seconds": ("Total", "seconds"),
}

# Settings are shown as given (no fixed precision): these are inputs, not measurements.
_SETTINGS: dict[str, str] = {
    "num_inference_steps": "Denoising steps",
    "guidance_scale": "Guidance scale",
    "guidance_rescale": "Guidance rescale",
    "height": "Height (px)",
    "width": "Width (px)",
    "name": "Name",
    "threshold": "Replication threshold",
    "report_thresholds": "Thresholds reported",
    "source": "Source",
    "preprocessing": "Preprocessing",
    "random_weights": "Random weights",
    "weights": "Weights",
    "scheduler": "Scheduler",
    "scheduler_in_use": "Scheduler in use",
}

# Short column headers of the wide tables (edits, sweep); the edits table explains each one under it.
_HEADERS: dict[str, str] = {
    "heldout_replication_prompt": "Replication from prompt",
    "heldout_replication_attack": "Replication under attack",
    "heldout_rows_attacked": "Rows attacked",
    "control_rate": "Once-seen under attack",
    "never_seen_rate": "Never-seen under attack",
    "attack_advantage": "Advantage over never-seen",
    "strength": "Strength",
    "out_of_fold_replication": "Replication, out of fold",
    "drift_similarity": "Drift similarity",
    "seed_similarity_before": "Seed-to-seed similarity",
    "drift_within_spread": "Drift within seed spread",
    "drift_similarity_unseen": "Drift similarity, not repaired on",
    "drift_within_spread_unseen": "Drift within spread, not repaired on",
    "drift_unseen_rows": "Prompts not repaired on",
    "drift_within_seed_spread": "Drift within seed spread",
    "parameters_changed": "Parameters changed",
    "fraction_changed": "Share of weights",
    "fraction": "Share of weights",
    "wall_time_s": "Wall time",
    "measure_time_s": "Measurement time",
    "locate_replication": "Replication, locate",
    "heldout_replication": "Replication, held-out",
    "pixel_drift": "Mean pixel change",
}
# Drift compares edited with unedited images: it exists after an edit only and gets a table of its own.
_DRIFT_KEYS = ("drift_similarity", "seed_similarity_before", "drift_within_seed_spread", "drift_within_spread",
               "within_spread_fraction", "pixel_drift", "drift_similarity_unseen", "drift_within_spread_unseen")

# Sampler settings every edit is measured at (diffmem.crossfit.SAMPLER_NAMES) and the attack's starts.
_SAMPLERS: dict[str, str] = {"model": "model's settings", "diffusers-default": "diffusers defaults",
                             "high-guidance": "twice the guidance"}
_INITS: dict[str, str] = {"prompt": "from the prompt", "random": "from a random start"}
# Phases of a run (``timings_s``), in the words of the page.
_PHASES: dict[str, str] = {
    "load": "Load the model", "record": "Record activation statistics", "strength": "Choose the strength",
    "robust": "Robust rounds", "estimate": "Cross-fit estimate", "heldout": "Measure the held-out rows",
    "images": "Images for this report", "quality": "Quality metrics", "detect": "Detection",
    "mitigate": "Mitigation", "subspace": "Shared-weights evidence", "edits": "Measure every edit",
    "carlini": "Extraction attack",
}

_SPLITS: dict[str, str] = {
    "locate": "Locate split: memorized prompts used to find the edit",
    "heldout": "Held-out split: memorized prompts never used to find the edit",
    "nonmem": "Non-memorized prompts",
}
_SPLIT_SHORT: dict[str, str] = {"locate": "locate", "heldout": "held-out", "nonmem": "non-memorized"}
_GALLERY_SPLIT: dict[str, str] = {"locate": "memorized prompt given (used to find the edit)",
                                  "heldout": "held-out split", "nonmem": "non-memorized prompt"}

_WORDS: dict[str, str] = {
    "num": "number of", "tpr": "TPR", "fpr": "FPR", "pct": "%", "iou": "IoU", "auc": "AUC", "clip": "CLIP",
    "sscd": "SSCD", "ssim": "SSIM", "ffn": "FFN", "unet": "UNet", "gpu": "GPU", "cpu": "CPU", "heldout": "held-out",
    "nonmem": "non-memorized",
}
_MISSING_WORDS = re.compile(r"\b(?:None|nan|NaN|NAN)\b")


def _is_missing(value: Any) -> bool:
    """Whether ``value`` stands for a measurement that was not made (None, NaN or an infinity)."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return not math.isfinite(float(value))
    return False


def _humanize(key: str) -> str:
    """A readable label for a key nobody labelled: ``num_verified_prompts`` -> ``Number of verified prompts``."""
    if key in _METRICS:
        return _METRICS[key][0]
    if key in _SETTINGS:
        return _SETTINGS[key]
    words = [w for w in re.split(r"[_\-\s]+", str(key)) if w]
    if len(words) > 1 and words[-1] == "s":  # a unit suffix (``wall_time_s``): the value says "s" itself
        words = words[:-1]
    words = [_WORDS.get(w.lower(), w) for w in words]
    text = " ".join(words) or "Value"
    return text[0].upper() + text[1:]


def _guess_kind(key: str, value: Any) -> str:
    """The number format of an unlabelled key, guessed from its name and value."""
    if key in _METRICS:
        return _METRICS[key][1]
    k = key.lower()
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, str):
        return "text"
    if k.endswith("_s") or "seconds" in k or k.endswith("_time"):
        return "seconds"
    if "rate" in k or "fraction" in k or "share" in k or k.startswith(("tpr", "fpr")):
        return "rate"
    if any(w in k for w in ("similarity", "iou", "auc", "threshold", "score", "cosine", "drift")):
        return "similarity"
    if k.startswith("num_") or "count" in k or "parameters" in k or "weights" in k:
        return "count"
    if isinstance(value, (int, np.integer)):
        return "count"
    return "number"


def _signed(text: str, delta: float) -> str:
    if delta > 0:
        return "+" + text
    if delta < 0:
        return "\u2212" + text
    return text


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt(value: Any, kind: str) -> str:
    """One value in its kind's fixed format; ``not measured`` when missing.

    Kinds: ``rate`` (percentage, one decimal), ``points`` (a signed difference of rates in percentage points),
    ``share`` (percentage, three decimals, for small shares of weights),
    ``similarity`` (three decimals), ``ratio`` (two decimals), ``count`` (integer with thousands separators),
    ``seconds``, ``bool`` (yes / no), ``setting`` (as given), ``text`` and ``number`` (three decimals).
    """
    if _is_missing(value):
        return NOT_MEASURED
    if isinstance(value, (list, tuple)):
        parts = [_fmt(v, kind) for v in value]
        return ", ".join(parts) if parts else NOT_MEASURED
    if isinstance(value, Mapping):
        return "; ".join(f"{_humanize(str(k))}: {_fmt(v, _guess_kind(str(k), v))}" for k, v in value.items())
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    v = float(value)
    if kind == "rate":
        return f"{100 * v:.1f}%"
    if kind == "share":
        return f"{100 * v:.3f}%"
    if kind == "points":
        return _signed(f"{abs(100 * v):.1f} pp", round(100 * v, 1))
    if kind == "similarity":
        return f"{v:.3f}"
    if kind == "ratio":
        return f"{v:.2f}"
    if kind == "count":
        return f"{int(round(v)):,}"
    if kind == "seconds":
        return _fmt_seconds(v)
    if kind == "setting":
        return f"{int(value):,}" if isinstance(value, (int, np.integer)) else f"{v:g}"
    return f"{v:,.3f}"


def _fmt_change(before: Any, after: Any, kind: str) -> str:
    """``after - before`` in the kind's unit (percentage points for rates); empty when it means nothing."""
    if _is_missing(before) or _is_missing(after) or isinstance(before, (bool, str)) or isinstance(after, (bool, str)):
        return ""
    try:
        delta = float(after) - float(before)
    except (TypeError, ValueError):
        return ""
    if kind == "rate":
        return _signed(f"{abs(100 * delta):.1f} pp", round(100 * delta, 1))
    if kind == "share":
        return _signed(f"{abs(100 * delta):.3f} pp", round(100 * delta, 3))
    if kind == "similarity":
        return _signed(f"{abs(delta):.3f}", round(delta, 3))
    if kind == "count":
        return _signed(f"{abs(int(round(delta))):,}", round(delta))
    return ""


def _edit_label(name: Any) -> str:
    """Display name of an edit; the unedited baseline reads ``No edit (baseline)``."""
    if _is_missing(name) or str(name).strip().lower() in ("", "none", "baseline", "unedited", "no edit"):
        return "No edit (baseline)"
    return _humanize(str(name))


def _sampler_label(name: str) -> str:
    return _SAMPLERS.get(str(name), _humanize(str(name)).lower())


def _init_label(name: str) -> str:
    return _INITS.get(str(name), f"from {_humanize(str(name)).lower()}")


def _phase_label(name: str) -> str:
    return _PHASES.get(str(name), _humanize(str(name)))


def _split_label(split: str) -> str:
    return _SPLITS.get(split, _humanize(split))


def _clean_text(text: str) -> str:
    """Free text with stray ``None`` / ``nan`` words replaced by ``not measured``."""
    return _MISSING_WORDS.sub(NOT_MEASURED, text)


def short_layer_name(name: str, width: int = 30) -> str:
    """A short, wrapped label for a layer name such as ``down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2``.

    Args:
        name: Module name in the denoiser.
        width: Wrap the label at about this many characters.

    Returns:
        For example ``down 1 · attn 0 · block 0`` (lines joined by ``\\n`` when longer than ``width``).
    """
    s = re.sub(r"\.(ff|feed_forward|mlp)(\.net)?(\.\d+)?(\.proj)?$", "", str(name))
    rules = (
        (r"^down_blocks\.(\d+)", r"down \1"),
        (r"^up_blocks\.(\d+)", r"up \1"),
        (r"^mid_block", "mid"),
        (r"attentions\.(\d+)", r"attn \1"),
        (r"single_transformer_blocks\.(\d+)", r"single block \1"),
        (r"transformer_blocks\.(\d+)", r"block \1"),
    )
    for pattern, repl in rules:
        s = re.sub(pattern, repl, s)
    s = " \u00b7 ".join(p for p in s.split(".") if p)
    s = s.replace("_", " ")
    return "\n".join(textwrap.wrap(s, width=width, break_long_words=True)) or str(name)

