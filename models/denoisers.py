"""Thin preconditioning wrappers: they turn a raw network into what the samplers call.

A denoiser maps (x_t, t) to a model output and says, per row, how x0_hat is read off it
(``x0 = kx * x + km * out``). The sampler's fused update then needs no knowledge of the
parameterisation: eps-prediction and consistency models share every sampler step.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Literal

import torch

from models.schedules import Schedule

Net = Callable[..., torch.Tensor]


class Denoiser(ABC):
    """Base: a network with a schedule. Subclasses define the x0 read-out."""

    def __init__(self, net: Net, schedule: Schedule, labels: torch.Tensor | None = None) -> None:
        self.net = net
        self.schedule = schedule
        self.labels = labels

    def with_labels(self, labels: torch.Tensor | None) -> Denoiser:
        """The same denoiser for other rows' class labels (a running batch's rows change every step)."""
        out = copy.copy(self)
        out.labels = labels
        return out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The raw network output at per-row times t (float64 [B])."""
        return self.forward(x, self.schedule.net_time(t).to(x.device))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The raw network output at DDPM timestep indices already on x's device (the sampler's path)."""
        if self.labels is None:
            return self.net(x, timestep)
        return self.net(x, timestep, self.labels)

    @abstractmethod
    def x0_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (kx, km), float64, with x0_hat = kx * x + km * out."""

    @abstractmethod
    def readout_key(self) -> Hashable:
        """Everything ``x0_coefs`` depends on: denoisers with equal keys share cached sampler tables."""

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat as a plain differentiable function (training, attacks, tests)."""
        kx, km = self.x0_coefs(t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        out = self(x, t)
        return kx.to(x).reshape(shape) * x + km.to(x).reshape(shape) * out


class EpsDenoiser(Denoiser):
    """eps-prediction: x0_hat = (x - s_t eps) / a_t."""

    def x0_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.schedule.a(t), self.schedule.s(t)
        return 1.0 / a, -s / a

    def readout_key(self) -> Hashable:
        return ("eps", self.schedule.config)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self(x, t)


Parameterization = Literal["edm", "eps"]


class ConsistencyDenoiser(Denoiser):
    """Consistency function f(x, t) = c_skip(sigma) x / a_t + c_out(sigma) F(x, t), sigma = s_t / a_t.

    Both parameterizations give c_skip = 1 and c_out = 0 at sigma_min, so f(x, t_min) = x / a_{t_min}
    exactly: the boundary condition is built into the wrapper.

    * ``edm`` (Song et al. 2023): c_skip = sd^2 / ((sigma - smin)^2 + sd^2),
      c_out = (sigma - smin) sd / sqrt(sigma^2 + sd^2); F is an output of unit scale.
    * ``eps``: c_skip = 1, c_out = -(sigma - smin); F plays the part of an eps prediction, so a
      student that starts as a copy of an eps-prediction teacher starts as that teacher's denoiser
      x_ve - sigma eps at every noise level (EDM's coefficients match it only near sigma_min).
    """

    def __init__(
        self,
        net: Net,
        schedule: Schedule,
        labels: torch.Tensor | None = None,
        sigma_min: float = 0.002,
        sigma_data: float = 0.5,
        parameterization: Parameterization = "edm",
    ) -> None:
        super().__init__(net, schedule, labels)
        self.sigma_min = sigma_min
        self.sigma_data = sigma_data
        self.parameterization = parameterization

    def c_skip_out(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd, smin = self.sigma_data, self.sigma_min
        if self.parameterization == "eps":
            return torch.ones_like(sigma), smin - sigma
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        c_out = (sigma - smin) * sd / torch.sqrt(sigma**2 + sd**2)
        return c_skip, c_out

    def x0_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_skip, c_out = self.c_skip_out(self.schedule.sigma(t))
        return c_skip / self.schedule.a(t), c_out

    def readout_key(self) -> Hashable:
        return ("consistency", self.schedule.config, self.sigma_min, self.sigma_data, self.parameterization)
