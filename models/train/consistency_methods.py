"""Consistency-model training methods: ``cd``, ``ct``, ``cd-at`` and ``ct-at`` (models.consistency).

They plug into the same loop as the diffusion methods: the network the trainer builds is the
consistency function's F (the student), ``ctx.eps`` evaluates it, ``ctx.update`` spends an update.
CD loads a served diffusion checkpoint as teacher (same UNet and schedule) and, by default, starts
the student as the teacher's denoiser: with ``parameterization = eps`` (f = x/a - (sigma - sigma_min)
F) a plain copy is exactly x - sigma eps_teacher at every noise level; with EDM's c_skip / c_out the
copy has its output layer negated, which matches the denoiser only to first order near sigma_min
(at sigma = 0.33, t* = 0.1, f starts as 0.7 x0 - 0.04 eps: a poor purifier). The exported file has
kind = consistency with sigma_min, sigma_max, sigma_data, the parameterization and the teacher's
content hash in its header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from models.checkpoint import CheckpointHeader, load_checkpoint, read_header
from models.consistency import (
    ConsistencyObjective,
    ConsistencyOptions,
    RawFn,
    ReplayOptions,
    Solver,
    TargetNetwork,
)
from models.denoisers import ConsistencyDenoiser, Denoiser
from models.errors import CheckpointError, UserError
from models.schedules import Schedule
from models.train.methods import Method, MethodOptions, StepContext, register


class CTOptions(MethodOptions, ConsistencyOptions):
    """CT without a teacher, improved-CT practice: doubling curriculum, lognormal n, 1/dsigma weights."""

    curriculum: Literal["fixed", "ict"] = Field("ict", description="fixed N, or iCT's doubling of N")
    noise_sampling: Literal["uniform", "lognormal"] = Field("lognormal", description="how n is drawn")
    weighting: Literal["uniform", "ict"] = Field("ict", description="lambda(n): 1 or 1/(sigma_{n+1}-sigma_n)")


class CDOptions(MethodOptions, ConsistencyOptions):
    """CD from a served diffusion checkpoint (Song et al. 2023 defaults: N = 18, Heun, target EMA 0.95)."""

    teacher: str = Field(
        description="path of the teacher: a diffusion checkpoint with the same UNet and schedule"
    )
    solver: Solver = Field("heun", description="teacher ODE step: ddim (= Euler in sigma) or heun")
    teacher_init: Literal["denoiser", "weights", "none"] = Field(
        "denoiser",
        description="student start: as the teacher's denoiser ('denoiser': with parameterization eps a plain "
        "copy, exact at every noise level; with edm the copy with its output layer negated, so that "
        "F = -eps_teacher and f = x - sigma eps_teacher + O(sigma^2) only near sigma_min); "
        "the teacher's weights as they are ('weights'); or a random init ('none')",
    )
    target_ema: float = Field(
        0.95, ge=0.0, lt=1.0, description="target network EMA decay (0: sg of the student)"
    )

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str) -> str:
        try:
            header = read_header(v)
        except CheckpointError as err:
            raise ValueError(err.reason) from err
        if header.kind != "diffusion":
            raise ValueError(f"{v} is a {header.kind} checkpoint; the teacher must be a diffusion model")
        return v


class CTATOptions(CTOptions, ReplayOptions):
    """CT with seed B's AT on the student input."""


class CDATOptions(CDOptions, ReplayOptions):
    """CD with seed B's AT on the student input (``perturb_teacher``: the teacher step too)."""


CORE_FIELDS = set(ConsistencyOptions.model_fields)
REPLAY_FIELDS = set(ReplayOptions.model_fields)


class _Consistency(Method):
    """Shared machinery: the objective, the optional EMA target network, the consistency header."""

    options: CTOptions | CDOptions

    def __init__(self, options: MethodOptions) -> None:
        super().__init__(options)
        self.objective: ConsistencyObjective | None = None
        self.target: TargetNetwork | None = None
        self.net: nn.Module | None = None
        self.total_updates = 0

    def core(self) -> ConsistencyOptions:
        return ConsistencyOptions.model_validate(self.options.model_dump(include=CORE_FIELDS))

    def replay(self) -> ReplayOptions | None:
        if not isinstance(self.options, ReplayOptions):
            return None
        return ReplayOptions.model_validate(self.options.model_dump(include=REPLAY_FIELDS))

    def teacher(self, net: nn.Module, schedule: Schedule, fresh: bool) -> nn.Module | None:
        return None

    def teacher_hash(self) -> str | None:
        return None

    def setup(self, net: nn.Module, schedule: Schedule, updates: int, fresh: bool) -> None:
        teacher = self.teacher(net, schedule, fresh)
        core = self.core()
        solver: Solver = self.options.solver if isinstance(self.options, CDOptions) else "heun"
        self.objective = ConsistencyObjective(core, schedule, teacher, solver, self.replay(), updates)
        self.target = TargetNetwork(net, core.target_ema) if core.target_ema > 0 else None
        self.net = net
        self.total_updates = updates

    def step(self, ctx: StepContext, x0: torch.Tensor) -> list[float]:
        if self.objective is None or self.net is None:
            raise RuntimeError(f"method {self.name!r} was not set up (Method.setup) before its first step")
        net, target = self.net, self.target

        def update(loss: torch.Tensor) -> None:
            ctx.update(loss)
            if target is not None:
                target.update(net)

        def student(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return ctx.eps(x, t)

        def sg_student(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return ctx.eps(x, t, sync=False)

        target_fn: RawFn = sg_student
        if target is not None:
            target.module.train(net.training)
            target_fn = _raw(target.module, ctx.schedule)
        done = self.total_updates - ctx.remaining()
        return self.objective.step(
            x0, student, update, ctx.generator, done, target=target_fn, max_updates=ctx.remaining()
        )

    def served_header(self, header: CheckpointHeader) -> CheckpointHeader:
        schedule = Schedule(header.schedule)
        objective = ConsistencyObjective(self.core(), schedule)
        return header.model_copy(
            update={"kind": "consistency", "consistency": objective.config(self.teacher_hash())}
        )

    def sampling(self, net: nn.Module, schedule: Schedule, steps: int) -> tuple[Denoiser, str, int]:
        o = self.options
        den = ConsistencyDenoiser(net, schedule, None, o.sigma_min, o.sigma_data, o.parameterization)
        return den, "consistency", 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.target is None:
            return {}
        return {f"target.{k}": v for k, v in self.target.module.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.target is None:
            return
        state = {k.removeprefix("target."): v for k, v in tensors.items() if k.startswith("target.")}
        if not state:
            raise UserError("resume", f"the checkpoint has no target network for method {self.name!r}")
        self.target.module.load_state_dict(state)


def _raw(module: nn.Module, schedule: Schedule) -> RawFn:
    def raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep = schedule.net_time(t).to(x.device)
        if x.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return module(x, timestep).float()
        return module(x, timestep)

    return raw


class _Distillation(_Consistency):
    options: CDOptions

    def teacher(self, net: nn.Module, schedule: Schedule, fresh: bool) -> nn.Module:
        o = self.options
        device = next(net.parameters()).device
        teacher, header = load_checkpoint(o.teacher, device)
        student_cfg = getattr(net, "cfg", None)
        dropout = getattr(student_cfg, "dropout", 0.0)  # a training-only knob: the student may use its own
        if header.model.model_copy(update={"dropout": dropout}) != student_cfg:
            raise UserError("preset", f"the student's UNet must match the teacher's ({Path(o.teacher).name})")
        if header.schedule != schedule.config:
            raise UserError("schedule", f"the schedule must match the teacher's ({Path(o.teacher).name})")
        if fresh and o.teacher_init != "none":
            net.load_state_dict(teacher.state_dict())
            if o.teacher_init == "denoiser" and o.parameterization == "edm":
                with torch.no_grad():
                    for p in net.get_submodule("conv_out").parameters():
                        p.neg_()
        return teacher.eval().requires_grad_(False)

    def teacher_hash(self) -> str | None:
        return read_header(self.options.teacher).content_hash


@register
class ConsistencyTraining(_Consistency):
    """CT: x_hat_{t_n} = x0 + sigma_n z with the student's own z (no teacher)."""

    name = "ct"
    Options = CTOptions


@register
class ConsistencyTrainingAT(_Consistency):
    """CT with seed B's free AT: the student sees x_{t_{n+1}} + delta, ||delta|| <= eta sqrt(d)."""

    name = "ct-at"
    Options = CTATOptions


@register
class ConsistencyDistillation(_Distillation):
    """CD: x_hat_{t_n} is the teacher's ODE step (DDIM or Heun) from x_{t_{n+1}}."""

    name = "cd"
    Options = CDOptions


@register
class ConsistencyDistillationAT(_Distillation):
    """CD with seed B's free AT: the student sees x_{t_{n+1}} + delta, ||delta|| <= eta sqrt(d)."""

    name = "cd-at"
    Options = CDATOptions
