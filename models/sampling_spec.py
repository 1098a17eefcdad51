"""What a sampling request may ask of a model, in one torch-free place.

The API (which never imports torch), the library (``models.generate.sampler_grid``), the CLI and
``eval`` all take the sampler names, which samplers each model kind runs, which read eta, the
default spacing and steps, diffusers' spacings and DDIM's eps convention, and the pure argument
checks from here, so they accept and refuse the same requests with the same reasons. Every check
raises ``UserError(field, reason)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from models.errors import UserError

Spacing = Literal["uniform", "log-snr", "linear"]

DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
CONSISTENCY_SAMPLERS = ("consistency",)
SAMPLERS = DIFFUSION_SAMPLERS + CONSISTENCY_SAMPLERS
ETA_SAMPLERS = ("ddim",)
"""The samplers that read eta; the others would silently ignore it (DDPM's noise is fixed by its posterior)."""
SPACING: dict[str, Spacing] = {
    "ddpm": "uniform",
    "ddim": "uniform",
    "dpm-solver++": "log-snr",
    "consistency": "linear",
}
DiffusersSpacing = Literal["leading", "trailing", "linspace"]
DIFFUSERS_SPACINGS: tuple[DiffusersSpacing, ...] = ("leading", "trailing", "linspace")
"""diffusers' ``timestep_spacing`` names, asked for by name to reproduce a diffusers run: grids of
their timestep indices j (t = (j + 1) / T). They start below t = 1, so they are for sampling from
noise only, and they replace the spacing of the diffusion samplers only."""
DdimEps = Literal["from-x0", "model"]
DDIM_EPS: tuple[DdimEps, ...] = ("from-x0", "model")
"""DDIM after x0 clipping: step along the eps of the clipped x0 (ours, diffusers'
``use_clipped_model_output=True``) or keep the network's eps (``model``: diffusers' default)."""
DEFAULT_STEPS = 10
"""Steps when a library call names none (a consistency model's served default is 1: ``default_steps``)."""
StrengthName = Literal["light", "medium", "strong"]
STRENGTHS: dict[str, float] = {"light": 0.05, "medium": 0.1, "strong": 0.2}
"""The named purification strengths as t* on DDPM's linear schedule (beta 1e-4 .. 0.02, T = 1000).
A name means that schedule's noise level at this t* (sigma 0.173 / 0.339 / 0.719 in data units), the
same on every model: each worker registers the t* of its own model's grid with the nearest sigma
(``models.schedules.strength_times``). An entry without them (an older worker) gets these t*."""
DEFAULT_STRENGTH: StrengthName = "medium"


def samplers_for(kind: str) -> tuple[str, ...]:
    """The samplers a model kind ('diffusion' or 'consistency') runs."""
    return CONSISTENCY_SAMPLERS if kind == "consistency" else DIFFUSION_SAMPLERS


def default_sampler(kind: str) -> str:
    return "consistency" if kind == "consistency" else "ddim"


def default_steps(kind: str) -> int:
    """Served default: one step for a consistency model (its point), DEFAULT_STEPS otherwise."""
    return 1 if kind == "consistency" else DEFAULT_STEPS


def check_sampler(sampler: str, kind: str, model: str) -> None:
    """``sampler`` runs on ``model``, a ``kind`` model; the reason names what to use instead."""
    if sampler in samplers_for(kind):
        return
    if sampler == "consistency":
        reason = f"'consistency' needs a consistency model; {model!r} is a {kind} model"
    elif kind == "consistency" and sampler in DIFFUSION_SAMPLERS:
        reason = f"{model!r} is a consistency model; use 'consistency'"
    else:
        reason = f"unknown sampler {sampler!r}; {model!r} supports {list(samplers_for(kind))}"
    raise UserError("sampler", reason)


def check_known_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise UserError("sampler", f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")


def check_eta(sampler: str, eta: float) -> None:
    if not math.isfinite(eta) or eta < 0:
        raise UserError("eta", f"must be a finite number >= 0, got {eta}")
    if eta != 0 and sampler not in ETA_SAMPLERS:
        raise UserError(
            "eta", f"only the {', '.join(ETA_SAMPLERS)} sampler uses eta; {sampler} would ignore it"
        )


def check_t_star(t_star: float, timesteps: int) -> None:
    t_min = 1.0 / timesteps
    if not t_min <= t_star <= 1.0:
        raise UserError("t_star", f"must be in [{t_min}, 1], got {t_star}")


def check_times(times: Sequence[float], start: float, timesteps: int, steps: int | None) -> int:
    """``times`` (after the start, 1 or t*) are finite, strictly decreasing, in [1/T, start) and agree
    with ``steps`` if given; returns the network evaluations they give (len + 1)."""
    ts = [float(t) for t in times]
    t_min = 1.0 / timesteps
    if not all(math.isfinite(t) for t in ts):
        raise UserError("times", f"must be finite, got {ts}")
    if any(later >= earlier for earlier, later in itertools.pairwise(ts)):
        raise UserError("times", f"must be strictly decreasing, got {ts}")
    if ts and not (t_min <= ts[-1] and ts[0] < start):
        raise UserError(
            "times", f"must be in [{t_min}, {start}) (at least 1/T, below the start time), got {ts}"
        )
    if steps is not None and steps != len(ts) + 1:
        raise UserError(
            "steps", f"{steps} does not match the {len(ts) + 1} network evaluations that times gives"
        )
    return len(ts) + 1


def steps_that_fit(sampler: str, t_star: float, timesteps: int) -> int | None:
    """Most steps below t* for samplers on the schedule's integer grid (ddpm, ddim); None: no limit."""
    return round(t_star * timesteps) if SPACING[sampler] == "uniform" else None


def check_spacing(spacing: str | None, sampler: str, *, times: bool = False, purify: bool = False) -> None:
    """A diffusers ``spacing`` (None: the sampler's own) fits the call: a diffusion sampler, sampling
    from noise, and no ``times`` (which replace any spacing)."""
    if spacing is None:
        return
    if spacing not in DIFFUSERS_SPACINGS:
        raise UserError("spacing", f"unknown spacing {spacing!r}; known: {', '.join(DIFFUSERS_SPACINGS)}")
    if sampler not in DIFFUSION_SAMPLERS:
        raise UserError("spacing", f"diffusers' spacings are for diffusion samplers, not {sampler}")
    if times:
        raise UserError("spacing", "give either times or a spacing, not both")
    if purify:
        raise UserError(
            "spacing", f"{spacing!r} is diffusers' grid for sampling from noise, not for purification"
        )


def diffusers_timesteps(timesteps: int, steps: int, spacing: str) -> list[int]:
    """diffusers' DDIM/DDPM ``set_timesteps`` (steps_offset 0) on a T = ``timesteps`` schedule: the
    decreasing indices j it evaluates, in its own numpy arithmetic; a step count for which it gives
    no strictly decreasing grid is refused."""
    T = timesteps
    if steps < 1:
        raise UserError("steps", "must be >= 1")
    if steps > T:
        raise UserError("steps", f"at most {T} steps fit in T = {T}")
    if spacing == "leading":
        idx = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        idx = (np.round(np.arange(T, 0, -T / steps)) - 1).astype(np.int64)
    else:
        idx = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    if len(idx) != steps or (idx[1:] >= idx[:-1]).any() or idx[-1] < 0:
        raise UserError("steps", f"diffusers' {spacing!r} spacing gives no {steps}-step grid for T = {T}")
    return [int(j) for j in idx]


def check_ddim_eps(ddim_eps: str, sampler: str) -> None:
    """``model`` changes only the ddim update; elsewhere it would be silently ignored."""
    if ddim_eps not in DDIM_EPS or (ddim_eps == "model" and sampler != "ddim"):
        raise UserError(
            "ddim_eps", f"'from-x0', or 'model' with the ddim sampler; got {ddim_eps!r} with {sampler}"
        )
