"""What a sampling request may ask of a model, in one torch-free place.

The API (which never imports torch), the library (``models.generate.sampler_grid``), the CLI and
``eval`` all take the sampler names, which samplers each model kind runs, which read eta, the
default spacing and steps, and the pure argument checks from here, so they accept and refuse the
same requests with the same reasons. Every check raises ``UserError(field, reason)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

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
DEFAULT_STEPS = 10
"""Steps when a library call names none (a consistency model's served default is 1: ``default_steps``)."""


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
