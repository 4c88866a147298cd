"""Prompt sets, manifests and reference images.

* :mod:`~diffmem.data.prompts`: prompt files (``read_prompts`` / ``read_prompt_records``): ``.txt`` (one prompt a
  line), ``.jsonl`` (a ``prompt`` or ``caption`` field), ``.csv`` / ``.tsv`` (a ``prompt`` or ``caption`` column,
  the delimiter sniffed) and ``.parquet`` (needs pyarrow: ``pip install 'diffmem[formats]'``).
* :mod:`~diffmem.data.manifest`: manifests (``read_manifest``, ``write_manifest``), jsonl files written next to the
  images they reference, one entry per prompt::

      {"prompt": "the zorblax emblem", "memorized": true, "duplicates": 32, "reference": "train/0007.png",
       "split": "locate"}

  ``reference`` is a path relative to the manifest's folder (and must lie inside it, after resolving symlinks and
  ``..``, unless the caller allows otherwise) or an ``http(s)`` URL. :func:`read_entries` reads either kind of
  file; a plain prompt file becomes unlabelled ``nonmem`` entries whose ``reference`` comes from a ``reference`` or
  ``url`` column when there is one (Wen et al.'s ``url``, NeMo's ``URL``). :func:`convert_manifest` writes any
  supported file as a checked manifest.
* :mod:`~diffmem.data.formats`: the two published sets that carry labels and are read as manifests, Webster's
  ground-truth parquet files and MemBench's csv, their memorized rows split between ``locate`` and ``heldout`` by a
  seeded hash of the prompt.
* :mod:`~diffmem.data.references`: reference images (:func:`load_reference`, :func:`fetch_references`,
  :func:`resolve_references`).
* :mod:`~diffmem.data.download`: the download cache. A URL is downloaded once into a cache folder
  (``~/.cache/diffmem``, or ``$DIFFMEM_CACHE``, or the ``cache`` argument) under the sha256 of the URL, with limits
  on size and time, and only when the server says ``image/*`` and the body decodes as an image.

Every public name is importable from :mod:`diffmem.data` itself.
"""

from __future__ import annotations

from .download import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    default_cache_dir,
    download_reference,
)
from .formats import ConversionSummary, SplitConfig
from .manifest import (
    MANIFEST_SPLITS,
    ManifestEntry,
    convert_manifest,
    is_url,
    read_entries,
    read_manifest,
    split_entries,
    write_manifest,
)
from .prompts import PROMPT_SUFFIXES, read_prompt_records, read_prompts
from .references import ReferenceFailure, fetch_references, load_reference, resolve_references

__all__ = [
    "PROMPT_SUFFIXES",
    "MANIFEST_SPLITS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "ManifestEntry",
    "ReferenceFailure",
    "read_prompts",
    "read_prompt_records",
    "read_manifest",
    "read_entries",
    "write_manifest",
    "convert_manifest",
    "ConversionSummary",
    "SplitConfig",
    "split_entries",
    "resolve_references",
    "is_url",
    "default_cache_dir",
    "download_reference",
    "load_reference",
    "fetch_references",
]
