"""Samplers: one signature, one loop, one fused update per step.

``sampler(denoiser, x, ts, noise, *, callback=None, cancel=None, **options) -> x0``

``ts`` is a decreasing grid of VP times ending at 0 (NFE = len(ts) - 1). Every sampler differs only
in the per-row coefficients (p, q, r, n) of the update

    x0 = kx * x + km * out                     (the denoiser's read-out, optionally clipped)
    x_next = p * x + q * x0 + r * x0_prev + n * z(seed, step)

which ``kernels.sampler_update`` computes in one kernel on the GPU. Coefficients come from host
float64 tables, built once per (sampler, read-out, grid, eta, device) and kept on the device in
``PLANS``, so a step never synchronises with the device and a repeated request rebuilds nothing.

The loop is a ``RunningBatch``: rows of different requests (sampler, grid, eta, start time) may sit
at different steps, each reading its own coefficients, time and noise stream; a whole-batch call
is the batch with one group, so the worker's step-level engine and the library share every step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from kernels import sampler_update
from models.denoisers import ConsistencyDenoiser, Denoiser
from models.noise import NoiseSource
from models.sampling_spec import (
    CONSISTENCY_SAMPLERS,
    DIFFUSION_SAMPLERS,
    ETA_SAMPLERS,
    DdimEps,
    check_ddim_eps,
)

__all__ = ["CONSISTENCY_SAMPLERS", "DIFFUSION_SAMPLERS", "ETA_SAMPLERS", "RULES", "SAMPLERS", "RunningBatch"]

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


def _ddim_model_eps(
    denoiser: Denoiser, t: torch.Tensor, s: torch.Tensor, t_prev: torch.Tensor | None, eta: float
) -> tuple[torch.Tensor, ...]:
    """DDIM with the network's own eps even after x0 is clipped (diffusers' default,
    ``use_clipped_model_output=False``): x_next = a_s x0_clipped + c eps_raw + sigma z with
    eps_raw = ((1 - a_t kx) x - a_t km out) / s_t. The ``out`` term rides in the r slot (``OUTPUT_R_RULES``)."""
    sch = denoiser.schedule
    ab_t, ab_s = sch.alphabar(t), sch.alphabar(s)
    a_t, s_t, a_s = ab_t.sqrt(), (1 - ab_t).sqrt(), ab_s.sqrt()
    sigma = eta * torch.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    c = torch.sqrt((1 - ab_s - sigma**2).clamp(min=0))
    kx, km = denoiser.x0_coefs(t)
    return c * (1 - a_t * kx) / s_t, a_s, -c * a_t * km / s_t, sigma


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
    std = denoiser.renoise_std(s) if isinstance(denoiser, ConsistencyDenoiser) else sch.s(s)
    return zero, sch.a(s), zero, std


RULES: dict[str, StepRule] = {
    "ddpm": _ddpm,
    "ddim": _ddim,
    "dpm-solver++": _dpmpp_2m,
    "consistency": _consistency,
    "ddim-model-eps": _ddim_model_eps,  # ddim with ddim_eps="model", not a sampler name of its own
}
OUTPUT_R_RULES = ("ddim-model-eps",)
"""Rules whose r coefficient multiplies the network's raw output instead of the previous x0."""


def rule_for(sampler: str, ddim_eps: DdimEps = "from-x0") -> str:
    """The update rule a sampler runs with ``ddim_eps`` (checked: ``model`` is for ddim only)."""
    check_ddim_eps(ddim_eps, sampler)
    return "ddim-model-eps" if ddim_eps == "model" else sampler


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
    ddim_eps: DdimEps = "from-x0",
) -> torch.Tensor:
    """The whole-batch sampler loop: a running batch holding one group. Returns the final x0
    estimate (the image).

    ``ddim_eps`` (ddim only): ``from-x0`` steps along the eps implied by the (clipped) x0, DDIM's own
    update (diffusers' ``use_clipped_model_output=True``); ``model`` keeps the network's eps
    (diffusers' default). Without clipping the two are the same update.
    """
    if eta < 0:
        raise ValueError("eta must be >= 0")
    rule = rule_for(rule, ddim_eps)
    batch = RunningBatch(denoiser, clip_x0=clip_x0)
    group = Group(None, PLANS.get(rule, denoiser, ts, eta, x.device), noise.seeds_device, denoiser.labels)
    batch.add(group, x)
    for i in range(group.steps):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled before step {i} of {group.steps}")
        batch.step()
        if callback is not None:
            callback(i + 1, group.steps)
    return batch.remove(None)


@dataclass
class Group:
    """One request's rows in a running batch: one sampler plan and step index, a seed per row."""

    key: Hashable
    plan: SamplerPlan
    seeds: torch.Tensor  # int64 [n] on the device
    labels: torch.Tensor | None = None
    step: int = 0

    @property
    def rows(self) -> int:
        return int(self.seeds.shape[0])

    @property
    def steps(self) -> int:
        return len(self.plan.uses_prev)

    @property
    def done(self) -> bool:
        return self.step >= self.steps


class RunningBatch:
    """Rows of any sampler, grid, eta and start time (sample or purify), each at its own step,
    advanced together by one network evaluation per ``step``.

    Every row reads its own time, coefficients and noise stream (its own step index), and keeps its
    own x0 history (DPM-Solver++), so a row's bits never depend on which rows share the batch when
    the network evaluation is batch-invariant (the CPU path). The whole-batch loop ``run_sampler``
    is this with a single group; the worker adds and removes groups between steps.
    """

    def __init__(self, denoiser: Denoiser, *, clip_x0: bool = True) -> None:
        self.denoiser = denoiser
        self.clip_x0 = clip_x0
        self.groups: list[Group] = []
        self.x: torch.Tensor | None = None
        self.x0: torch.Tensor | None = None  # each row's previous x0 estimate

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def add(self, group: Group, x: torch.Tensor) -> None:
        """Rows join at their start state ``x`` (pure noise, or the diffused input to purify)."""
        if any(g.key == group.key for g in self.groups):
            raise ValueError(f"group {group.key!r} is already running")
        if x.shape[0] != group.rows:
            raise ValueError("one start row per seed is needed")
        if self.groups and (group.labels is None) != (self.groups[0].labels is None):
            raise ValueError("a running batch's rows all have labels or none has")
        self.groups.append(group)
        zeros = torch.zeros_like(x)
        self.x = x if self.x is None else torch.cat([self.x, x])
        self.x0 = zeros if self.x0 is None else torch.cat([self.x0, zeros])

    def _span(self, key: Hashable) -> tuple[int, int, Group]:
        start = 0
        for g in self.groups:
            if g.key == key:
                return start, start + g.rows, g
            start += g.rows
        raise KeyError(key)

    def remove(self, key: Hashable) -> torch.Tensor:
        """Take a group's rows out; returns their current x (the image, once the group is done)."""
        start, end, group = self._span(key)
        assert self.x is not None and self.x0 is not None
        out = self.x[start:end]
        if self.clip_x0 and group.done:
            out = out.clamp(-1.0, 1.0)
        self.groups.remove(group)
        if self.groups:
            self.x = torch.cat([self.x[:start], self.x[end:]])
            self.x0 = torch.cat([self.x0[:start], self.x0[end:]])
        else:
            self.x = self.x0 = None
        return out

    def step(self, keys: Collection[Hashable] | None = None) -> None:
        """One network evaluation on the rows of the groups ``keys`` (default: every group), each at
        its own time, then each row's own update. The other groups' rows wait, untouched: a row's
        result depends only on its own seed and step, so waiting never changes an image."""
        if any(g.done for g in self.groups):
            raise RuntimeError("a finished group must be removed before the next step")
        if not self.groups or self.x is None or self.x0 is None:
            return
        groups, index = self.groups, None
        if keys is not None:
            wanted = set(keys)
            unknown = wanted - {g.key for g in self.groups}
            if unknown:
                raise KeyError(f"not running: {sorted(map(str, unknown))}")
            if len(wanted) < len(self.groups):  # gather the chosen rows, scatter their update back
                groups, spans, start = [], [], 0
                for g in self.groups:
                    if g.key in wanted:
                        groups.append(g)
                        spans.append(torch.arange(start, start + g.rows))
                    start += g.rows
                if not groups:
                    return
                index = torch.cat(spans).to(self.x.device)
        x = self.x if index is None else self.x.index_select(0, index)
        x0 = self.x0 if index is None else self.x0.index_select(0, index)
        timesteps = torch.cat([g.plan.timesteps[g.step].expand(g.rows) for g in groups])
        coefs = torch.cat([g.plan.coefs[g.step].expand(g.rows, 6) for g in groups])
        labels = None
        if groups[0].labels is not None:
            labels = torch.cat([g.labels for g in groups if g.labels is not None])
        uses_prev = any(g.plan.uses_prev[g.step] or g.plan.r_on_output for g in groups)
        uses_noise = any(g.plan.uses_noise[g.step] for g in groups)
        streams = {NoiseSource.step_stream(g.step) for g in groups}
        stream: int | torch.Tensor = next(iter(streams))
        if len(streams) > 1:
            stream = torch.cat([torch.full((g.rows,), NoiseSource.step_stream(g.step)) for g in groups])
        out = self.denoiser.with_labels(labels).forward(x, timesteps)
        prev = x0
        if any(g.plan.r_on_output for g in groups):  # these rows' r term reads the network output
            parts, start = [], 0
            for g in groups:
                parts.append((out if g.plan.r_on_output else x0)[start : start + g.rows])
                start += g.rows
            prev = torch.cat(parts)
        x, x0 = sampler_update(
            x,
            out,
            coefs,
            x0_prev=prev if uses_prev else None,
            seeds=torch.cat([g.seeds for g in groups]) if uses_noise else None,
            stream=stream,
            clip_x0=self.clip_x0,
        )
        if index is None:
            self.x, self.x0 = x, x0
        else:
            self.x, self.x0 = self.x.index_copy(0, index, x), self.x0.index_copy(0, index, x0)
        for g in groups:
            g.step += 1


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


@dataclass(frozen=True)
class SamplerPlan:
    """What one sampler needs on the device for one time grid: read-only, shared by every call."""

    coefs: torch.Tensor  # float32 [steps, 6] (kx, km, p, q, r, n)
    timesteps: torch.Tensor  # the network's timestep index of every step
    uses_prev: tuple[bool, ...]
    uses_noise: tuple[bool, ...]
    r_on_output: bool = False  # r multiplies the network output, not x0_prev (OUTPUT_R_RULES)


class PlanCache:
    """Plans by (rule, denoiser read-out, grid, eta, device), least recently used dropped first.

    Building a plan costs a few host tensor ops per step (8 ms for DDIM 10 on a busy CPU core) and
    two host-to-device copies; a served request repeats the same few (sampler, steps, t*), so only
    the first call of each pays. Bounded because t* and the step count come from requests.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._plans: OrderedDict[tuple[Hashable, ...], SamplerPlan] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        """Forget every plan (benchmarks time the cold path with it)."""
        with self._lock:
            self._plans.clear()

    def get(
        self, rule: str, denoiser: Denoiser, ts: torch.Tensor, eta: float, device: torch.device
    ) -> SamplerPlan:
        ts, device = torch.as_tensor(ts, dtype=torch.float64, device="cpu").contiguous(), torch.device(device)
        key = (rule, denoiser.readout_key(), ts.numpy().tobytes(), float(eta), device)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        # Plain tensors even when built in inference mode: a served grid may later be differentiated.
        with torch.inference_mode(False), torch.no_grad():
            plan = self._build(rule, denoiser, ts.clone(), eta, device)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

    @staticmethod
    def _build(
        rule: str, denoiser: Denoiser, ts: torch.Tensor, eta: float, device: torch.device
    ) -> SamplerPlan:
        if rule not in RULES:
            raise ValueError(f"unknown sampler {rule!r}; known: {', '.join(RULES)}")
        if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()) or float(ts[-1]) != 0.0:
            raise ValueError("ts must be a strictly decreasing 1-D time grid ending at 0")
        table = coefficient_table(rule, denoiser, ts, eta)
        return SamplerPlan(
            coefs=table.to(device=device, dtype=torch.float32),
            timesteps=denoiser.schedule.net_time(ts[:-1]).to(device),
            uses_prev=tuple((table[:, 4] != 0).tolist()),
            uses_noise=tuple((table[:, 5] != 0).tolist()),
            r_on_output=rule in OUTPUT_R_RULES,
        )


PLANS = PlanCache()
"""The process's plan cache (one per worker process)."""


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
        ddim_eps: DdimEps = "from-x0",
    ) -> torch.Tensor:
        return run_sampler(
            rule,
            denoiser,
            x,
            ts,
            noise,
            callback=callback,
            cancel=cancel,
            eta=eta,
            clip_x0=clip_x0,
            ddim_eps=ddim_eps,
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
