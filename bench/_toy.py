"""Shared pieces of the known-distribution experiments: a small MLP eps-model and a vector trainer.

The trainer implements ``models.train.methods.StepContext``, so the experiments run the very method
classes the image trainer runs (standard, equivariant-at, dro-at, input-perturbation), on [B, D]
vectors instead of images.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.denoisers import EpsDenoiser
from models.evaluation.common import machine_description
from models.generate import generate
from models.noise import NoiseSource
from models.schedules import Schedule
from models.train.methods import Method, get_method


class MLP(nn.Module):
    """eps_theta(x, timestep) for vectors: sinusoidal time features + a SiLU MLP (EpsDenoiser's net(x, timestep)).

    ``sigma_data`` given: EDM's preconditioning written for an eps-model,
    eps = c_skip x + c_out F(c_in x, t) with v = a_t^2 sigma_data^2 + s_t^2, c_in = 1 / sqrt(v),
    c_skip = s_t / v (the exact eps of N(0, sigma_data^2 I) data) and c_out = a_t sigma_data / sqrt(v)
    (the spread of eps - c_skip x under that model), so the MLP F sees and fits unit-scale numbers at
    every t. Why: without it, wherever data is thin (near t = 1 everywhere, and off a
    low-dimensional support at every t) the target eps is ~x_t / s_t, an identity-like map that a
    SiLU MLP learns slowly and not at all through a hidden layer narrower than the off-support
    dimension; deterministic DDIM multiplies whatever part of x_t it misses by up to a_0 / a_1 = 157
    on the way to t = 0 (a 256-d subspace run ended 119 off the subspace). With the skip alone, an
    unscaled MLP still extrapolates wildly on a rare sample at mid t (one sample in 2,000 reached
    norm 10^5); c_out shrinks its say where the Gaussian answer is already nearly exact.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        layers: int = 3,
        time_dim: int = 32,
        sigma_data: float | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.sigma_data = sigma_data
        self.schedule = schedule or Schedule()
        blocks: list[nn.Module] = [nn.Linear(dim + time_dim, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.SiLU()]
        blocks.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*blocks)

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=x.device) / half)
        arg = timestep.to(x.dtype).reshape(-1, 1) * freqs
        if self.sigma_data is None:
            return self.net(torch.cat([x, torch.sin(arg), torch.cos(arg)], dim=1))
        t = (timestep.to(torch.float64).reshape(-1) + 1.0) / self.schedule.T  # net_time inverted
        ab = self.schedule.alphabar(t).reshape(-1, 1)
        v = ab * self.sigma_data**2 + 1 - ab
        c_in, c_skip, c_out = (v.rsqrt(), (1 - ab).sqrt() / v, (ab * v.reciprocal()).sqrt() * self.sigma_data)
        f = self.net(torch.cat([c_in.to(x.dtype) * x, torch.sin(arg), torch.cos(arg)], dim=1))
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * f


class VectorTrainer:
    """A minimal StepContext: AdamW with warm-up, grad clipping and EMA over an MLP, counting updates."""

    def __init__(
        self,
        dim: int,
        method: str,
        options: dict[str, Any],
        updates: int,
        seed: int,
        lr: float = 1e-3,
        ema_decay: float = 0.995,
        hidden: int = 128,
        init: dict[str, torch.Tensor] | None = None,
        warmup: int = 100,
        sigma_data: float | None = None,
    ) -> None:
        """``init``: start from these weights (the EMA too), as ``robustdiff train --init`` does;
        ``sigma_data``: the MLP's skip path (see MLP), None for none."""
        torch.manual_seed(seed)
        self.schedule = Schedule()
        self.device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.net = MLP(dim, hidden, sigma_data=sigma_data, schedule=self.schedule)
        if init is not None:
            self.net.load_state_dict(init)
        self.ema = MLP(dim, hidden, sigma_data=sigma_data, schedule=self.schedule).requires_grad_(False)
        self.ema.load_state_dict(self.net.state_dict())
        self.warmup = warmup
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0)
        self.method: Method = get_method(method, options)
        self.budget = updates
        self.updates = 0
        self.lr = lr
        self.ema_decay = ema_decay

    def eps(self, x: torch.Tensor, t: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        return self.net(x, self.schedule.net_time(t))

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        for g in self.opt.param_groups:
            g["lr"] = self.lr * min(1.0, (self.updates + 1) / max(self.warmup, 1))
        self.opt.step()
        decay = min(self.ema_decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                e.lerp_(p, 1.0 - decay)
        self.updates += 1

    def remaining(self) -> int:
        return self.budget - self.updates

    def fit(self, data: torch.Tensor, batch: int) -> list[float]:
        """Train to the update budget on minibatches drawn with replacement; returns the losses."""
        losses: list[float] = []
        while self.remaining() > 0:
            idx = torch.randint(0, data.shape[0], (batch,), generator=self.generator)
            losses += self.method.step(self, data[idx])
        return losses

    @torch.no_grad()
    def sample(self, n: int, steps: int, seed: int = 10_000, clip: bool = False) -> torch.Tensor:
        """n EMA samples with DDIM (``steps`` network evaluations); ``clip`` clamps x0_hat to [-1, 1] as for images."""
        noise = NoiseSource(range(seed, seed + n), (self.dim,))
        return generate(
            EpsDenoiser(self.ema, self.schedule), noise, sampler="ddim", steps=steps, clip_x0=clip
        )


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """SW2 between two equal-size samples: RMS over random unit directions of the sorted-quantile gap."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa = (a.double() @ dirs).sort(dim=0).values
    pb = (b.double() @ dirs).sort(dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


def machine() -> str:
    return machine_description("cpu")


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)
