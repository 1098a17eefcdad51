from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import linalg

from models.evaluation import quality
from models.evaluation.quality import (
    KNNManifold,
    density_coverage,
    fd_of_features,
    feature_stats,
    frechet_distance,
    precision_recall,
)


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


def _direct_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Naeem et al.'s formulas written out with numpy, as an oracle."""
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radii = np.sort(d_rr, axis=1)[:, k]
    inside = np.linalg.norm(fake[:, None] - real[None], axis=-1) <= radii[None]
    return float(inside.sum() / (k * len(fake))), float(inside.any(axis=0).mean())


def test_density_coverage_match_a_direct_computation() -> None:
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(300, 5)), rng.normal(size=(200, 5)) * 1.3 + 0.2
    density, coverage = density_coverage(real, fake, k=5)
    assert (density, coverage) == pytest.approx(_direct_density_coverage(real, fake, 5), rel=1e-12)
    assert 0.0 < coverage < 1.0 and density > 0.0


def test_density_coverage_exact_cases() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(size=(200, 4))
    k = 3
    # each point lies in its own ball and in the balls of the points it is a k-NN of: (k+1) N in all
    assert density_coverage(a, a, k=k) == pytest.approx(((k + 1) / k, 1.0))
    assert density_coverage(a, a + 100.0, k=k) == (0.0, 0.0)


def test_coverage_sees_mode_dropping() -> None:
    rng = np.random.default_rng(5)
    real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 20])
    _, coverage = density_coverage(real, rng.normal(size=(300, 2)), k=3)
    assert 0.3 < coverage < 0.55


def test_one_real_outlier_moves_precision_fully_but_density_by_1_over_k_and_coverage_by_1_over_n() -> None:
    """Fakes off the data, reached only by one outlying real point's huge k-NN ball (Naeem et al.'s case)."""
    rng = np.random.default_rng(8)
    real = rng.normal(size=(500, 8))
    fake = rng.normal(size=(500, 8)) * 0.2 + 4.0  # a collapsed blob away from the data
    outlier = (
        rng.normal(size=(1, 8)) * 0.5 + 6.0
    )  # its 3rd neighbour is in the bulk: the ball swallows the blob
    k = 3
    assert precision_recall(real, fake, k=k)[0] == 0.0
    assert density_coverage(real, fake, k=k) == (0.0, 0.0)
    with_outlier = np.concatenate([real, outlier])
    assert precision_recall(with_outlier, fake, k=k)[0] == 1.0
    density, coverage = density_coverage(with_outlier, fake, k=k)
    assert density == pytest.approx(1 / k)
    assert coverage == pytest.approx(1 / len(with_outlier))


def test_a_subset_manifold_keeps_the_radii_of_the_full_one() -> None:
    rng = np.random.default_rng(9)
    real = rng.normal(size=(100, 3))
    full = KNNManifold(real, 3)
    keep = torch.arange(100) % 2 == 0
    part = full.subset(keep)
    assert torch.equal(part.radii, full.radii[keep]) and torch.equal(part.features, full.features[keep])
    queries = rng.normal(size=(50, 3))
    # a query covered by the subset is covered by the full manifold, not necessarily the other way
    assert bool((part.covers(queries) <= full.covers(queries)).all())


def test_the_fd_plot_names_the_feature_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles: list[str] = []

    def capture(path: Path, draw: Callable[[Any], None]) -> Path:
        fig, ax = plt.subplots()
        draw(ax)
        titles.append(ax.get_title())
        plt.close(fig)
        return path

    monkeypatch.setattr(quality, "save_plot", capture)
    features = "robust-cls (penultimate layer of robust-cls.safetensors, hash 0123456789ab)"
    report = {
        "model": {"name": "m"},
        "feature_network": features,
        "reference": {"fd": 1.0},
        "results": [{"sampler": "ddim", "nfe": 1, "fd": 2.0}],
    }
    quality._plot(report, tmp_path / "fd.png")
    assert titles == [f"m: FD in the feature space of\n{features}"]
