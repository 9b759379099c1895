"""FID equals the closed-form Fréchet distance (scipy reference); KID is unbiased (~0 on equal distributions)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from scaletrain.images.quality import fid, frechet_distance, gaussian_stats, kid


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(root)))


@pytest.mark.parametrize("d", [1, 4, 32])
def test_frechet_distance_matches_scipy_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8, abs=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_1d_is_mean_and_std_gap():
    # W2^2 between N(m1, a^2) and N(m2, b^2) = (m1 - m2)^2 + (a - b)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(
        9.0 + 1.0
    )


def test_fid_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    a = rng.multivariate_normal(mu1, s1, size=200_000)
    b = rng.multivariate_normal(mu2, s2, size=200_000)
    assert fid(a, b) == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=0.02)
    mu, cov = gaussian_stats(a)
    assert np.allclose(mu, mu1, atol=0.02) and np.allclose(cov, s1, atol=0.03)


@pytest.mark.parametrize("n_a,n_b", [(5, 5), (7, 12)])
def test_fid_with_fewer_samples_than_dimensions_equals_the_covariance_route(n_a, n_b):
    # fid() takes an n_a x n_b SVD when the sets are smaller than the feature dimension.
    rng = np.random.default_rng(n_a)
    a, b = rng.normal(size=(n_a, 40)), rng.normal(loc=0.2, size=(n_b, 40)) * 1.5
    full = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    # 1e-7: the d x d route takes square roots of the ~1e-14 round-off eigenvalues that a
    # rank-deficient matrix has instead of zeros (measured difference ~2e-8 relative).
    assert fid(a, b) == pytest.approx(full, rel=1e-7)
    assert abs(fid(a, a)) < 1e-12 * np.square(a).sum()


def test_kid_is_unbiased_on_equal_distributions_and_positive_on_different_ones():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=500)
    assert abs(same_mean) < 3 * same_std / np.sqrt(20) + 1e-3
    shifted_mean, _ = kid(a, b + 0.3, subsets=20, subset_size=500)
    assert shifted_mean > 20 * max(abs(same_mean), 1e-4)
    # Identical sets: the unbiased estimator is not forced to 0, but it is close to it.
    assert abs(kid(a, a, subsets=5, subset_size=500)[0]) < 0.01


def test_shipped_shapes_classifier_labels_held_out_shapes():
    """The feature extractor FID/KID-shapes use; also the judge of the learning test."""
    import torch

    from scaletrain.images.datasets import ShapesDataset
    from scaletrain.images.quality import ASSETS, extract, shapes_classifier

    assert (ASSETS / "shapes_classifier_32px_6c.pt").is_file()
    model = shapes_classifier(32, 6)
    data = ShapesDataset(300, 32, 6, seed=123)  # a seed neither the classifier nor training uses
    images = torch.stack([data[i]["image"] for i in range(300)])
    labels = np.array([int(data[i]["label"]) for i in range(300)])
    features, predicted = extract(model, images)
    assert features.shape == (300, 128)
    assert (predicted == labels).mean() >= 0.97
    # Real vs real (disjoint draws) is close; real vs noise is far.
    other = torch.stack([ShapesDataset(300, 32, 6, seed=7)[i]["image"] for i in range(300)])
    noise = torch.rand(300, 3, 32, 32) * 2 - 1
    same = fid(features, extract(model, other)[0])
    far = fid(features, extract(model, noise)[0])
    assert far > 10 * same


def test_eval_metrics_separate_real_shapes_from_noise():
    """The numbers `evaluate` logs: real shapes score near-perfect accuracy and a small FID, noise does not."""
    import torch

    from scaletrain.config import load_config
    from scaletrain.images.datasets import ShapesDataset
    from scaletrain.images.quality import sample_metrics

    cfg = load_config(None, {"recipe": "dit", "model": {"num_classes": 6}})
    data = ShapesDataset(60, 32, 6, seed=42)
    real = torch.stack([data[i]["image"] for i in range(60)])
    labels = torch.arange(60) % 6
    good = sample_metrics(cfg, real, labels)
    bad = sample_metrics(cfg, torch.rand(60, 3, 32, 32) * 2 - 1, labels)
    assert set(good) == {"fid_shapes", "kid_shapes", "class_accuracy_shapes", "diversity_shapes"}
    assert good["class_accuracy_shapes"] >= 0.95 and bad["class_accuracy_shapes"] <= 0.5
    assert bad["fid_shapes"] > 10 * good["fid_shapes"] and bad["kid_shapes"] > good["kid_shapes"]
    # Other real shapes vary within a class about as much as the reference set does.
    assert 0.6 < good["diversity_shapes"] < 1.6, good


def test_diversity_sees_mode_collapse_within_a_class():
    """One image per class, repeated (a per-class mode collapse), keeps the class accuracy of real images but
    has near-zero within-class diversity; adding a little noise to it does not fake diversity."""
    import torch

    from scaletrain.config import load_config
    from scaletrain.images.datasets import ShapesDataset
    from scaletrain.images.quality import sample_metrics

    cfg = load_config(None, {"recipe": "dit", "model": {"num_classes": 6}})
    data = ShapesDataset(60, 32, 6, seed=42)
    labels = torch.tensor([int(data[i]["label"]) for i in range(60)])
    first_of_class = {int(c): data[int((labels == c).nonzero()[0])]["image"] for c in labels.unique()}
    collapsed = torch.stack([first_of_class[int(c)] for c in labels])
    noise = torch.randn(collapsed.shape, generator=torch.Generator().manual_seed(0))
    jittered = (collapsed + 0.02 * noise).clamp(-1, 1)
    for images in (collapsed, jittered):
        metrics = sample_metrics(cfg, images, labels)
        assert metrics["class_accuracy_shapes"] >= 0.95, metrics
        assert metrics["diversity_shapes"] < 0.1, metrics
