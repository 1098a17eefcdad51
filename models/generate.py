"""Generation and purification as library functions over any denoiser and any sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.denoisers import Denoiser
from models.errors import UserError
from models.noise import NoiseSource
from models.samplers import SAMPLERS, Callback, Cancel, DdimEps
from models.sampling_spec import (
    DEFAULT_STEPS,
    SPACING,
    check_eta,
    check_known_sampler,
    check_spacing,
    check_t_star,
    check_times,
)
from models.schedules import Schedule, Spacing, time_grid

__all__ = ["DEFAULT_STEPS", "SPACING", "generate", "purify", "sampler_grid", "start_state"]


def sampler_grid(
    schedule: Schedule,
    sampler: str,
    *,
    steps: int | None = None,
    times: Sequence[float] | None = None,
    eta: float = 0.0,
    t_star: float | None = None,
    spacing: str | None = None,
) -> torch.Tensor:
    """The time grid [start, ..., 0] a call runs (NFE = len - 1), or the ValueError it would raise.

    The one place that checks sampler, steps, times, eta and t* and picks the grid, so generate,
    purify and the CLI (before its progress bar) accept and refuse the same arguments. start is 1
    for sampling and t* for purification. Without ``times`` the grid is ``steps`` (default 10) steps
    on the sampler's own spacing, or on diffusers' ``spacing`` (leading, trailing, linspace: sampling
    only); ``times`` replaces that spacing: the grid is [start, *times, 0].
    """
    check_known_sampler(sampler)
    check_eta(sampler, eta)
    start = 1.0
    if t_star is not None:
        check_t_star(t_star, schedule.T)
        start = t_star
    check_spacing(spacing, sampler, times=times is not None, purify=t_star is not None)
    if times is None:
        grid_spacing: Spacing = SPACING[sampler] if spacing is None else spacing  # type: ignore[assignment]
        return time_grid(schedule, DEFAULT_STEPS if steps is None else steps, grid_spacing, t_max=start)
    check_times(times, start, schedule.T, steps)
    ts = [float(t) for t in times]
    return torch.tensor([start, *ts, 0.0], dtype=torch.float64)


def start_state(
    denoiser: Denoiser,
    noise: NoiseSource,
    *,
    images: torch.Tensor | None = None,
    t_star: float | None = None,
    t_start: float = 1.0,
) -> torch.Tensor:
    """Where a call starts (stream 0 of every image): noise at the grid's first time ``t_start``
    to sample, or ``images`` diffused to t* with per-image noise to purify. Shared by the library
    calls and the worker's engine."""
    if images is None:
        x = noise.initial()
        std = denoiser.schedule.initial_std(t_start)
        return x * std if std != 1.0 else x
    if images.shape[0] != len(noise):
        raise UserError("images", "one seed per image is needed")
    if t_star is None:
        raise ValueError("purification needs t_star")
    t0 = torch.full((images.shape[0],), t_star, dtype=torch.float64)
    return denoiser.schedule.diffuse(images, t0, noise.initial().to(images.dtype))


def generate(
    denoiser: Denoiser,
    noise: NoiseSource,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    times: Sequence[float] | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
    spacing: str | None = None,
    ddim_eps: DdimEps = "from-x0",
) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] from pure noise (one per seed of ``noise``).

    ``times`` (decreasing, in [1/T, 1)) are the times after the first network evaluation, at t = 1,
    where the sampler evaluates the network again; for a consistency model they are the re-noising
    times tau_1 > tau_2 > ... of multistep consistency sampling (Song et al. 2023, Algorithm 1).
    The grid is [1, *times, 0], so NFE = len(times) + 1 and ``times=[]`` is one step. Without it,
    ``steps`` (default 10) steps on the sampler's own spacing; with it, ``steps`` may be omitted.
    """
    ts = sampler_grid(denoiser.schedule, sampler, steps=steps, times=times, eta=eta, spacing=spacing)
    x = start_state(denoiser, noise, t_start=float(ts[0]))
    out = SAMPLERS[sampler](
        denoiser, x, ts, noise, callback=callback, cancel=cancel, eta=eta, clip_x0=clip_x0, ddim_eps=ddim_eps
    )
    return out.clamp(-1.0, 1.0) if clip_x0 else out


def purify(
    denoiser: Denoiser,
    images: torch.Tensor,
    noise: NoiseSource,
    *,
    t_star: float = 0.1,
    sampler: str = "ddim",
    steps: int | None = None,
    times: Sequence[float] | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
    ddim_eps: DdimEps = "from-x0",
) -> torch.Tensor:
    """DiffPure: diffuse ``images`` (in [-1, 1]) to t* with per-image noise, then reverse to t = 0.

    ``times`` (decreasing, in [1/T, t*)) are where the sampler evaluates the network again after
    t*: the grid is [t*, *times, 0], NFE = len(times) + 1. With a consistency model ``times=[]`` (or
    ``steps=1``) is one network evaluation, f(x_t*, t*); ``times=[tau]`` denoises, re-noises to tau
    and denoises again.
    """
    ts = sampler_grid(denoiser.schedule, sampler, steps=steps, times=times, eta=eta, t_star=t_star)
    x = start_state(denoiser, noise, images=images, t_star=t_star)
    out = SAMPLERS[sampler](
        denoiser, x, ts, noise, callback=callback, cancel=cancel, eta=eta, clip_x0=clip_x0, ddim_eps=ddim_eps
    )
    return out.clamp(-1.0, 1.0) if clip_x0 else out
