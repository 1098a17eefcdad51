"""Samplers: one signature, one loop, one fused update per step.

``sampler(denoiser, x, ts, noise, *, callback=None, cancel=None, **options) -> x0``

``ts`` is a decreasing grid of VP times ending at 0 (NFE = len(ts) - 1). Every sampler differs only
in the per-row coefficients (p, q, r, n) of the update

    x0 = kx * x + km * out                     (the denoiser's read-out, optionally clipped)
    x_next = p * x + q * x0 + r * x0_prev + n * z(seed, step)

which ``kernels.sampler_update`` computes in one kernel on the GPU. Coefficients come from host
float64 tables, so a step never synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from kernels import sampler_update
from models.denoisers import Denoiser
from models.noise import NoiseSource

Callback = Callable[[int, int], None]
Cancel = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised between steps when the cancel check returns True."""


class StepRule(Protocol):
    def __call__(
        self, denoiser: Denoiser, t: torch.Tensor, s: torch.Tensor, t_prev: torch.Tensor | None, eta: float
    ) -> tuple[torch.Tensor, ...]: ...


def _ddim(
    denoiser: Denoiser, t: torch.Tensor, s: torch.Tensor, t_prev: torch.Tensor | None, eta: float
) -> tuple[torch.Tensor, ...]:
    sch = denoiser.schedule
    ab_t, ab_s = sch.alphabar(t), sch.alphabar(s)
    a_t, s_t, a_s = ab_t.sqrt(), (1 - ab_t).sqrt(), ab_s.sqrt()
    sigma = eta * torch.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    c = torch.sqrt((1 - ab_s - sigma**2).clamp(min=0))
    zero = torch.zeros_like(t)
    return c / s_t, a_s - c * a_t / s_t, zero, sigma


def _ddpm(
    denoiser: Denoiser, t: torch.Tensor, s: torch.Tensor, t_prev: torch.Tensor | None, eta: float
) -> tuple[torch.Tensor, ...]:
    sch = denoiser.schedule
    ab_t, ab_s = sch.alphabar(t), sch.alphabar(s)
    alpha_ts = ab_t / ab_s
    beta_ts = 1 - alpha_ts
    q = ab_s.sqrt() * beta_ts / (1 - ab_t)
    p = alpha_ts.sqrt() * (1 - ab_s) / (1 - ab_t)
    n = torch.sqrt(beta_ts * (1 - ab_s) / (1 - ab_t))
    return p, q, torch.zeros_like(t), n


def _dpmpp_2m(
    denoiser: Denoiser, t: torch.Tensor, s: torch.Tensor, t_prev: torch.Tensor | None, eta: float
) -> tuple[torch.Tensor, ...]:
    sch = denoiser.schedule
    a_t, s_t, a_s, s_s = sch.a(t), sch.s(t), sch.a(s), sch.s(s)
    zero = torch.zeros_like(t)
    if bool((s == 0).all()):  # last step: first order, x_next = x0 (lower-order final step)
        return zero, torch.ones_like(t), zero, zero
    exp_neg_h = (a_t / s_t) * (s_s / a_s)  # e^{-(lambda_s - lambda_t)}
    base = a_s * (1 - exp_neg_h)
    if t_prev is None:
        return s_s / s_t, base, zero, zero
    h = sch.log_snr(s) - sch.log_snr(t)
    h_prev = sch.log_snr(t) - sch.log_snr(t_prev)
    half_inv_r = h / (2 * h_prev)
    return s_s / s_t, base * (1 + half_inv_r), -base * half_inv_r, zero


def _consistency(
    denoiser: Denoiser, t: torch.Tensor, s: torch.Tensor, t_prev: torch.Tensor | None, eta: float
) -> tuple[torch.Tensor, ...]:
    """Multistep consistency sampling: denoise to x0, then re-noise to the next time."""
    sch = denoiser.schedule
    zero = torch.zeros_like(t)
    return zero, sch.a(s), zero, sch.s(s)


RULES: dict[str, StepRule] = {
    "ddpm": _ddpm,
    "ddim": _ddim,
    "dpm-solver++": _dpmpp_2m,
    "consistency": _consistency,
}
DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
CONSISTENCY_SAMPLERS = ("consistency",)


def run_sampler(
    rule: str,
    denoiser: Denoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    noise: NoiseSource,
    *,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
) -> torch.Tensor:
    """The one sampler loop. Returns the final x0 estimate (the image)."""
    if rule not in RULES:
        raise ValueError(f"unknown sampler {rule!r}; known: {', '.join(RULES)}")
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()) or float(ts[-1]) != 0.0:
        raise ValueError("ts must be a strictly decreasing 1-D time grid ending at 0")
    if eta < 0:
        raise ValueError("eta must be >= 0")
    table = coefficient_table(rule, denoiser, ts, eta)
    uses_prev, uses_noise = (table[:, 4] != 0).tolist(), (table[:, 5] != 0).tolist()
    # One host-to-device copy for the whole run: no step waits on the device for its coefficients.
    coefs = table.to(device=x.device, dtype=torch.float32)
    timesteps = denoiser.schedule.net_time(ts[:-1]).to(x.device)
    batch = x.shape[0]
    n_steps = len(ts) - 1
    x0_prev: torch.Tensor | None = None
    for i in range(n_steps):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled before step {i} of {n_steps}")
        out = denoiser.forward(x, timesteps[i].expand(batch))
        x, x0_prev = sampler_update(
            x,
            out,
            coefs[i].expand(batch, 6).contiguous(),
            x0_prev=x0_prev if uses_prev[i] else None,
            seeds=noise.seeds_device if uses_noise[i] else None,
            stream=noise.step_stream(i),
            clip_x0=clip_x0,
        )
        if callback is not None:
            callback(i + 1, n_steps)
    return x


def coefficient_table(rule: str, denoiser: Denoiser, ts: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
    """float64 [steps, 6] rows (kx, km, p, q, r, n) of every step of ``rule`` on the grid ``ts``."""
    step_rule = RULES[rule]
    rows = []
    t_prev: torch.Tensor | None = None
    for i in range(len(ts) - 1):
        t, s = ts[i : i + 1], ts[i + 1 : i + 2]
        kx, km = denoiser.x0_coefs(t)
        rows.append(torch.cat([kx, km, *step_rule(denoiser, t, s, t_prev, eta)]))
        t_prev = t
    return torch.stack(rows)


def _make(rule: str) -> Callable[..., torch.Tensor]:
    def sampler(
        denoiser: Denoiser,
        x: torch.Tensor,
        ts: torch.Tensor,
        noise: NoiseSource,
        *,
        callback: Callback | None = None,
        cancel: Cancel | None = None,
        eta: float = 0.0,
        clip_x0: bool = False,
    ) -> torch.Tensor:
        return run_sampler(
            rule, denoiser, x, ts, noise, callback=callback, cancel=cancel, eta=eta, clip_x0=clip_x0
        )

    sampler.__name__ = f"sample_{rule.replace('-', '_').replace('++', 'pp')}"
    sampler.__doc__ = f"The {rule} sampler (see the module docstring for the shared signature)."
    return sampler


sample_ddpm = _make("ddpm")
sample_ddim = _make("ddim")
sample_dpmpp_2m = _make("dpm-solver++")
sample_consistency = _make("consistency")
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm-solver++": sample_dpmpp_2m,
    "consistency": sample_consistency,
}
