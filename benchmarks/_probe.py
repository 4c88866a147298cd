"""What the probes (``probe_*.py``) share: their common flags, the held-out attack measurement, the result line and
the JSON file they add their result to. Run as scripts, the probes find this module beside them."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["probe_parser", "open_model", "heldout_attack_rate", "print_stage", "save_result"]


def probe_parser(doc: str, *, edit: bool = True) -> argparse.ArgumentParser:
    """A parser with ``--model`` and ``--threads`` and, for a probe that starts from a saved edit, ``--edit``,
    ``--eval-seeds``, ``--attack`` and ``--out``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", required=True, help="zoo member name or model folder")
    p.add_argument("--threads", type=int, default=1)
    if edit:
        p.add_argument("--edit", required=True, help="the edit to start from (an edit.safetensors file)")
        p.add_argument("--eval-seeds", type=int, default=2)
        p.add_argument("--attack", action="store_true", help="also attack the held-out rows (from the prompt and "
                                                              "from a random start)")
        p.add_argument("--out", default=None, help="JSON file to add the result to (earlier keys kept)")
    return p


def open_model(args: argparse.Namespace) -> tuple[Any, Any, Any, list[Any]]:
    """Start a probe: INFO logging, ``args.threads`` torch threads, and the zoo member (or model folder)
    ``args.model`` as ``(path, pipe, sampler, manifest entries)``."""
    import torch

    from diffmem.zoo.members import load_zoo_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    return load_zoo_model(args.model)


def heldout_attack_rate(pipe: Any, edit: Any, heldout: list[Any], scorer: Any, sampler: Any, num_seeds: int) -> float:
    """The evaluation attack (50 steps, from the prompt and from random; a seed counts when either replicates) on
    ``heldout`` rows under ``edit``, sampled at the model's sampler."""
    from diffmem.crossfit import measure_rows, sampler_variants, summarise_rows
    from diffmem.workflows.mitigate import final_attack_config

    cfg = final_attack_config(50, sampler, 0, checkpoints=())
    out = summarise_rows(measure_rows(pipe, edit, heldout, scorer, sampler_variants(sampler, ("model",), pipe=pipe),
                                      attack=cfg, attack_samplers=("model",), num_seeds=num_seeds, prompt=False))
    return out["attack"]["model"]


def print_stage(model: str, stage: str, figures: dict[str, float]) -> None:
    """The result line of one stage: ``probe model=<m> <stage>: key=value ...`` (KIDs ×10³)."""
    print(f"probe model={model} {stage}: " + " ".join(  # noqa: T201 - the probe's output
        f"{k}={1e3 * v:.2f}" if k.startswith("kid") else f"{k}={v:.2f}" for k, v in figures.items()), flush=True)


def save_result(path: str | None, key: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Add ``{key: {settings, result}}`` to the JSON file at ``path`` (kept keys of earlier runs); no path: nothing."""
    if not path:
        return
    out = Path(path)
    done = json.loads(out.read_text()) if out.is_file() else {}
    done[key] = {"settings": vars(args), "result": result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(done, indent=2, sort_keys=True, default=str) + "\n")
