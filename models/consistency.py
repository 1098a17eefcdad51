"""Consistency models: the discretisation, the iCT curriculum, the distance and the CD / CT update.

Everything is indexed by EDM's noise level sigma = s_t / a_t (the variance-exploding time); the
student is the VP-coordinate ``ConsistencyDenoiser`` (so its boundary condition f(x, t_min) = x / a
is built in) and sees x_vp = a * x_ve, exactly what the ``consistency`` sampler feeds it. A teacher
ODE step (CD) or the one-sample estimate x0 + sigma_n z (CT) gives the point x_hat_{t_n} that the
stop-gradient target network maps; the student maps x_{t_{n+1}} and the two are pulled together.

Seed B's adversarial training for CMs (``m`` > 1 replays) perturbs the student's input by delta in an
L2 ball with free minibatch replay: each replay is one full parameter update, and the same backward
pass gives the gradient that moves delta. With ``m = 1`` the update is plain CD / CT, step for
step and bit for bit, because it runs the very same code with no delta.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.checkpoint import ConsistencyConfig
from models.denoisers import ConsistencyDenoiser, EpsDenoiser, Net, Parameterization
from models.schedules import Schedule

Solver = Literal["ddim", "heun"]


class ConsistencyOptions(BaseModel):
    """The knobs of the CD / CT objective itself (shared by all four training methods), validated once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma_min: float = Field(0.002, gt=0.0, description="boundary noise level: f(x, sigma_min) = x")
    sigma_max: float | None = Field(
        None,
        gt=0.0,
        description="largest noise level; None = the schedule's sigma at t = 1, where sampling starts",
    )
    sigma_data: float = Field(0.5, gt=0.0, description="data scale in c_skip / c_out")
    parameterization: Parameterization = Field(
        "edm",
        description="c_skip / c_out: edm (Song et al.), or eps (c_skip 1, c_out -(sigma - sigma_min)), "
        "which makes a copy of an eps-prediction teacher start as its denoiser at every noise level",
    )
    rho: float = Field(7.0, gt=0.0, description="EDM discretisation exponent")
    curriculum: Literal["fixed", "ict"] = Field("fixed", description="fixed N, or iCT's doubling of N")
    n_steps: int = Field(18, ge=2, description="N, the number of noise levels, when curriculum = fixed")
    s0: int = Field(10, ge=1, description="iCT curriculum: initial number of intervals")
    s1: int = Field(1280, ge=1, description="iCT curriculum: final number of intervals")
    curriculum_updates: int | None = Field(
        None,
        ge=1,
        description="iCT curriculum: K, updates over which N doubles up to s1 (None: the run's budget)",
    )
    noise_sampling: Literal["uniform", "lognormal"] = Field(
        "uniform", description="how the interval n is drawn"
    )
    p_mean: float = Field(-1.1, description="lognormal sampling: mean of log sigma")
    p_std: float = Field(2.0, gt=0.0, description="lognormal sampling: std of log sigma")
    weighting: Literal["uniform", "ict"] = Field(
        "uniform", description="lambda(n): 1, or 1 / (sigma_{n+1} - sigma_n)"
    )
    distance: Literal["pseudo-huber", "l2"] = Field(
        "pseudo-huber", description="d(f, target): iCT's pseudo-Huber (no LPIPS offline) or squared L2"
    )
    huber_c: float | None = Field(None, gt=0.0, description="pseudo-Huber c; None = 0.00054 * sqrt(d)")
    target_ema: float = Field(
        0.0, ge=0.0, lt=1.0, description="target network EMA decay (0: sg of the student)"
    )

    @model_validator(mode="after")
    def _ranges(self) -> ConsistencyOptions:
        if self.sigma_max is not None and self.sigma_max <= self.sigma_min:
            raise ValueError("sigma_max must be > sigma_min")
        if self.s1 < self.s0:
            raise ValueError("s1 must be >= s0")
        return self

    def resolved_sigma_max(self, schedule: Schedule) -> float:
        return float(schedule.sigma(1.0)) if self.sigma_max is None else self.sigma_max


class ReplayOptions(BaseModel):
    """Seed B's AT for CMs: delta on the student input, free minibatch replay (as dro-at)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    m: int = Field(3, ge=1, description="replays (parameter updates) per minibatch; the first is clean")
    alpha: float = Field(
        0.1, ge=0.0, description="L2 length of each per-sample normalised ascent step on delta"
    )
    eta: float = Field(
        0.1, ge=0.0, description="delta lies in the L2 ball of radius eta * sqrt(d) (VP pixels)"
    )
    norm: Literal["l2"] = Field("l2", description="the perturbation ball (L2 only, as in seed B)")
    perturb_teacher: bool = Field(False, description="also take the teacher step from the perturbed point")
    ball_scale: Literal["absolute", "noise"] = Field(
        "absolute",
        description=(
            "absolute: alpha and the radius in VP pixels (seed B); noise: both times each sample's noise "
            "std a sigma, so delta shrinks to 0 at t_min, where the boundary condition cannot undo it"
        ),
    )


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's N noise levels, increasing: (smin^(1/rho) + i/(N-1) (smax^(1/rho) - smin^(1/rho)))^rho."""
    if n < 2:
        raise ValueError("n must be >= 2")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas


def ict_num_levels(update: int, total_updates: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum N(k) = min(s0 * 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1))."""
    k_prime = max(1, math.floor(total_updates / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (update // k_prime), s1) + 1


def lognormal_interval_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's p(n) proportional to the lognormal mass of log sigma between sigma_n and sigma_{n+1}."""
    cdf = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = (cdf[1:] - cdf[:-1]).clamp(min=0.0)
    return mass / mass.sum()


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-sample sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(d) by default (iCT)."""
    diff = (x - y).flatten(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return torch.sqrt(diff.square().sum(1) + c * c) - c


def project_l2(delta: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    """Shrink each row of delta onto the L2 ball of the given radius (one, or one per row; rows inside are unchanged)."""
    norms = delta.flatten(1).norm(dim=1).clamp(min=1e-30)
    scale = (torch.as_tensor(radius, dtype=norms.dtype, device=norms.device) / norms).clamp(max=1.0)
    return delta * scale.reshape(-1, *([1] * (delta.ndim - 1)))


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def teacher_ode_step(
    teacher: EpsDenoiser,
    x_ve: torch.Tensor,
    sig_hi: torch.Tensor,
    sig_lo: torch.Tensor,
    solver: Solver,
    t_hi: torch.Tensor | None = None,
    t_lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """One probability-flow step of a VP eps-teacher from sigma_{n+1} to sigma_n, in VE coordinates.

    In VE the ODE is dx/dsigma = eps_hat(x, sigma), with eps_hat the teacher's noise prediction at
    x_vp = a x_ve; Euler on it is exactly deterministic DDIM. Heun adds the trapezoid correction.
    """
    schedule = teacher.schedule
    t_hi = schedule.t_from_sigma(sig_hi) if t_hi is None else t_hi
    t_lo = schedule.t_from_sigma(sig_lo) if t_lo is None else t_lo
    a_hi, a_lo = schedule.a(t_hi), schedule.a(t_lo)
    h = _rows(sig_lo - sig_hi, x_ve)
    d_hi = teacher.eps(_rows(a_hi, x_ve) * x_ve, t_hi)
    x_euler = x_ve + h * d_hi
    if solver == "ddim":
        return x_euler
    d_lo = teacher.eps(_rows(a_lo, x_ve) * x_euler, t_lo)
    return x_ve + h * (d_hi + d_lo) / 2


@dataclass(frozen=True)
class Discretisation:
    """The noise levels for one N with their VP times, scales a, interval probabilities and weights."""

    sigmas: torch.Tensor
    ts: torch.Tensor
    a: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor


Update = Callable[[torch.Tensor], None]
"""The trainer's parameter update: must call ``loss.backward()``, then step the optimizer and its EMA."""
RawFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A network's raw output F(x_vp, t) at per-row VP times t (float64 [B]): the trainer's ``ctx.eps``."""


def _no_net(*args: object) -> torch.Tensor:
    raise RuntimeError("coefficient-only denoiser: the network is called through the objective")


class TargetNetwork:
    """The EMA target theta^- <- mu theta^- + (1 - mu) theta, a frozen copy of the student module."""

    def __init__(self, student: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(student).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for p_t, p_s in zip(self.module.parameters(), student.parameters(), strict=True):
            p_t.lerp_(p_s.detach(), 1.0 - self.decay)
        for b_t, b_s in zip(self.module.buffers(), student.buffers(), strict=True):
            b_t.copy_(b_s)


class ConsistencyObjective:
    """CD (with a teacher) or CT (without one) and their seed-B adversarial variants.

    ``step`` takes one minibatch and spends up to ``m`` parameter updates through ``update``.
    The target is ``target`` (an EMA network's raw function) or, when None, the student itself under
    stop-gradient (iCT's choice, mu = 0); either way it is re-evaluated before every update, since
    every update moves it.
    """

    def __init__(
        self,
        options: ConsistencyOptions,
        schedule: Schedule,
        teacher_net: Net | None = None,
        solver: Solver = "heun",
        replay: ReplayOptions | None = None,
        total_updates: int = 10_000,
    ) -> None:
        self.options = options
        self.schedule = schedule
        self.teacher_net = teacher_net
        self.solver: Solver = solver
        self.replay = replay
        self.total_updates = options.curriculum_updates or total_updates
        self.sigma_max = options.resolved_sigma_max(schedule)
        self.coefs = ConsistencyDenoiser(
            _no_net, schedule, None, options.sigma_min, options.sigma_data, options.parameterization
        )
        self._cache: dict[int, Discretisation] = {}

    def config(self, teacher_hash: str | None = None) -> ConsistencyConfig:
        """The checkpoint header's consistency settings for the model this objective trains."""
        o = self.options
        return ConsistencyConfig(
            sigma_min=o.sigma_min,
            sigma_max=self.sigma_max,
            sigma_data=o.sigma_data,
            parameterization=o.parameterization,
            teacher_hash=teacher_hash,
        )

    def num_levels(self, update: int) -> int:
        o = self.options
        if o.curriculum == "ict":
            return ict_num_levels(update, self.total_updates, o.s0, o.s1)
        return o.n_steps

    def discretisation(self, update: int) -> Discretisation:
        n = self.num_levels(update)
        if n not in self._cache:
            o = self.options
            sigmas = karras_sigmas(n, o.sigma_min, self.sigma_max, o.rho)
            ts = self.schedule.t_from_sigma(sigmas)
            if o.noise_sampling == "lognormal":
                probs = lognormal_interval_probs(sigmas, o.p_mean, o.p_std)
            else:
                probs = torch.full((n - 1,), 1.0 / (n - 1), dtype=torch.float64)
            gaps = sigmas[1:] - sigmas[:-1]
            weights = 1.0 / gaps if o.weighting == "ict" else torch.ones_like(gaps)
            self._cache[n] = Discretisation(sigmas, ts, self.schedule.a(ts), probs, weights)
        return self._cache[n]

    def f(self, raw: RawFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The consistency function c_skip x / a + c_out F(x, t), with the served wrapper's coefficients."""
        kx, km = self.coefs.x0_coefs(t)
        return _rows(kx, x) * x + _rows(km, x) * raw(x, t)

    def _teacher_point(
        self,
        x0: torch.Tensor,
        z: torch.Tensor,
        idx: torch.Tensor,
        disc: Discretisation,
        delta_ve: torch.Tensor | None,
    ) -> torch.Tensor:
        """x_hat_{t_n} in VE: the teacher ODE step (CD) or x0 + sigma_n z (CT), from x_{n+1} (+ delta)."""
        sig_hi, sig_lo = disc.sigmas[idx + 1], disc.sigmas[idx]
        if self.teacher_net is not None:
            teacher = EpsDenoiser(self.teacher_net, self.schedule)
            x_hi_ve = x0 + _rows(sig_hi, x0) * z
            if delta_ve is not None:
                x_hi_ve = x_hi_ve + delta_ve
            with torch.no_grad():
                return teacher_ode_step(
                    teacher, x_hi_ve, sig_hi, sig_lo, self.solver, disc.ts[idx + 1], disc.ts[idx]
                )
        x_lo_ve = x0 + _rows(sig_lo, x0) * z
        if delta_ve is not None:  # Euler with the exact x0 carries delta scaled by sigma_n / sigma_{n+1}
            x_lo_ve = x_lo_ve + _rows(sig_lo / sig_hi, x0) * delta_ve
        return x_lo_ve

    def step(
        self,
        x0: torch.Tensor,
        student: RawFn,
        update: Update,
        generator: torch.Generator,
        updates_done: int,
        *,
        target: RawFn | None = None,
        max_updates: int | None = None,
    ) -> list[float]:
        """One minibatch: draw n and z once (CPU generator), then the replays; returns each update's loss."""
        o, r = self.options, self.replay
        disc = self.discretisation(updates_done)
        idx = torch.multinomial(disc.probs, x0.shape[0], replacement=True, generator=generator)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        t_hi, t_lo = disc.ts[idx + 1], disc.ts[idx]
        a_hi, a_lo = _rows(disc.a[idx + 1], x0), _rows(disc.a[idx], x0)
        weights = disc.weights[idx].to(device=x0.device, dtype=x0.dtype)
        x_hi = a_hi * (x0 + _rows(disc.sigmas[idx + 1], x0) * z)
        m = 1 if r is None else r.m
        # Per-sample ball radius and ascent step; "noise" measures both in the student's noise std.
        unit = torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)
        if r is not None and r.ball_scale == "noise":
            unit = (a_hi * _rows(disc.sigmas[idx + 1], x0)).flatten()
        radius = unit * (0.0 if r is None else r.eta * math.sqrt(x0[0].numel()))
        step = unit * (0.0 if r is None else r.alpha)
        x_lo_ve = self._teacher_point(x0, z, idx, disc, None)
        target_fn = student if target is None else target
        replays = m if max_updates is None else max(1, min(m, max_updates))
        delta: torch.Tensor | None = None
        losses: list[float] = []
        for replay in range(replays):
            if r is not None and r.perturb_teacher and delta is not None:
                x_lo_ve = self._teacher_point(x0, z, idx, disc, delta / a_hi)
            with torch.no_grad():
                goal = self.f(target_fn, a_lo * x_lo_ve, t_lo)
            leaf = None
            x_in = x_hi if delta is None else x_hi + delta
            if replay < replays - 1:  # the last replay's input gradient would never be used: skip it
                leaf = (torch.zeros_like(x_hi) if delta is None else delta).requires_grad_(True)
                x_in = x_hi + leaf
            pred = self.f(student, x_in, t_hi)
            if o.distance == "pseudo-huber":
                per_sample = pseudo_huber(pred, goal, o.huber_c)
            else:
                per_sample = (pred - goal).flatten(1).square().sum(1)
            loss = (weights * per_sample).mean()
            update(loss)
            losses.append(float(loss.detach()))
            if leaf is not None and r is not None:
                if leaf.grad is None:
                    raise RuntimeError("the update did not back-propagate into the perturbation")
                g = leaf.grad.detach()
                g = g / _rows(g.flatten(1).norm(dim=1).clamp(min=1e-12), g)
                delta = project_l2(leaf.detach() + _rows(step, g) * g, radius)
        return losses
