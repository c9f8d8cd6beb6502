"""FID/KID/coverage numbers: correct against an independent formula, and they move the right way."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.core.layout import Layout
from pipeline.data import loader
from pipeline.data.pixels import to_signed
from pipeline.data.reader import shard_urls
from pipeline.metrics import distances as metrics
from pipeline.metrics import features

torch.set_num_threads(1)  # 2 shared cores: one thread each avoids oversubscription stalls


def gaussian_features(count: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0,
                      sample_seed: int | None = None) -> torch.Tensor:
    """Correlated Gaussian features: the distribution is fixed by `seed`, the draw by
    `sample_seed` (default: `seed`)."""
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) / dim**0.5
    draws = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    return (torch.randn(count, dim, generator=draws) @ mixing) * scale + shift


def reference_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (independent of torchmetrics)."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = gaussian_features(400, 16, seed=0)
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-6


def test_frechet_distance_matches_scipy_sqrtm_reference():
    real = gaussian_features(500, 24, seed=1)
    fake = gaussian_features(300, 24, seed=2, shift=0.3, scale=1.5)
    ours = metrics.frechet_distance(real, fake)
    reference = reference_fid(real.double().numpy(), fake.double().numpy())
    assert reference > 1.0  # a real difference, not two zeros agreeing
    assert ours == pytest.approx(reference, rel=1e-4)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    real = gaussian_features(300, 16, seed=3)
    twin = gaussian_features(300, 16, seed=3, sample_seed=4)  # same distribution, new draw
    other = gaussian_features(300, 16, seed=3, sample_seed=5, shift=0.5)
    mean_twin, _ = metrics.kernel_distance(real, twin, subset_size=100, seed=0)
    mean_other, _ = metrics.kernel_distance(real, other, subset_size=100, seed=0)
    assert mean_other > 0
    assert abs(mean_twin) < 0.1 * mean_other
    # seeded: the same subsets every time
    assert metrics.kernel_distance(real, other, 100, seed=5) == metrics.kernel_distance(
        real, other, 100, seed=5
    )


def test_class_coverage_flags_one_class_and_passes_all_classes():
    one_class = torch.full((500,), 7)
    collapsed = metrics.class_coverage(one_class, num_classes=10, min_coverage=0.8)
    assert collapsed["classes_hit"] == 1
    assert collapsed["class_entropy"] == pytest.approx(0.0)
    assert collapsed["mode_collapse"] is True

    spread = metrics.class_coverage(torch.arange(500) % 10, num_classes=10, min_coverage=0.8)
    assert spread["classes_hit"] == 10
    assert spread["class_entropy"] == pytest.approx(1.0)
    assert spread["mode_collapse"] is False
    # one stray sample of each other class does not count as covering it
    stray = metrics.class_coverage(torch.cat([torch.full((491,), 1), torch.arange(9)]), 10, 0.8)
    assert stray["classes_hit"] == 1 and stray["mode_collapse"] is True


def test_classifier_score_rewards_confident_diverse_predictions():
    confident_diverse = torch.eye(10).repeat(50, 1) * 20
    confident_single = torch.zeros(500, 10)
    confident_single[:, 3] = 20
    assert metrics.classifier_score(confident_diverse) == pytest.approx(10.0, rel=1e-3)
    assert metrics.classifier_score(confident_single) == pytest.approx(1.0, rel=1e-3)


# --- with the trained domain classifier on real MNIST -------------------------------------------


@pytest.fixture(scope="module")
def classifier_and_reals(featurized_repo):
    torch.set_num_threads(1)
    model, _ = features.load_classifier(Layout(featurized_repo))
    shards = str(featurized_repo / "data" / "shards")
    train = next(loader.iter_split(shard_urls("train", shards), batch_size=500))[0]
    val, labels = next(loader.iter_split(shard_urls("val", shards), batch_size=500,
                                         with_labels=True))
    return model, to_signed(train), to_signed(val), labels


def test_fid_rises_monotonically_with_gaussian_noise(classifier_and_reals):
    model, train, val, _ = classifier_and_reals
    cpu = torch.device("cpu")
    train_features, _ = features.extract(model, [train], cpu, "train")
    fids = []
    for sigma in (0.0, 0.1, 0.2, 0.4, 0.8):
        noisy = (val + sigma * torch.randn(val.shape, generator=torch.Generator().manual_seed(0)))
        noisy_features, _ = features.extract(model, [noisy.clamp(-1, 1)], cpu, "noisy")
        fids.append(metrics.frechet_distance(train_features, noisy_features))
    assert all(a < b for a, b in itertools.pairwise(fids)), fids
    assert fids[-1] > 10 * fids[0]


def test_coverage_of_the_classifier_flags_one_digit_only(classifier_and_reals):
    model, _, val, labels = classifier_and_reals
    only_ones = val[labels == 1]
    one_class_output = only_ones[torch.arange(500) % len(only_ones)]  # a collapsed "generator"
    collapsed = metrics.class_coverage(model.logits(one_class_output).argmax(1), 10, 0.8)
    diverse = metrics.class_coverage(model.logits(val).argmax(1), 10, 0.8)
    # (a few misread "1"s, repeated, may show up as other classes: the alarm still rings)
    assert collapsed["mode_collapse"] is True and collapsed["class_coverage"] < 0.5
    assert collapsed["class_entropy"] < 0.3
    assert diverse["mode_collapse"] is False and diverse["classes_hit"] == 10
    assert diverse["class_entropy"] > 0.95
