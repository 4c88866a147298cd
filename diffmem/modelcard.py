"""Model cards for exported pipelines, and pushing an export to the Hugging Face Hub.

Every export (:func:`diffmem.edits.export_edited`) carries a ``README.md`` in the Hub's convention: YAML metadata
(``library_name: diffusers``, ``base_model``, ``tags``, ``pipeline_tag``) and a body that says what the edit changed,
the sampler settings the model declares, and, when the caller measured them, a table of results. The card is
written with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`, so ``ModelCard.load`` reads it back.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError, PushError
from .files import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["write_model_card", "push_to_hub", "render_results", "hub_model_id", "CARD_NAME", "CARD_TAGS"]

CARD_NAME = "README.md"
CARD_TAGS = ("diffmem", "memorization-mitigation")
_DEFAULTS_FILE = "diffmem_defaults.json"
_CACHE_DIR = re.compile(r"models--([\w.-]+?)--([\w.-]+)")
_KIND_TEXT = {
    "mask": "selected weights of the denoiser's feed-forward layers are set to zero",
    "directions": "a low-rank set of directions of the feed-forward activations is projected out (baked into the "
                  "layers' weights)",
    "weight delta": "some of the denoiser's parameters are changed (for example by fine-tuning)",
}


def hub_model_id(source: str | os.PathLike | None) -> str | None:
    """The Hub model id of a source model, or ``None`` for a local folder that is not a Hub download.

    Args:
        source: A hub id, or the path a model was loaded from (a snapshot in the Hub cache names its repository).

    Returns:
        ``"namespace/name"`` (or a bare legacy name), or ``None``.
    """
    if not source:
        return None
    text = os.fspath(source)
    match = _CACHE_DIR.search(text)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if Path(text).expanduser().exists():
        return None
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except ValueError:
        return None
    return text


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split()).replace("|", "\\|")


def render_results(results: list[dict[str, Any]] | str) -> str:
    """A Markdown table of measured figures: one row per dict, the columns in first-seen order.

    Args:
        results: Rows (for example ``{"setting": "edited", "replication": 0.02, "clip_score": 30.1}``), or a
            Markdown table that is used as it is.

    Returns:
        The table, ending in a newline.
    """
    if isinstance(results, str):
        return results.rstrip("\n") + "\n"
    columns: list[str] = []
    for row in results:
        columns += [str(k) for k in row if str(k) not in columns]
    if not columns:
        return ""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in results:
        values = {str(k): v for k, v in row.items()}
        lines.append("| " + " | ".join(_cell(values.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _mitigation_steps(meta: dict[str, Any]) -> str | None:
    """The steps of ``diffmem mitigate`` that made an edit (from its ``mitigation`` settings), or ``None``."""
    mit = meta.get("mitigation")
    if not isinstance(mit, dict) or not mit.get("method"):
        return None
    steps = [f"{mit['method']} at strength {_cell(meta.get('strength', mit.get('ratio')))}"]
    if mit.get("robust") not in (None, "none"):
        steps.append(f"robust {mit['robust']} rounds")
    if mit.get("redirect"):
        steps.append(f"redirect of the memorized prompts (λ = {float(mit['redirect']):g})")
    if mit.get("repair_steps"):
        steps.append(f"repair toward the unedited model ({int(mit['repair_steps'])} steps)")
    return "diffmem mitigate: " + ", then ".join(steps)


def _edit_section(edit: Any) -> list[str]:
    if edit is None:
        return ["## The edit", "", "None: this export is the source model, unchanged.", ""]
    d = edit.describe()
    kind = str(d.get("kind", edit.kind))
    what = _KIND_TEXT.get(kind, kind)
    if kind == "mask" and d.get("level") == "neuron":
        what = ("whole hidden neurons of the denoiser's feed-forward layers are switched off (their output weights "
                "are set to zero)")
    layers = d.get("counts") or d.get("ranks")
    rows = [
        ("Kind", f"{kind}: {what}"),
        ("Weights changed", f"{d['num_params_changed']:,} of {d['num_total']:,} "
                            f"({100 * d['fraction_changed']:.4g} % of the denoiser)"),
    ]
    if isinstance(layers, dict):
        rows.append(("Layers edited", f"{sum(1 for v in layers.values() if v)} of {len(layers)} targeted"))
    elif d.get("num_tensors") is not None:
        rows.append(("Tensors changed", str(d["num_tensors"])))
    meta = getattr(edit, "meta", None) or {}
    made = _mitigation_steps(meta)
    if made:
        rows.append(("Made by", made))
    elif meta.get("method"):
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        given = ", ".join(f"{k} {_cell(config[k])}" for k in ("ratio", "rank", "explained_variance") if k in config)
        rows.append(("Located with", f"{meta['method']}" + (f" ({given})" if given else "")))
    rows.append(("Edit sha256", f"`{d['sha256']}`"))
    table = [f"| {k} | {_cell(v)} |" for k, v in rows]
    return ["## The edit", "", "| | |", "|---|---|", *table, "",
            "Shapes are unchanged, so the folder loads with a plain `from_pretrained` and needs no diffmem code. "
            "`diffmem_manifest.json` beside this card records the full provenance.", ""]


def _sampler_section(sampler: dict[str, Any], pipeline: bool) -> list[str]:
    lines = ["## Sampler settings", "",
             "The sampler settings to use with this model (diffusers does not read diffmem's `diffmem_defaults.json`, "
             "so pass them to the call):", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in sorted(sampler.items())]
    if pipeline:
        args = "".join(f", {k}={v!r}" for k, v in sorted(sampler.items()) if v is not None)
        lines += ["", "```python", "from diffusers import DiffusionPipeline", "",
                  'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")  # or its Hub repo id',
                  f'image = pipe("a prompt"{args}).images[0]', "```"]
    return lines + [""]


def write_model_card(
    folder: str | os.PathLike,
    edit: Any,
    base_model: str | None = None,
    sampler: dict[str, Any] | None = None,
    results: list[dict[str, Any]] | str | None = None,
) -> Path:
    """Write ``README.md``, a Hub model card, into an exported folder.

    Args:
        folder: The exported folder (a pipeline with ``model_index.json``, or a bare denoiser).
        edit: The edit baked into the export (an :class:`~diffmem.edits.Edit`), or ``None``.
        base_model: The source model's hub id or path; the metadata names it only when it is a Hub model (a local
            folder is described by its name alone, so no local path is published).
        sampler: Sampler settings to list; by default those of the folder's ``diffmem_defaults.json``, if any.
        results: Measured figures for a table (see :func:`render_results`), or ``None`` for no table.

    Returns:
        The path of the card.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    pipeline = (folder / "model_index.json").is_file()
    if sampler is None and (folder / _DEFAULTS_FILE).is_file():
        sampler = json.loads((folder / _DEFAULTS_FILE).read_text(encoding="utf-8"))
    hub_id = hub_model_id(base_model)
    data = ModelCardData(
        library_name="diffusers",
        base_model=hub_id,
        tags=[*CARD_TAGS, "text-to-image"] if pipeline else list(CARD_TAGS),
        pipeline_tag="text-to-image" if pipeline else None,
    )
    source = f"`{hub_id}`" if hub_id else (f"a local model (`{Path(os.fspath(base_model)).name}`)" if base_model
                                           else "a diffusion model")
    what = "pipeline" if pipeline else "denoiser"
    body = [f"# Memorization-mitigated copy of {hub_id or 'a diffusion model'}", "",
            f"This {what} is {source} with an edit made by diffmem baked into its denoiser weights, to stop it from "
            "reproducing memorized training images.", ""]
    body += _edit_section(edit)
    if sampler:
        body += _sampler_section(sampler, pipeline)
    if results:
        body += ["## Measured results", "", render_results(results)]
    body += ["## Limitations", "",
             "The edit was located and checked on the prompts diffmem was given; memorized images that were not "
             "among them may still be reproduced.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = atomic_write_text(folder / CARD_NAME, str(card))
    logger.debug("wrote the model card %s", path)
    return path


def _push_errors() -> tuple[type[BaseException], ...]:
    """What a failed push raises: OS and HTTP errors (network, login, permissions) and an invalid repo id."""
    from huggingface_hub.errors import HfHubHTTPError

    http = tuple(c for c in HfHubHTTPError.__mro__ if c.__name__ in ("HTTPError", "RequestException"))
    return (OSError, ValueError, *http)


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload an exported folder to a Hub model repository, creating the repository if needed.

    Args:
        folder: The exported folder (with its ``README.md`` card and ``diffmem_manifest.json``).
        repo_id: ``namespace/name`` of the model repository.
        token: A Hub token; by default the one ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``).
        private: Create the repository as private (an existing repository keeps its visibility).

    Returns:
        The URL of the upload's commit.

    Raises:
        ConfigError: ``repo_id`` is not a valid repository id, or ``folder`` is not a folder.
        PushError: The Hub could not be reached, refused the login, or refused the upload; the local folder is left
            as it was.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ConfigError(f"repo_id={repo_id!r} is invalid: not a Hub repo id (namespace/name): {err}") from None
    if not folder.is_dir():
        raise ConfigError(f"cannot push {folder}: not a folder")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, token=token,
                                 commit_message="Upload a memorization-mitigated model exported by diffmem")
    except _push_errors() as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise PushError(f"could not push to {repo_id}: {reason}") from err
    url = getattr(info, "commit_url", None) or f"{api.endpoint}/{repo_id}"
    logger.info("pushed %s to %s", folder, url)
    return str(url)
