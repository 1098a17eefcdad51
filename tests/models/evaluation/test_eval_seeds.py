"""Across-seed statistics and the exposure-bias metric, on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.evaluation.seeds import (
    bootstrap_ci,
    exposure_bias,
    kid,
    kid_bootstrap,
    mean_ci,
    paired,
    sign_flip_p,
)
from models.testing import gaussian_denoiser


def test_mean_ci_and_paired_match_textbook_values() -> None:
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t_{0.975, 2} = 4.3027
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(
        [2 - 4.3027 / 3**0.5, 2 + 4.3027 / 3**0.5], abs=1e-3
    )
    r = paired([2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.5, 3.0, 4.5, 5.0])
    assert r["difference"] == pytest.approx(0.8) and r["ci_excludes_0"]
    assert r["sign_flip_p"] == pytest.approx(2 / 32)  # all five differences positive
    assert r["relative"] == pytest.approx(0.8 / 3.2)
    assert sign_flip_p([1.0, -1.0]) == 1.0


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two() -> None:
    g = np.random.default_rng(0)
    nulls = [kid(g.normal(size=(60, 8)), g.normal(size=(60, 8))) for _ in range(200)]
    assert abs(np.mean(nulls)) < 3 * np.std(nulls) / np.sqrt(200)  # unbiased: E = 0 (often negative)
    assert min(nulls) < 0
    a, b = g.normal(size=(400, 8)), g.normal(size=(400, 8))
    shifted = kid(a, b + 0.5)
    assert shifted > 0.5
    lo, hi = bootstrap_ci(a, b + 0.5, kid, rounds=20)
    assert lo < shifted < hi


def test_kid_bootstrap_reweights_the_kernels_exactly_as_resampling_would() -> None:
    g = np.random.default_rng(1)
    real, fake = g.normal(size=(50, 6)), g.normal(size=(40, 6)) + 0.3
    point, ci = kid_bootstrap(real, fake, rounds=25, seed=7)
    assert point == pytest.approx(kid(real, fake), rel=1e-12)
    assert ci == pytest.approx(bootstrap_ci(real, fake, kid, rounds=25, seed=7), rel=1e-9)
    same = g.normal(size=(300, 6))
    value, _ = kid_bootstrap(same, same.copy(), rounds=0)
    # Identical sets: the unbiased estimate drops the real-real and fake-fake diagonals but keeps the
    # cross term's, so it sits just below 0: -2 (mean diagonal - mean off-diagonal) / n ~ -14 / n.
    assert -20 / 300 < value < 0


def test_exposure_bias_of_the_exact_gaussian_denoiser_is_small() -> None:
    """The exact denoiser of N(mu, v I) with many DDIM steps samples the right marginals (ratio ~1 at
    every step); with few steps DDIM's own discretisation shrinks the variance near t = 0."""
    den = gaussian_denoiser(mu=0.1, v=0.09)
    data = 0.1 + 0.3 * torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    rows = exposure_bias(den, data, steps=200, n=4000)
    assert len(rows) == 200 and rows[0]["t"] > rows[-1]["t"]
    assert all(abs(r["variance_ratio"] - 1) < 0.08 for r in rows)
    assert all(abs(r["eps_norm_gap"]) < 0.03 for r in rows)
    coarse = exposure_bias(den, data, steps=5, n=4000)
    assert coarse[-1]["variance_ratio"] < 0.9
