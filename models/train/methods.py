"""Training methods: a registry of small classes, each with validated options and a per-minibatch step.

A method sees the trainer only through ``StepContext``: it draws its randomness from
``ctx.generator`` (a CPU generator whose state the trainer checkpoints, so resume is exact), calls
the network through ``ctx.eps`` and spends parameter updates through ``ctx.update(loss)``. A step may
call ``update`` several times (dro-at's minibatch replay); the loop only counts updates, so a new
method (consistency distillation, ...) plugs in by registering a class here.

Units. Images live in [-1, 1] ("pixel units"); ``x_t = a_t x0 + s_t eps``. A shift ``w`` of the noise
("noise units") moves the pixels by ``s_t w``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.checkpoint import CheckpointHeader
from models.denoisers import Denoiser, EpsDenoiser
from models.schedules import Schedule

__all__ = [
    "METHODS",
    "DroAT",
    "EquivariantAT",
    "InputPerturbation",
    "Method",
    "MethodOptions",
    "Standard",
    "StepContext",
    "equivariance_residual",
    "get_method",
    "register",
]


class StepContext(Protocol):
    """What the training loop offers a method."""

    schedule: Schedule
    device: torch.device
    generator: torch.Generator

    def eps(self, x: torch.Tensor, t: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        """The network's float32 noise prediction at per-row times t (float64 [B]).

        ``sync=False`` bypasses DDP, for forward passes whose gradients never reach the parameters.
        """
        ...

    def update(self, loss: torch.Tensor) -> None:
        """Backward ``loss``, clip, one optimizer step, one EMA update; counts one parameter update."""
        ...

    def remaining(self) -> int:
        """Parameter updates left in the budget (a step must not spend more)."""
        ...


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors, values are validated on load."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Method(ABC):
    """One training method. Subclasses set ``name`` and ``Options`` and implement ``step``."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions) -> None:
        self.options = options

    @abstractmethod
    def step(self, ctx: StepContext, x0: torch.Tensor) -> list[float]:
        """Train on one minibatch ``x0`` (on ``ctx.device``); return the loss of each update made."""

    # Hooks with diffusion defaults; consistency methods (models.train.consistency_methods) override them.

    def setup(self, net: nn.Module, schedule: Schedule, updates: int, fresh: bool) -> None:
        """Called once the network exists, before its EMA copy; ``fresh`` is False when resuming."""
        return None

    def served_header(self, header: CheckpointHeader) -> CheckpointHeader:
        """The served file's header for a model this method trained (kind, extra settings)."""
        return header

    def sampling(self, net: nn.Module, schedule: Schedule, steps: int) -> tuple[Denoiser, str, int]:
        """(denoiser, sampler, steps) for the checkpoint sample grid."""
        return EpsDenoiser(net, schedule), "ddim", steps

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs beyond the model, EMA and optimizer (e.g. a target network)."""
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""
        return None


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, options: dict[str, Any] | MethodOptions | None = None) -> Method:
    """Instantiate a registered method with validated options (raises KeyError / ValidationError)."""
    if name not in METHODS:
        raise KeyError(name)
    cls = METHODS[name]
    opts = options if isinstance(options, MethodOptions) else cls.Options.model_validate(options or {})
    return cls(opts)


# Shared pieces ---------------------------------------------------------------------------------


def rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row vector [B] reshaped to broadcast against ``like`` [B, ...], in its dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def draw_t_eps(ctx: StepContext, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training times (float64 [B], uniform over the DDPM steps) and the noise, from the CPU generator."""
    t = ctx.schedule.sample_train_t(x0.shape[0], generator=ctx.generator)
    eps = torch.randn(x0.shape, generator=ctx.generator).to(ctx.device)
    return t, eps


def coefs(ctx: StepContext, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, s_t) broadcastable against ``like``."""
    return rows(ctx.schedule.a(t), like), rows(ctx.schedule.s(t), like)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean()


# Methods ---------------------------------------------------------------------------------------


@register
class Standard(Method):
    """DDPM's eps loss ||eps_theta(a x0 + s eps, t) - eps||^2."""

    name = "standard"

    def step(self, ctx: StepContext, x0: torch.Tensor) -> list[float]:
        t, eps = draw_t_eps(ctx, x0)
        a, s = coefs(ctx, t, x0)
        loss = mse(ctx.eps(a * x0 + s * eps, t), eps)
        ctx.update(loss)
        return [float(loss.detach())]


B_MIN = 2 * 8 / 255  # the paper's 8/255 floor on the [0, 1] scale, in our [-1, 1] units (0.0627)


class EquivariantOptions(MethodOptions):
    """Seed A (REFERENCE section 2). Every radius is in noise units of w (pixel shift s_t * w).

    ``radius = "paper"`` (default): the box "roughly follows sqrt(1 - alphabar_t)" with an exponent
    rho and "a random bias term" with a minimum of 8/255 "so it does not vanish near t = 0":
    r(t) = r_max * s_t^rho + b, b ~ U[b_min, b_max] drawn per sample; b_min = 2 * 8/255 (the paper's
    8/255 on the [0, 1] scale is 16/255 on our [-1, 1] scale, taken as a noise-unit number like the
    paper's box on the noise). Larger boxes at high noise, small ones near t = 0.

    ``radius = "pixel-floor"``: the earlier rule, kept for comparison: r(t) = max(r_floor / s_t,
    r_scale), i.e. a pixel box max(r_floor, r_scale s_t); it is largest at *small* t (6.3 at t = 1).
    """

    lam: float = Field(
        0.3, ge=0.0, alias="lambda", description="weight lambda of the equivariance term (the paper: 0.3)"
    )
    lambda_t: Literal["constant", "noise"] = Field(
        "constant",
        description="'constant': lambda_t = lambda (the paper); 'noise': lambda_t = lambda * s_t^2 (less weight near t = 0)",
    )
    variant: Literal["random", "adversarial"] = Field(
        "adversarial", description="w drawn uniformly in the box, or one signed-gradient ascent step in it"
    )
    radius: Literal["paper", "pixel-floor"] = Field(
        "paper",
        description="box r(t) in noise units: 'paper' r_max*s_t^rho + U[b_min, b_max]; 'pixel-floor' "
        "max(r_floor/s_t, r_scale) (the earlier rule)",
    )
    r_max: float = Field(0.5, ge=0.0, description="paper: noise-unit box at s_t = 1 (before the bias)")
    rho: float = Field(2.0, ge=0.0, description="paper: exponent of s_t in the box")
    b_min: float = Field(
        B_MIN,
        ge=0.0,
        description="paper: least random bias, noise units (2*8/255: 8/255 on the [0, 1] scale)",
    )
    b_max: float = Field(2 * B_MIN, ge=0.0, description="paper: largest random bias, noise units")
    r_floor: float = Field(
        2 * 8 / 255, ge=0.0, description="pixel-floor: pixel-unit floor of the box ([-1, 1] scale)"
    )
    r_scale: float = Field(
        0.1,
        ge=0.0,
        description="pixel-floor: noise-unit box where it exceeds the floor (pixel radius r_scale*s_t)",
    )
    attack: Literal["output", "residual"] = Field(
        "output",
        description="adversarial: the ascent maximises J = ||eps(x_t + s_t w) - eps(x_t)||^2 ('output', the "
        "paper's) or the equivariance residual ||eps(x_t + s_t w) - eps(x_t) - w||^2 ('residual')",
    )
    adv_step: float = Field(
        1.0, ge=0.0, description="adversarial: signed-gradient step, as a fraction of r(t)"
    )
    stop_grad_anchor: bool = Field(True, description="treat eps_theta(x_t) in the target as a constant")
    target: Literal["equivariance", "invariance"] = Field(
        "equivariance", description="'invariance' is the naive ablation: target eps_theta(x_t) without + w"
    )

    @model_validator(mode="after")
    def _bias(self) -> EquivariantOptions:
        if self.b_max < self.b_min:
            raise ValueError(f"b_max ({self.b_max}) must be >= b_min ({self.b_min})")
        return self


def equivariance_residual(
    eps: Callable[[torch.Tensor], torch.Tensor], x_t: torch.Tensor, s: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """eps(x_t + s_t w) - (eps(x_t) + w): zero for an equivariant eps-model. For the exact denoiser of
    N(mu, v I) data it is (s_t^2 / (alphabar_t v + s_t^2) - 1) w (REFERENCE section 2)."""
    return eps(x_t + s * w) - (eps(x_t) + w)


@register
class EquivariantAT(Method):
    """eps loss + lambda_t ||eps_theta(x_t + s_t w) - (eps_theta(x_t) + w)||^2, w in a box of radius r(t)."""

    name = "equivariant-at"
    Options = EquivariantOptions
    options: EquivariantOptions

    def radius(self, s: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise-unit box r(t) for s_t broadcast as given; 'paper' draws its bias per row from ``generator``."""
        o = self.options
        if o.radius == "pixel-floor":
            return torch.maximum(o.r_floor / s, torch.full_like(s, o.r_scale))
        u = torch.rand(s.shape[0], generator=generator).to(device=s.device, dtype=s.dtype)
        bias = (o.b_min + (o.b_max - o.b_min) * u).reshape(s.shape[0], *([1] * (s.ndim - 1)))
        return o.r_max * s.pow(o.rho) + bias

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        """lambda_t per row (broadcast like ``s``)."""
        o = self.options
        return o.lam * s.pow(2) if o.lambda_t == "noise" else torch.full_like(s, o.lam)

    def residual(
        self,
        ctx: StepContext,
        x_t: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        w: torch.Tensor,
        anchor: torch.Tensor,
        *,
        sync: bool = True,
        target: Literal["equivariance", "invariance"] | None = None,
    ) -> torch.Tensor:
        """eps_theta(x_t + s_t w) minus its target: anchor + w (equivariance) or anchor (invariance)."""
        kind = target or self.options.target
        return ctx.eps(x_t + s * w, t, sync=sync) - (anchor + w if kind == "equivariance" else anchor)

    def step(self, ctx: StepContext, x0: torch.Tensor) -> list[float]:
        o = self.options
        t, eps = draw_t_eps(ctx, x0)
        a, s = coefs(ctx, t, x0)
        x_t = a * x0 + s * eps
        r = self.radius(s, ctx.generator)
        w = ((torch.rand(x0.shape, generator=ctx.generator) * 2 - 1).to(ctx.device)) * r
        out = ctx.eps(x_t, t)
        if o.variant == "adversarial":
            w = self.ascend(ctx, x_t, t, s, w, r, out.detach())
        residual = self.residual(ctx, x_t, t, s, w, out.detach() if o.stop_grad_anchor else out)
        penalty = (self.weight(s) * residual.pow(2)).mean()
        loss = mse(out, eps) + penalty
        ctx.update(loss)
        return [float(loss.detach())]

    def ascend(
        self,
        ctx: StepContext,
        x_t: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        anchor: torch.Tensor,
    ) -> torch.Tensor:
        """One signed-gradient step from ``w`` that increases the attack objective, projected back on the box.

        'output' (J of the paper) measures how far the prediction moves; 'residual' how far it is from
        moving by exactly w. The ablation's invariance target is attacked through its own residual.
        """
        o = self.options
        kind: Literal["equivariance", "invariance"] = (
            "invariance" if o.attack == "output" or o.target == "invariance" else "equivariance"
        )
        w = w.detach().requires_grad_(True)
        residual = self.residual(ctx, x_t, t, s, w, anchor, sync=False, target=kind)
        (g,) = torch.autograd.grad(residual.pow(2).sum(), w)
        return project_box(w.detach() + o.adv_step * r * g.sign(), r)


class DroOptions(MethodOptions):
    """Seed B (REFERENCE section 3). The ball has radius eta * sqrt(d) (pixel units, [-1, 1] scale).

    ``alpha_scale`` fixes the units of the ascent step: ``absolute`` (default) is the reference
    code's: an L2 step of length alpha, so ||delta|| <= alpha (m - 1) = 0.2 and the ball never binds;
    ``sqrt_d`` measures alpha like eta, an L2 step of alpha * sqrt(d) (per-coordinate RMS alpha),
    which for alpha = 0.1 makes delta / s_t in the target ~10 noise units per coordinate at the
    smallest t. With ``norm = linf`` the step is alpha * sign(g) and the box is [-eta, eta].
    """

    m: int = Field(3, ge=1, description="replays (parameter updates) per minibatch; the first is clean")
    alpha: float = Field(0.1, ge=0.0, description="ascent step size")
    eta: float = Field(0.1, ge=0.0, description="radius: eta * sqrt(d) in L2, eta per coordinate in Linf")
    norm: Literal["l2", "linf"] = Field(
        "l2", description="the perturbation set: L2 ball (seed B) or Linf box"
    )
    alpha_scale: Literal["absolute", "sqrt_d"] = Field(
        "absolute", description="units of alpha: an L2 step of alpha (reference code), or of alpha sqrt(d)"
    )


@register
class DroAT(Method):
    """Free adversarial training by minibatch replay on l(delta) = ||eps_theta(x_t + delta) - (eps + delta/s_t)||^2."""

    name = "dro-at"
    Options = DroOptions
    options: DroOptions

    def step(self, ctx: StepContext, x0: torch.Tensor) -> list[float]:
        o = self.options
        t, eps = draw_t_eps(ctx, x0)
        a, s = coefs(ctx, t, x0)
        x_t = a * x0 + s * eps
        d = x0[0].numel()
        delta = torch.zeros_like(x0)
        losses = []
        for _ in range(min(o.m, ctx.remaining())):
            delta.requires_grad_(True)
            loss = mse(ctx.eps(x_t + delta, t), eps + delta.detach() / s)
            ctx.update(loss)
            losses.append(float(loss.detach()))
            g = delta.grad
            assert g is not None
            delta = self.ascend(delta.detach(), g, d)
        return losses

    def ascend(self, delta: torch.Tensor, g: torch.Tensor, d: int) -> torch.Tensor:
        """delta + alpha * (per-sample) normalised gradient, projected back on the ball."""
        o = self.options
        if o.norm == "linf":
            return project_box(delta + o.alpha * g.sign(), torch.full_like(delta, o.eta))
        step = o.alpha * (math.sqrt(d) if o.alpha_scale == "sqrt_d" else 1.0)
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        return project_l2(delta + step * g / rows(norm, g), o.eta * math.sqrt(d))


class InputPerturbationOptions(MethodOptions):
    gamma: float = Field(0.1, ge=0.0, description="ADM-IP: x_t' = a x0 + s (eps + gamma xi), target eps")


@register
class InputPerturbation(Method):
    """ADM-IP baseline: perturb the network input with fresh Gaussian noise, keep the target."""

    name = "input-perturbation"
    Options = InputPerturbationOptions
    options: InputPerturbationOptions

    def step(self, ctx: StepContext, x0: torch.Tensor) -> list[float]:
        t, eps = draw_t_eps(ctx, x0)
        a, s = coefs(ctx, t, x0)
        xi = torch.randn(x0.shape, generator=ctx.generator).to(ctx.device)
        loss = mse(ctx.eps(a * x0 + s * (eps + self.options.gamma * xi), t), eps)
        ctx.update(loss)
        return [float(loss.detach())]


# Projections -----------------------------------------------------------------------------------


def project_box(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Clamp every coordinate to [-r, r] (r broadcastable)."""
    return torch.maximum(torch.minimum(w, r), -r)


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each row of ``delta`` back onto the L2 ball of ``radius`` where it lies outside."""
    norm = delta.flatten(1).norm(dim=1)
    scale = (radius / norm.clamp_min(1e-12)).clamp(max=1.0)
    return delta * rows(scale, delta)


from models.train import consistency_methods  # noqa: E402, F401  (registers cd, ct, cd-at, ct-at)
