"""Edits of a denoiser's weights: the :class:`Edit` protocol, its kinds, loading and export.

* :mod:`~diffmem.edits.base`: the :class:`Edit` protocol, the registry of kinds (:func:`register_edit`),
  :func:`load_edit` and the reversible :func:`apply_edit`.
* :mod:`~diffmem.edits.mask`: :class:`Mask` (weights or whole FFN neurons to zero), :func:`mask_iou`,
  :func:`chance_iou`.
* :mod:`~diffmem.edits.directions`: :class:`DirectionBasis` (a subspace projected out, ``W (I - U U^T)``),
  :func:`subspace_overlap`.
* :mod:`~diffmem.edits.delta`: :class:`WeightDelta` (additive changes of any parameters).
* :mod:`~diffmem.edits.loading`: reading a saved edit back, the path behind every ``load``.
* :mod:`~diffmem.edits.export`: :func:`export_edited`, a folder that plain diffusers loads, and its guard
  :func:`check_output_dir`.

Importing the package imports every built-in kind, so each is registered before anything is loaded. The locators
that make edits live in :mod:`diffmem.localization`.
"""

from __future__ import annotations

from .base import Edit, apply_edit, list_edit_formats, load_edit, register_edit
from .delta import WeightDelta
from .directions import DirectionBasis, subspace_overlap
from .export import MANIFEST_FORMAT, MANIFEST_NAME, MODEL_SIDECARS, check_output_dir, export_edited
from .mask import MASK_LEVELS, Mask, chance_iou, mask_iou

__all__ = [
    "Edit",
    "register_edit",
    "list_edit_formats",
    "load_edit",
    "apply_edit",
    "Mask",
    "MASK_LEVELS",
    "mask_iou",
    "chance_iou",
    "DirectionBasis",
    "subspace_overlap",
    "WeightDelta",
    "export_edited",
    "check_output_dir",
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "MODEL_SIDECARS",
]
