"""Image grids: generated images embedded as PNG data URIs, small ones enlarged without smoothing."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from .labels import _GALLERY_SPLIT, NOT_MEASURED, _clean_text, _humanize, _is_missing
from .page import GalleryCell, GalleryRow

# Gallery images at most this many pixels on a side are upscaled (nearest neighbour) to about _SMALL_DISPLAY px;
# larger ones are shrunk to _MAX_EMBED px before embedding so the page stays small.
_SMALL_DISPLAY = 128
_MAX_EMBED = 256




def _as_rgb_uint8(image: Any) -> np.ndarray:
    """An ``H x W x 3`` uint8 array from a uint8 / float array (grey, RGB or RGBA) or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"gallery image of shape {arr.shape} is not an H x W x 3 image")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.nan_to_num(arr.astype(np.float64)) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0)
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _png_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gallery_image(image: Any) -> tuple[str, int, int, bool]:
    """PNG data URI and display size of a gallery image; small images are shown upscaled without smoothing."""
    from PIL import Image

    arr = _as_rgb_uint8(image)
    h, w = arr.shape[:2]
    side = max(h, w)
    if side > _MAX_EMBED:
        scale = _MAX_EMBED / side
        arr = np.asarray(Image.fromarray(arr).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                     Image.LANCZOS))
        h, w = arr.shape[:2]
    factor = max(1, _SMALL_DISPLAY // max(h, w))
    return _png_uri(arr), w * factor, h * factor, factor > 1


def _duplicates_text(dups: Any) -> str:
    try:
        n = int(dups)
    except (TypeError, ValueError, OverflowError):
        return ""
    return f"{n:,} copy in the training set" if n == 1 else f"{n:,} copies in the training set"


def _gallery_rows(section: Mapping[str, Any]) -> list[GalleryRow]:
    rows = []
    for row in section.get("rows") or []:
        details = []
        if row.get("split"):
            details.append(_GALLERY_SPLIT.get(str(row["split"]), _humanize(str(row["split"]))))
        if _duplicates_text(row.get("duplicates")):
            details.append(_duplicates_text(row.get("duplicates")))
        cells = []
        for cell in row.get("cells") or []:
            if cell.get("image") is None:
                raise ValueError(f"gallery cell {cell.get('label')!r} of prompt {row.get('prompt')!r} has no image")
            uri, w, h, pixelated = _gallery_image(cell["image"])
            score = cell.get("score")
            if "score" not in cell:  # e.g. the training image itself: nothing to compare with
                score_text = ""
            elif _is_missing(score):
                score_text = f"similarity {NOT_MEASURED}"
            else:
                score_text = f"similarity {float(score):.3f}"
            replicated = cell.get("replicated")
            detail = "" if _is_missing(cell.get("detail")) else _clean_text(str(cell.get("detail") or ""))
            cells.append(GalleryCell(_clean_text(str(cell.get("label") or "")), uri, w, h, pixelated, score_text,
                                     None if replicated is None else bool(replicated), detail))
        if row.get("note") and not _is_missing(row.get("note")):
            details.append(_clean_text(str(row["note"])))
        rows.append(GalleryRow(str(row.get("prompt", "")), " \u00b7 ".join(details), cells))
    return rows

