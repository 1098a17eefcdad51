import math

import pytest
import torch

from models.sampling_spec import STRENGTHS
from models.schedules import (
    STRENGTH_SCHEDULE,
    Schedule,
    ScheduleConfig,
    nearest_grid_time,
    strength_sigmas,
    strength_times,
    time_grid,
)


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


# ---- named strengths: a noise level, the t* of each model's own grid ---------------------------------
def _nearest_k(sigmas: list[float], target: float) -> int:
    """k (1-based) of the grid sigma nearest to target as a ratio, by a plain scan."""
    return min(range(1, len(sigmas) + 1), key=lambda k: abs(math.log(sigmas[k - 1] / target)))


def test_strength_sigmas_are_ddpm_linear_noise_levels() -> None:
    """sigma = sqrt((1 - abar) / abar) of the product of DDPM's linear betas, at k = 50, 100, 200."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar = [math.prod(1 - b for b in betas[:k]) for k in (50, 100, 200)]
    want = [math.sqrt((1 - ab) / ab) for ab in abar]
    levels = strength_sigmas()
    assert list(levels) == ["light", "medium", "strong"]
    assert list(levels.values()) == pytest.approx(want, rel=1e-12)
    assert [round(v, 3) for v in levels.values()] == [0.173, 0.339, 0.719]


def test_strengths_on_ddpm_linear_are_exactly_the_old_t_star() -> None:
    """The committed Fashion-MNIST models' schedule: served t* (and published results) unchanged."""
    assert strength_times(Schedule(ScheduleConfig())) == {"light": 0.05, "medium": 0.1, "strong": 0.2}
    assert strength_times(Schedule(STRENGTH_SCHEDULE)) == STRENGTHS


def test_strengths_on_a_cosine_schedule_are_the_nearest_noise_level() -> None:
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    sigmas = [math.sqrt(f(0) / f(k / 1000) - 1) for k in range(1, 1001)]  # closed form, unclipped here
    got = strength_times(Schedule(ScheduleConfig(name="cosine")))
    want = {n: _nearest_k(sigmas[:400], s) / 1000 for n, s in strength_sigmas().items()}
    assert got == want
    assert got == {"light": 0.102, "medium": 0.202, "strong": 0.392}  # not DDPM's 0.05 / 0.1 / 0.2


def test_strengths_on_an_edm_consistency_model_are_on_its_karras_grid() -> None:
    """OpenAI's CM table (T = 40 Karras sigmas in [0.002, 80], rho 7): medium lands on the sigma nearest
    0.339, within one grid spacing of it, not on t* 0.1 (sigma 0.011)."""
    schedule = Schedule(ScheduleConfig(name="edm", timesteps=40))
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    karras = [(lo + (k - 1) / 39 * (hi - lo)) ** 7 for k in range(1, 41)]  # docs/IMPORTING.md's formula
    got = strength_times(schedule)
    for name, level in strength_sigmas().items():
        k = round(got[name] * 40)
        assert got[name] == k / 40 and k == _nearest_k(karras, level)
        assert karras[k - 2] < level < karras[k]  # within the grid spacing around the chosen level
    assert karras[round(got["medium"] * 40) - 1] == pytest.approx(0.349, abs=5e-4)
    assert got == {"light": 0.275, "medium": 0.325, "strong": 0.4}


def test_nearest_grid_time_stays_on_the_grid() -> None:
    schedule = Schedule(ScheduleConfig(name="edm", timesteps=40))
    assert nearest_grid_time(schedule, 1e-6) == 1 / 40  # t* >= 1/T however small the level
    assert nearest_grid_time(schedule, 1e6) == 1.0
    with pytest.raises(ValueError, match="sigma"):
        nearest_grid_time(schedule, 0.0)
