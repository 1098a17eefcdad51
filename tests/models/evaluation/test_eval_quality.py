from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from models.evaluation.quality import fd_of_features, feature_stats, frechet_distance, precision_recall


def _direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm, as an independent oracle."""
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def test_fd_of_a_set_with_itself_is_zero() -> None:
    a = np.random.default_rng(0).normal(size=(400, 16))
    assert fd_of_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_grows_with_added_noise() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, 8))
    b = rng.normal(size=(2000, 8))
    values = [fd_of_features(a, b + s * rng.normal(size=b.shape)) for s in (0.0, 0.3, 1.0, 3.0)]
    assert values == sorted(values)
    assert values[-1] > 10 * values[0]


def test_fd_matches_scipy_on_random_features() -> None:
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(12, 12))
    a = rng.normal(size=(300, 12)) @ mix + 0.5
    b = rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12))
    assert fd_of_features(a, b) == pytest.approx(_direct_fd(a, b), rel=1e-6)


def test_fd_is_stable_with_singular_covariances() -> None:
    rng = np.random.default_rng(3)
    a = np.concatenate([rng.normal(size=(50, 4)), np.zeros((50, 4))], axis=1)  # rank 4 of 8
    fd = frechet_distance(*feature_stats(a), *feature_stats(a))
    assert np.isfinite(fd) and fd == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_extremes() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(200, 4))
    assert precision_recall(a, a, k=3) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_mode_dropping_lowers_recall_not_precision() -> None:
    rng = np.random.default_rng(5)
    real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 20])
    fake = rng.normal(size=(300, 2))  # only one of the two modes
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert recall < 0.6
