"""Variance-preserving noise schedules on a continuous time axis t in [0, 1].

A schedule is a table of alphabar_k for the DDPM steps k = 1..T; t = k / T sits on that table and
fractional t interpolates log(alphabar) linearly (alphabar(0) = 1), so discrete DDPM training and
continuous-time solvers (DPM-Solver++, consistency models) read the same curve.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import UserError
from models.sampling_spec import DIFFUSERS_SPACINGS, STRENGTHS, diffusers_timesteps

ScheduleName = Literal["linear", "cosine", "scaled-linear", "edm"]


class ScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ScheduleName = "linear"
    timesteps: int = Field(1000, ge=2, description="T, the number of discrete DDPM steps")
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0, description="linear schedule: beta_1")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="linear schedule: beta_T")
    cosine_s: float = Field(0.008, ge=0.0, description="cosine schedule: offset s")
    max_beta: float = Field(0.999, gt=0.0, le=1.0, description="cosine schedule: beta clipping")
    sigma_min: float = Field(0.002, gt=0.0, description="edm: sigma of step 1 (the smallest noise level)")
    sigma_max: float = Field(80.0, gt=0.0, description="edm: sigma of step T (where sampling starts)")
    rho: float = Field(7.0, gt=0.0, description="edm: Karras et al.'s spacing exponent of the T sigmas")

    @model_validator(mode="after")
    def _order(self) -> ScheduleConfig:
        if self.name == "linear" and self.beta_end < self.beta_start:
            raise ValueError("beta_end must be >= beta_start")
        return self


class Schedule:
    """alphabar, a = sqrt(alphabar), s = sqrt(1 - alphabar) and log-SNR as functions of t (float64 tables)."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        T = self.config.timesteps
        c = self.config
        if c.name == "linear":
            betas = torch.linspace(c.beta_start, c.beta_end, T, dtype=torch.float64)
        elif c.name == "scaled-linear":
            betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, T, dtype=torch.float64) ** 2
        elif c.name == "edm":
            # Step k = 1..T sits at the k-th of T Karras sigmas (sigma_min .. sigma_max); alphabar = 1 / (1 + sigma^2),
            # so VP x = a x_ve and every sampler reads the variance-exploding model in its own coordinates.
            ramp = torch.linspace(0.0, 1.0, T, dtype=torch.float64)
            lo, hi = c.sigma_min ** (1.0 / c.rho), c.sigma_max ** (1.0 / c.rho)
            sig = (lo + ramp * (hi - lo)) ** c.rho
            sig[0], sig[-1] = c.sigma_min, c.sigma_max
            la = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.log1p(sig**2)])
            betas = -torch.expm1(la[1:] - la[:-1])
        else:
            s = self.config.cosine_s
            k = torch.arange(T + 1, dtype=torch.float64)
            f = torch.cos((k / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=self.config.max_beta)
        self.T = T
        self.betas = betas
        # log_alphabar[k] for k = 0..T, log_alphabar[0] = 0.
        self.log_alphabar = torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)]
        )

    def alphabar(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        pos = (t.clamp(0.0, 1.0) * self.T).reshape(-1)
        lo = pos.floor().long().clamp(max=self.T - 1)
        frac = pos - lo
        la = self.log_alphabar[lo] * (1 - frac) + self.log_alphabar[lo + 1] * frac
        return torch.exp(la).reshape(t.shape)

    def a(self, t: torch.Tensor | float) -> torch.Tensor:
        return self.alphabar(t).sqrt()

    def s(self, t: torch.Tensor | float) -> torch.Tensor:
        return (1 - self.alphabar(t)).clamp(min=0).sqrt()

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """lambda(t) = log(a_t / s_t); +inf at t = 0."""
        ab = self.alphabar(t)
        return 0.5 * (torch.log(ab) - torch.log1p(-ab))

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """The variance-exploding noise level s_t / a_t (EDM's time) of VP time t."""
        return torch.exp(-self.log_snr(t))

    def t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of log_snr, exact: log_alphabar is linear in t between table points, so one search
        in the table and one division invert it (a grid costs microseconds, not a bisection)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        la = torch.nn.functional.logsigmoid(2 * lam.reshape(-1))  # log alphabar = log sigmoid(2 lambda)
        table = self.log_alphabar
        lo = (torch.searchsorted(-table, -la) - 1).clamp(0, self.T - 1)
        frac = ((la - table[lo]) / (table[lo + 1] - table[lo])).clamp(0.0, 1.0)
        return ((lo + frac) / self.T).reshape(lam.shape)

    def t_from_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.t_from_log_snr(-torch.log(torch.as_tensor(sigma, dtype=torch.float64)))

    def grid_sigmas(self) -> torch.Tensor:
        """sigma at the T grid times t = k / T, k = 1..T (float64, increasing), straight from the table."""
        return torch.sqrt(torch.expm1(-self.log_alphabar[1:]))

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network is conditioned on: the DDPM timestep index (t = k / T -> k - 1),
        or for ``edm`` 250 ln(sigma) (OpenAI's consistency models, diffusers' ``sigma_to_t``)."""
        if self.config.name == "edm":
            return (250.0 * torch.log(self.sigma(t) + 1e-44)).to(torch.float32)
        return t.to(torch.float32) * self.T - 1.0

    def sigma_from_net_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """sigma from an ``edm`` network time (the inverse of ``net_time``), for input scaling."""
        return torch.exp(timestep.double() / 250.0)

    def initial_std(self, t: float) -> float:
        """The std of the starting noise at time t: 1 for VP schedules (DDPM's and diffusers' x_T ~ N(0, I)),
        s_t for ``edm`` (x_ve ~ N(0, sigma_max^2), exactly what the model was trained to see)."""
        return float(self.s(t)) if self.config.name == "edm" else 1.0

    def diffuse(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x_0 + s_t eps, with per-row t."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = self.a(t).to(x0.dtype).reshape(shape).to(x0.device)
        s = self.s(t).to(x0.dtype).reshape(shape).to(x0.device)
        return a * x0 + s * eps

    def sample_train_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times: uniform over the discrete steps k = 1..T, as t = k / T."""
        k = torch.randint(1, self.T + 1, (n,), generator=generator)
        return k.to(torch.float64) / self.T


STRENGTH_SCHEDULE = ScheduleConfig(name="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02)
"""DDPM's linear schedule: its noise level at each named strength's t* (``sampling_spec.STRENGTHS``)
defines that strength on every model."""


def strength_sigmas() -> dict[str, float]:
    """The noise level (sigma, data units) of each named strength: 0.173 / 0.339 / 0.719."""
    ref = Schedule(STRENGTH_SCHEDULE)
    grid = ref.grid_sigmas()
    return {name: float(grid[round(t * ref.T) - 1]) for name, t in STRENGTHS.items()}


def nearest_grid_time(schedule: Schedule, sigma: float) -> float:
    """The time k / T (k = 1..T, so at least 1/T) of the schedule's grid whose sigma is nearest to
    ``sigma``, nearest as a ratio (in log sigma: the same choice in any unit, and noise levels
    multiply); a tie takes the smaller noise."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    k = int(torch.argmin((schedule.grid_sigmas().log() - math.log(sigma)).abs())) + 1
    return k / schedule.T


def strength_times(schedule: Schedule) -> dict[str, float]:
    """Each named strength's t* on this schedule's grid: the same noise level on every model (a worker
    registers these; on DDPM's linear T = 1000 schedule they are exactly 0.05 / 0.1 / 0.2)."""
    return {name: nearest_grid_time(schedule, sigma) for name, sigma in strength_sigmas().items()}


Spacing = Literal["uniform", "log-snr", "linear", "leading", "trailing", "linspace"]


def time_grid(
    schedule: Schedule, steps: int, spacing: Spacing = "uniform", t_max: float = 1.0
) -> torch.Tensor:
    """A decreasing grid of ``steps + 1`` times from t_max to 0 (the last step lands on clean data).

    ``uniform`` spaces the DDPM steps evenly (DDIM's choice); ``log-snr`` spaces them evenly in
    log-SNR between t_max and 1/T (DPM-Solver's choice); ``linear`` spaces t itself evenly down to 0
    (multistep consistency sampling, where every step starts from a fresh re-noising); ``leading``,
    ``trailing`` and ``linspace`` are diffusers' grids (``DIFFUSERS_SPACINGS``).
    """
    if steps < 1:
        raise UserError("steps", "must be >= 1")
    t_min = 1.0 / schedule.T
    if t_max < t_min or t_max > 1.0:
        raise UserError("t_max", f"must be in [{t_min}, 1]")
    if spacing in DIFFUSERS_SPACINGS:
        if t_max != 1.0:
            raise UserError(
                "spacing", f"{spacing!r} is diffusers' grid for sampling from noise, not for purification"
            )
        idx = np.asarray(diffusers_timesteps(schedule.T, steps, spacing), dtype=np.float64)
        ts = torch.from_numpy(idx + 1) / schedule.T
        return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    if spacing == "linear":
        return torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    if spacing == "uniform":
        k_max = round(t_max * schedule.T)
        if steps > k_max:
            raise UserError("steps", f"at most {k_max} steps fit below t={t_max} (one per DDPM step)")
        ks = (
            torch.linspace(k_max, 1, steps, dtype=torch.float64).round()
            if steps > 1
            else torch.tensor([float(k_max)], dtype=torch.float64)
        )
        ts = ks / schedule.T
        ts[0] = t_max
    else:
        lam = torch.linspace(
            float(schedule.log_snr(t_max)), float(schedule.log_snr(t_min)), steps, dtype=torch.float64
        )
        ts = schedule.t_from_log_snr(lam)
        ts[-1] = t_min
        ts[0] = t_max
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
