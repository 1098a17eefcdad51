import math

import pytest
import torch

from models.schedules import Schedule, ScheduleConfig, time_grid


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_identities(name: str) -> None:
    sch = Schedule(ScheduleConfig(name=name))
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a, s = sch.a(t), sch.s(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t), atol=1e-12)
    assert float(sch.alphabar(0.0)) == 1.0
    assert bool((sch.alphabar(t)[1:] < sch.alphabar(t)[:-1]).all())  # strictly decreasing
    assert torch.allclose(sch.sigma(t[1:]), s[1:] / a[1:])


def test_discrete_points_are_the_ddpm_products() -> None:
    sch = Schedule()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    k = torch.tensor([1, 2, 10, 500, 1000])
    assert torch.allclose(sch.alphabar(k.double() / 1000), ab[k - 1], rtol=1e-12)
    assert torch.equal(sch.net_time(k.double() / 1000), (k - 1).float())


def test_cosine_matches_closed_form_away_from_clipping() -> None:
    sch = Schedule(ScheduleConfig(name="cosine"))
    s = 0.008
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0.1, 0.5, 0.9):
        assert float(sch.alphabar(t)) == pytest.approx(f(t) / f(0), rel=1e-9)


def test_log_snr_inverse() -> None:
    sch = Schedule()
    t = torch.tensor([0.003, 0.1, 0.5, 0.97], dtype=torch.float64)
    assert torch.allclose(sch.t_from_log_snr(sch.log_snr(t)), t, atol=1e-9)
    assert torch.allclose(sch.t_from_sigma(sch.sigma(t)), t, atol=1e-9)


@pytest.mark.parametrize("spacing", ["uniform", "log-snr", "linear"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_time_grid(spacing: str, steps: int) -> None:
    ts = time_grid(Schedule(), steps, spacing)  # type: ignore[arg-type]
    assert len(ts) == steps + 1
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert bool((ts[1:] < ts[:-1]).all())


def test_time_grid_refuses_more_steps_than_ddpm_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        time_grid(Schedule(), 200, "uniform", t_max=0.1)
    with pytest.raises(ValueError):
        time_grid(Schedule(), 0)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError):
        ScheduleConfig(name="sigmoid")  # type: ignore[arg-type]


def test_diffuse_is_the_forward_process() -> None:
    sch = Schedule()
    x0 = torch.ones(2, 1, 2, 2)
    eps = torch.full_like(x0, 2.0)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    out = sch.diffuse(x0, t, eps)
    for i in range(2):
        assert torch.allclose(out[i], sch.a(t[i]).float() * 1.0 + sch.s(t[i]).float() * 2.0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_log_snr_inverse_is_exact_on_the_table(name: str) -> None:
    """The closed-form inverse agrees with a 60-step bisection of log_snr to float64 rounding."""
    sch = Schedule(ScheduleConfig(name=name))
    lam = torch.linspace(float(sch.log_snr(1.0)), float(sch.log_snr(1 / sch.T)), 2001, dtype=torch.float64)
    lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = sch.log_snr(mid) > lam
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    t = sch.t_from_log_snr(lam)
    assert torch.allclose(t, (lo + hi) / 2, rtol=0, atol=1e-14)
    assert torch.allclose(sch.log_snr(t), lam, rtol=1e-12, atol=1e-12)
    edges = sch.t_from_log_snr(torch.tensor([math.inf, -100.0], dtype=torch.float64))
    assert edges.tolist() == [0.0, 1.0]  # clean data and beyond the last step clamp to the ends
