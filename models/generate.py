"""Generation and purification as library functions over any denoiser and any sampler."""

from __future__ import annotations

import torch

from models.denoisers import Denoiser
from models.noise import NoiseSource
from models.samplers import SAMPLERS, Callback, Cancel
from models.schedules import Spacing, time_grid

SPACING: dict[str, Spacing] = {
    "ddpm": "uniform",
    "ddim": "uniform",
    "dpm-solver++": "log-snr",
    "consistency": "linear",
}


def _check_sampler(sampler: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError("steps: must be >= 1")


def generate(
    denoiser: Denoiser,
    noise: NoiseSource,
    *,
    sampler: str = "ddim",
    steps: int = 10,
    eta: float = 0.0,
    clip_x0: bool = True,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] from pure noise (one per seed of ``noise``)."""
    _check_sampler(sampler, steps)
    ts = time_grid(denoiser.schedule, steps, SPACING[sampler])
    x = noise.initial()
    out = SAMPLERS[sampler](
        denoiser, x, ts, noise, callback=callback, cancel=cancel, eta=eta, clip_x0=clip_x0
    )
    return out.clamp(-1.0, 1.0) if clip_x0 else out


def purify(
    denoiser: Denoiser,
    images: torch.Tensor,
    noise: NoiseSource,
    *,
    t_star: float = 0.1,
    sampler: str = "ddim",
    steps: int = 10,
    eta: float = 0.0,
    clip_x0: bool = True,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
) -> torch.Tensor:
    """DiffPure: diffuse ``images`` (in [-1, 1]) to t* with per-image noise, then reverse to t = 0.

    With a consistency model and ``steps=1`` this is one network evaluation: f(x_t*, t*).
    """
    _check_sampler(sampler, steps)
    T = denoiser.schedule.T
    if not 1.0 / T <= t_star <= 1.0:
        raise ValueError(f"t_star: must be in [{1.0 / T}, 1], got {t_star}")
    if SPACING[sampler] == "uniform" and steps > round(t_star * T):
        raise ValueError(f"steps: at most {round(t_star * T)} steps fit below t_star={t_star}")
    if images.shape[0] != len(noise):
        raise ValueError("images: one seed per image is needed")
    ts = time_grid(denoiser.schedule, steps, SPACING[sampler], t_max=t_star)
    t0 = torch.full((images.shape[0],), t_star, dtype=torch.float64)
    x = denoiser.schedule.diffuse(images, t0, noise.initial().to(images.dtype))
    out = SAMPLERS[sampler](
        denoiser, x, ts, noise, callback=callback, cancel=cancel, eta=eta, clip_x0=clip_x0
    )
    return out.clamp(-1.0, 1.0) if clip_x0 else out
