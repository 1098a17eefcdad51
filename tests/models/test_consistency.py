"""Consistency-model maths: the boundary condition, c_skip / c_out, the discretisation and curriculum,
the teacher step, the distance, seed B's perturbation ball, and CD on Gaussian data with an exact
teacher (the learned one-step map must reproduce the data's mean and variance)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.consistency import (
    ConsistencyObjective,
    ConsistencyOptions,
    ReplayOptions,
    Solver,
    TargetNetwork,
    ict_num_levels,
    karras_sigmas,
    lognormal_interval_probs,
    project_l2,
    pseudo_huber,
    teacher_ode_step,
)
from models.denoisers import ConsistencyDenoiser, Denoiser, Parameterization
from models.generate import generate
from models.noise import NoiseSource
from models.pipeline import Pipeline
from models.samplers import RULES
from models.schedules import Schedule, time_grid
from models.testing import GaussianEps, gaussian_denoiser, tiny_checkpoint

MU, V = 0.5, 0.25


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def huge_net(x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    return 1e4 * torch.sin(x) + 1e3


@pytest.mark.parametrize("parameterization", ["edm", "eps"])
def test_boundary_condition_is_exact_at_sigma_min(parameterization: Parameterization) -> None:
    sch = Schedule()
    den = ConsistencyDenoiser(
        huge_net, sch, sigma_min=0.002, sigma_data=0.5, parameterization=parameterization
    )
    c_skip, c_out = den.c_skip_out(torch.tensor([0.002], dtype=torch.float64))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # At t_min (the VP time of sigma_min) the network's output cannot move f off x / a, however large.
    t_min = sch.t_from_sigma(torch.full((3,), 0.002, dtype=torch.float64))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    f = den.x0(x, t_min)
    expected = x / sch.a(t_min).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(f, expected, rtol=1e-9, atol=1e-9)


def test_c_skip_c_out_match_the_formulas() -> None:
    sch = Schedule()
    sd, smin = 0.5, 0.002
    den = ConsistencyDenoiser(huge_net, sch, sigma_min=smin, sigma_data=sd)
    sigma = torch.tensor([0.002, 0.01, 0.3, 1.0, 5.0, 80.0, 157.0], dtype=torch.float64)
    c_skip, c_out = den.c_skip_out(sigma)
    torch.testing.assert_close(c_skip, sd**2 / ((sigma - smin) ** 2 + sd**2), rtol=0, atol=0)
    torch.testing.assert_close(c_out, (sigma - smin) * sd / torch.sqrt(sigma**2 + sd**2), rtol=0, atol=0)
    eps = ConsistencyDenoiser(huge_net, sch, sigma_min=smin, sigma_data=sd, parameterization="eps")
    e_skip, e_out = eps.c_skip_out(sigma)
    assert torch.equal(e_skip, torch.ones_like(sigma)) and torch.equal(e_out, smin - sigma)
    # In VP coordinates f = c_skip x / a + c_out F: the read-out coefficients are (c_skip / a, c_out).
    t = sch.t_from_sigma(sigma[1:])
    kx, km = den.x0_coefs(t)
    cs, co = den.c_skip_out(sch.sigma(t))
    torch.testing.assert_close(kx, cs / sch.a(t))
    torch.testing.assert_close(km, co)


def test_karras_discretisation_and_ict_curriculum() -> None:
    s = karras_sigmas(18, 0.002, 80.0)
    assert float(s[0]) == 0.002 and float(s[-1]) == 80.0 and bool((s[1:] > s[:-1]).all())
    mid = (0.002 ** (1 / 7) + 0.5 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(karras_sigmas(3, 0.002, 80.0)[1], torch.tensor(mid, dtype=torch.float64))
    # iCT: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)); K = 8000 -> K' = 1000.
    assert [ict_num_levels(k, 8000) for k in (0, 999, 1000, 2000, 6999, 7000, 7999)] == [
        11,
        11,
        21,
        41,
        641,
        1281,
        1281,
    ]
    probs = lognormal_interval_probs(karras_sigmas(11, 0.002, 80.0))
    assert probs.shape == (10,) and bool((probs > 0).all())
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    # The lognormal (P_mean = -1.1) puts most mass on the middle noise levels, not the ends.
    assert int(probs.argmax()) not in (0, 9)


def test_pseudo_huber() -> None:
    x, y = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    c = 0.00054 * 8.0
    expected = torch.sqrt((x - y).flatten(1).square().sum(1) + c * c) - c
    torch.testing.assert_close(pseudo_huber(x, y), expected)
    assert torch.equal(pseudo_huber(x, x), torch.zeros(5))


def test_ddim_teacher_step_is_the_ddim_sampler_step() -> None:
    """Euler in sigma on the eps-teacher in VE coordinates is the DDIM (eta = 0) sampler's step in VP."""
    teacher = gaussian_denoiser(MU, V)
    sch = teacher.schedule
    t_hi, t_lo = torch.full((4,), 0.6, dtype=torch.float64), torch.full((4,), 0.35, dtype=torch.float64)
    x_vp = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    rows = (-1, 1, 1, 1)
    x_ve = x_vp / sch.a(t_hi).reshape(rows)
    ours = teacher_ode_step(teacher, x_ve, sch.sigma(t_hi), sch.sigma(t_lo), "ddim", t_hi, t_lo)
    p, q, _, n = RULES["ddim"](teacher, t_hi, t_lo, None, 0.0)
    kx, km = teacher.x0_coefs(t_hi)
    x0 = kx.reshape(rows) * x_vp + km.reshape(rows) * teacher(x_vp, t_hi)
    sampler_step = p.reshape(rows) * x_vp + q.reshape(rows) * x0
    assert bool((n == 0).all())
    torch.testing.assert_close(ours * sch.a(t_lo).reshape(rows), sampler_step, rtol=1e-9, atol=1e-9)


def test_teacher_steps_converge_to_the_exact_gaussian_flow_at_their_order() -> None:
    """For N(mu, v) data the PF-ODE keeps (x_ve - mu) / sqrt(v + sigma^2) constant; halving the step
    divides the one-step error by ~4 for Euler (DDIM) and by ~8 for Heun."""
    teacher = gaussian_denoiser(MU, V)
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64) * 3 + MU
    hi = torch.full((6,), 2.0, dtype=torch.float64)
    errors: dict[str, list[float]] = {"ddim": [], "heun": []}
    for h in (0.4, 0.2):
        exact = MU + (x - MU) * math.sqrt((V + (2.0 - h) ** 2) / (V + 2.0**2))
        solver: Solver
        for solver in ("ddim", "heun"):
            step = teacher_ode_step(teacher, x, hi, hi - h, solver)
            errors[solver].append(float((step - exact).abs().max()))
    assert 3.0 < errors["ddim"][0] / errors["ddim"][1] < 5.0, errors
    assert 6.0 < errors["heun"][0] / errors["heun"][1] < 10.0, errors
    assert errors["heun"][1] < errors["ddim"][1] / 4


class Recorder:
    """A raw network that is a scaled identity with one parameter, recording every input it sees."""

    def __init__(self) -> None:
        self.w = nn.Parameter(torch.tensor(0.3))
        self.inputs: list[torch.Tensor] = []
        self.times: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.inputs.append(x.detach().clone())
            self.times.append(t.detach().clone())
        return self.w * x


@pytest.mark.parametrize(("m", "alpha", "eta"), [(3, 0.1, 0.1), (5, 10.0, 0.02)])
def test_replay_spends_m_updates_and_keeps_delta_in_the_ball(m: int, alpha: float, eta: float) -> None:
    sch = Schedule()
    obj = ConsistencyObjective(ConsistencyOptions(), sch, replay=ReplayOptions(m=m, alpha=alpha, eta=eta))
    net = Recorder()
    opt = torch.optim.SGD([net.w], lr=1e-3)
    calls: list[float] = []

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        opt.step()
        calls.append(float(loss.detach()))

    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    losses = obj.step(x0, net, update, torch.Generator().manual_seed(0), 0)
    assert len(losses) == len(calls) == m
    clean = net.inputs[0]
    radius = eta * math.sqrt(64)
    norms = [float((x - clean).flatten(1).norm(dim=1).max()) for x in net.inputs[1:]]
    assert all(n <= radius * (1 + 1e-5) for n in norms)
    assert all(n > 0 for n in norms)  # every replay after the first, the last included, sees delta
    if alpha * (m - 1) > radius:  # a large step reaches the ball's surface, and projection holds it there
        assert norms[-1] == pytest.approx(radius, rel=1e-5)
    # A capped budget stops the replay early (the trainer's remaining updates).
    assert len(obj.step(x0, net, update, torch.Generator().manual_seed(0), 0, max_updates=2)) == min(m, 2)


def test_a_noise_scaled_ball_measures_delta_in_each_samples_noise_std() -> None:
    """ball_scale = noise: ||delta_i|| <= eta sqrt(d) s(t_i), reached with a large step; 0 at t_min."""
    sch = Schedule()
    replay = ReplayOptions(m=3, alpha=50.0, eta=0.05, ball_scale="noise")
    obj = ConsistencyObjective(ConsistencyOptions(n_steps=6), sch, replay=replay)
    net = Recorder()
    opt = torch.optim.SGD([net.w], lr=1e-3)

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        opt.step()

    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    obj.step(x0, net, update, torch.Generator().manual_seed(0), 0)
    noise_std = sch.s(net.times[0].double()).float()
    norms = (net.inputs[-1] - net.inputs[0]).flatten(1).norm(dim=1)
    assert torch.allclose(norms, 0.05 * 8 * noise_std, rtol=1e-4)
    assert len(set(noise_std.tolist())) > 2  # several noise levels, so the check is per sample


def test_perturb_teacher_moves_the_target_only_when_asked() -> None:
    sch = Schedule()
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    targets: dict[bool, list[torch.Tensor]] = {}
    for flag in (False, True):
        obj = ConsistencyObjective(ConsistencyOptions(), sch, replay=ReplayOptions(m=3, perturb_teacher=flag))
        net = Recorder()
        seen: list[torch.Tensor] = []

        def target(
            x: torch.Tensor, t: torch.Tensor, net: Recorder = net, seen: list[torch.Tensor] = seen
        ) -> torch.Tensor:
            seen.append(x.clone())
            return net.w.detach() * x

        obj.step(x0, net, lambda loss: loss.backward(), torch.Generator().manual_seed(1), 0, target=target)
        targets[flag] = seen
    assert all(torch.equal(targets[False][0], x) for x in targets[False])
    assert not torch.equal(targets[True][0], targets[True][2])


def test_target_network_is_an_ema() -> None:
    student = nn.Linear(2, 2)
    target = TargetNetwork(student, 0.9)
    copy = target.module
    assert isinstance(copy, nn.Linear)
    before = copy.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    target.update(student)
    torch.testing.assert_close(copy.weight, 0.9 * before + 0.1 * student.weight.detach())
    assert not any(p.requires_grad for p in target.module.parameters())


class GaussianMLP(nn.Module):
    """A small MLP consistency network for element-wise Gaussian data: F = A(c) x + B(c), c = log(sigma) / 4."""

    def __init__(self, schedule: Schedule, width: int = 64) -> None:
        super().__init__()
        self.schedule = schedule
        self.mlp = nn.Sequential(
            nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = (timestep.double() + 1.0) / self.schedule.T
        c = (self.schedule.sigma(t).log() / 4).float()
        ab = self.mlp(c[:, None]).reshape(-1, 2, *([1] * (x.ndim - 1)))
        return ab[:, 0] * x + ab[:, 1]


@pytest.mark.slow
def test_cd_with_an_exact_gaussian_teacher_learns_the_one_step_map() -> None:
    """iCT recipe (pseudo-Huber, 1/dsigma weights, doubling curriculum to N = 41) with a Heun step on
    the exact eps of N(0.5, 0.25): one- and two-step consistency samples reproduce mean and variance."""
    torch.manual_seed(0)
    sch = Schedule()
    steps = 2500
    opts = ConsistencyOptions(curriculum="ict", s0=10, s1=40, weighting="ict")
    obj = ConsistencyObjective(opts, sch, GaussianEps(sch, MU, V), "heun", total_updates=steps)
    net = GaussianMLP(sch)
    ema = TargetNetwork(net, 0.98)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)

    def raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, sch.net_time(t))

    g = torch.Generator().manual_seed(0)
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * k / steps))
        x0 = MU + math.sqrt(V) * torch.randn(512, 16, 1, 1, generator=g)
        obj.step(x0, raw, update, g, k)
    den = ConsistencyDenoiser(ema.module, sch, sigma_min=opts.sigma_min, sigma_data=opts.sigma_data)
    with torch.no_grad():
        for n_steps in (1, 2):
            out = generate(
                den, NoiseSource(range(4000), (16, 1, 1)), sampler="consistency", steps=n_steps, clip_x0=False
            )
            assert float(out.mean()) == pytest.approx(MU, rel=0.05), n_steps
            assert float(out.var()) == pytest.approx(V, rel=0.05), n_steps


def test_project_l2_keeps_rows_inside_unchanged() -> None:
    d = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = project_l2(d, 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


@pytest.fixture(scope="module")
def cm(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return Pipeline.from_checkpoint(
        tiny_checkpoint(tmp_path_factory.mktemp("cm") / "cm.safetensors", kind="consistency")
    )


def _f(den: Denoiser, x: torch.Tensor, t: float) -> torch.Tensor:
    """The consistency function at one time for every row, clipped as the served sampler clips it."""
    return den.x0(x, torch.full((x.shape[0],), t, dtype=torch.float64)).clamp(-1.0, 1.0)


def _renoise(sch: Schedule, x0: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
    return sch.diffuse(x0, torch.full((x0.shape[0],), t, dtype=torch.float64), z)


def test_one_step_purification_is_f_at_t_star(cm: Pipeline) -> None:
    """steps=1 and times=[] are the single evaluation f(x_t*, t*) of the diffused image, bitwise."""
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    seeds, t_star = [4, 9, 2], 0.25
    noise = NoiseSource(seeds, cm.info.image_shape)
    with torch.inference_mode():
        den = cm.denoiser()
        expected = _f(den, _renoise(cm.schedule, images, t_star, noise.initial()), t_star)
    for grid in ({"steps": 1}, {"times": []}):
        got = cm.purify(images, seeds, t_star=t_star, sampler="consistency", **grid)
        assert torch.equal(got, expected), grid


def test_multistep_sampling_is_algorithm_1(cm: Pipeline) -> None:
    """times [a, b]: x0 = f(z, 1); re-noise to a with the image's step-1 noise; f; to b; f (bitwise)."""
    seeds, (a, b) = [3, 17], (0.6, 0.25)
    noise = NoiseSource(seeds, cm.info.image_shape)
    with torch.inference_mode():
        den = cm.denoiser()
        x0 = _f(den, noise.initial(), 1.0)
        x0 = _f(den, _renoise(cm.schedule, x0, a, noise.draw(noise.step_stream(0))), a)
        x0 = _f(den, _renoise(cm.schedule, x0, b, noise.draw(noise.step_stream(1))), b)
    got = cm.sample(seeds, sampler="consistency", times=[a, b])
    assert torch.equal(got, x0)
    assert not torch.equal(got, cm.sample(seeds, sampler="consistency", times=[a]))


def test_multistep_purification_with_steps_and_times(cm: Pipeline) -> None:
    """Purification re-noises below t*: times [tau] is f(x_t*, t*), re-noised to tau, f again; steps=2
    is the same on the linear grid (tau = t*/2), and steps=3 equals times [2t*/3, t*/3]."""
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    seeds, t_star, tau = [8, 1], 0.3, 0.12
    noise = NoiseSource(seeds, cm.info.image_shape)
    with torch.inference_mode():
        den = cm.denoiser()
        x0 = _f(den, _renoise(cm.schedule, images, t_star, noise.initial()), t_star)
        x0 = _f(den, _renoise(cm.schedule, x0, tau, noise.draw(noise.step_stream(0))), tau)
    got = cm.purify(images, seeds, t_star=t_star, sampler="consistency", times=[tau])
    assert torch.equal(got, x0)
    for steps in (2, 3):
        inner = time_grid(cm.schedule, steps, "linear", t_max=t_star)[1:-1].tolist()
        assert inner == pytest.approx([t_star * (steps - k) / steps for k in range(1, steps)], abs=1e-15)
        by_steps = cm.purify(images, seeds, t_star=t_star, sampler="consistency", steps=steps)
        by_times = cm.purify(images, seeds, t_star=t_star, sampler="consistency", times=inner)
        assert torch.equal(by_steps, by_times)
        assert not torch.equal(by_steps, cm.purify(images, seeds, t_star=t_star, sampler="consistency"))


def test_times_match_steps_and_keep_images_independent_of_the_batch(cm: Pipeline) -> None:
    inner = time_grid(cm.schedule, 3, "linear")[1:-1].tolist()
    assert inner == pytest.approx([2 / 3, 1 / 3], abs=1e-15)
    batch = cm.sample([10, 11, 12, 13], sampler="consistency", times=inner)
    assert torch.equal(batch, cm.sample([10, 11, 12, 13], sampler="consistency", steps=3))
    assert torch.equal(batch[2], cm.sample([12], sampler="consistency", times=inner)[0])
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    purified = cm.purify(images, [5, 6, 7, 8], t_star=0.5, sampler="consistency", times=[0.3, 0.1])
    alone = cm.purify(images[1:2], [6], t_star=0.5, sampler="consistency", times=[0.3, 0.1])
    assert torch.equal(purified[1], alone[0])


def test_the_consistency_sampler_refuses_eta(cm: Pipeline) -> None:
    with pytest.raises(
        ValueError, match=r"^eta: only the ddim sampler uses eta; consistency would ignore it"
    ):
        cm.sample([1], sampler="consistency", times=[0.5], eta=0.3)
