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


class VDenoiser(Denoiser):
    """v-prediction (v = a_t eps - s_t x0): x0_hat = a_t x - s_t v."""

    def x0_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.a(t), -self.schedule.s(t)

    def readout_key(self) -> Hashable:
        return ("v", self.schedule.config)


class SampleDenoiser(Denoiser):
    """x0-prediction (diffusers' ``prediction_type: sample``): the output is x0_hat."""

    def x0_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(self.schedule.a(t)), torch.ones_like(self.schedule.a(t))

    def readout_key(self) -> Hashable:
        return ("sample", self.schedule.config)


Prediction = Literal["epsilon", "v_prediction", "sample"]
DIFFUSION_DENOISERS: dict[str, type[Denoiser]] = {
    "epsilon": EpsDenoiser,
    "v_prediction": VDenoiser,
    "sample": SampleDenoiser,
}
"""The read-out of each diffusion prediction type (diffusers' names)."""

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

    ``c_in`` feeds the network EDM's c_in(sigma) x_ve = x_ve / sqrt(sigma^2 + sigma_data^2) instead of
    the VP point (OpenAI's consistency models; needs the ``edm`` schedule, whose network time is
    250 ln sigma). ``renoise_subtract_sigma_min`` re-noises to sqrt(sigma^2 - sigma_min^2) between
    multistep steps, Song et al.'s Algorithm 1 and diffusers' CMStochasticIterativeScheduler (else sigma).
    """

    def __init__(
        self,
        net: Net,
        schedule: Schedule,
        labels: torch.Tensor | None = None,
        sigma_min: float = 0.002,
        sigma_data: float = 0.5,
        parameterization: Parameterization = "edm",
        c_in: bool = False,
        renoise_subtract_sigma_min: bool = False,
    ) -> None:
        super().__init__(net, schedule, labels)
        self.sigma_min = sigma_min
        self.sigma_data = sigma_data
        self.parameterization = parameterization
        self.c_in = c_in
        self.renoise_subtract_sigma_min = renoise_subtract_sigma_min

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.c_in:  # x = a x_ve with a = 1 / sqrt(1 + sigma^2): c_in x_ve = x sqrt(1 + sigma^2) / sqrt(sigma^2 + sd^2)
            sig2 = self.schedule.sigma_from_net_time(timestep) ** 2
            scale = torch.sqrt((1 + sig2) / (sig2 + self.sigma_data**2))
            x = x * scale.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return super().forward(x, timestep)

    def renoise_std(self, t: torch.Tensor) -> torch.Tensor:
        """The VP std of the fresh noise a multistep step adds at time t."""
        if not self.renoise_subtract_sigma_min:
            return self.schedule.s(t)
        sigma = self.schedule.sigma(t)
        return self.schedule.a(t) * torch.sqrt((sigma**2 - self.sigma_min**2).clamp(min=0.0))

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
        return (
            "consistency",
            self.schedule.config,
            self.sigma_min,
            self.sigma_data,
            self.parameterization,
            self.renoise_subtract_sigma_min,
        )
