"""Statistics across training seeds: paired intervals, KID, bootstrap, exposure bias per sampling step.

Two training arms run with the same seeds (same init, data order and noise draws where the methods
allow) are compared by the per-seed differences: a t interval and an exact sign-flip test over the
seeds, so that the spread between training runs, not only the sampling noise of one run, decides
whether an effect is real.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from models.denoisers import EpsDenoiser
from models.generate import generate
from models.noise import NoiseSource


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean with a 95% Student-t interval over ``values`` (one per training seed)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    m = float(v.mean())
    if n < 2:
        return {"mean": m, "ci95": [m, m], "n": n}
    half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "ci95": [m - half, m + half], "n": n}


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided paired permutation p-value (every sign flip of the differences; n <= 16)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) > 16:
        raise ValueError("exact sign-flip test enumerates 2^n flips: n <= 16")
    observed = abs(d.sum())
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float((np.abs(flips @ d) >= observed - 1e-12).mean())


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """A vs B over the same training seeds: mean difference A - B, its 95% t interval, the relative
    difference (A - B) / mean(B), a paired t-test p and the exact sign-flip p."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired comparison needs two equal-length lists of >= 2 seeds")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    diff = mean_ci(d.tolist())
    base = float(np.mean(b))
    t_p = float(stats.ttest_rel(a, b).pvalue) if d.std() > 0 else (1.0 if d.mean() == 0 else 0.0)
    return {
        "a": mean_ci(list(a)),
        "b": mean_ci(list(b)),
        "difference": diff["mean"],
        "difference_ci95": diff["ci95"],
        "relative": diff["mean"] / base if base else float("nan"),
        "relative_ci95": [x / base for x in diff["ci95"]] if base else [float("nan")] * 2,
        "t_test_p": t_p,
        "sign_flip_p": sign_flip_p(d.tolist()),
        "seeds": len(d),
        "ci_excludes_0": bool(diff["ci95"][0] > 0 or diff["ci95"][1] < 0),
    }


def kid(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased KID: MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3 (Binkowski et al. 2018)."""
    return kid_bootstrap(real, fake, rounds=0)[0]


def kid_bootstrap(
    real: np.ndarray, fake: np.ndarray, rounds: int = 100, seed: int = 0
) -> tuple[float, list[float]]:
    """Unbiased KID and its 95% percentile interval with the generated samples resampled (real fixed).

    The kernels are computed once; a resample is a vector of counts c, under which the fake-fake
    term is (c'K c - sum c_i K_ii) / (n (n - 1)) and the cross term c'K_xy / (m n): the same numbers
    as ``bootstrap_ci(real, fake, kid)`` with the same draws, at O(n^2) a round instead of O(n^2 D).
    ``rounds = 0``: no interval (the point value twice).
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    cross, diag = kxy.sum(axis=0), np.diagonal(kyy)

    def value(c: np.ndarray) -> float:
        return float(xx + (c @ kyy @ c - c @ diag) / (n * (n - 1)) - 2 * (cross @ c) / (m * n))

    point = value(np.ones(n))
    if rounds == 0:
        return point, [point, point]
    g = np.random.default_rng(seed)
    values = [value(np.bincount(g.integers(0, n, n), minlength=n).astype(np.float64)) for _ in range(rounds)]
    return point, [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def bootstrap_ci(
    real: np.ndarray,
    fake: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    rounds: int = 100,
    seed: int = 0,
) -> list[float]:
    """95% percentile interval of ``metric`` with the generated samples resampled (the real set fixed)."""
    g = np.random.default_rng(seed)
    values = [metric(real, fake[g.integers(0, len(fake), len(fake))]) for _ in range(rounds)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


class _Recording(EpsDenoiser):
    """An eps-denoiser that records, at each network evaluation, the input and output norms."""

    def __init__(self, inner: EpsDenoiser) -> None:
        super().__init__(inner.net, inner.schedule, inner.labels)
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, timestep)
        self.steps.append((timestep, x.flatten(1).pow(2).mean(1), out.flatten(1).pow(2).mean(1)))
        return out


@torch.no_grad()
def exposure_bias(
    denoiser: EpsDenoiser, data: torch.Tensor, steps: int, n: int, seed: int = 0
) -> list[dict[str, float]]:
    """Per DDIM step: how far the sampled x_t is from the forward process x_t = a x0 + s eps.

    - ``variance_ratio``: mean ||x_t||^2 of sampled points / mean ||x_t||^2 of forward points;
    - ``eps_norm_gap``: RMS of eps_theta on sampled points minus RMS on forward points (the model's
      own prediction reveals the mismatch: on forward points its RMS is ~1);
    both per coordinate, at the times the sampler evaluates the network (x0 from ``data``). 1 and 0
    mean no exposure bias.
    """
    rec = _Recording(denoiser)
    shape, device = tuple(data.shape[1:]), data.device  # the network's device (CPU draws, moved there)
    noise_source = NoiseSource(range(seed, seed + n), shape, device)
    generate(rec, noise_source, sampler="ddim", steps=steps, clip_x0=True)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = data[torch.randint(0, len(data), (n,), generator=g).to(device)]
    rows = []
    for timestep, x_norm, eps_norm in rec.steps:
        t = (timestep.cpu().to(torch.float64) + 1.0) / denoiser.schedule.T  # net_time inverted
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t = denoiser.schedule.diffuse(x0, t, noise)
        fwd_eps = denoiser.forward(x_t, timestep)
        tt = float(t[0])
        fx, fe = x_t.flatten(1).pow(2).mean(1), fwd_eps.flatten(1).pow(2).mean(1)
        rows.append(
            {
                "t": tt,
                "variance_ratio": float(x_norm.mean() / fx.mean()),
                "eps_norm_gap": float(eps_norm.mean().sqrt() - fe.mean().sqrt()),
            }
        )
    return rows
