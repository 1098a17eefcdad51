"""The training methods: exact reductions, the algebra of their targets, projections, replay counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from models.schedules import Schedule
from models.testing import GaussianEps
from models.train.config import TrainConfig
from models.train.methods import (
    DroAT,
    EquivariantAT,
    equivariance_residual,
    get_method,
    project_box,
    project_l2,
)
from models.train.trainer import Trainer


def one_step(cfg: TrainConfig) -> tuple[list[float], Trainer]:
    tr = Trainer(cfg)
    x0 = next(tr.batches())
    return tr.method.step(tr, x0), tr


def same_params(a: Trainer, b: Trainer) -> bool:
    pa, pb = a.net.state_dict(), b.net.state_dict()
    return all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("equivariant-at", {"lambda": 0.0, "variant": "random"}),
        ("equivariant-at", {"lambda": 0.0, "variant": "adversarial", "stop_grad_anchor": False}),
        ("dro-at", {"m": 1}),
    ],
)
def test_reduces_to_standard_bitwise(
    make_config: Callable[..., TrainConfig], method: str, options: dict[str, Any]
) -> None:
    ref_losses, ref = one_step(make_config(method="standard"))
    losses, tr = one_step(make_config(method=method, options=options))
    assert losses == ref_losses
    assert same_params(ref, tr)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(ref.net.parameters(), Trainer(make_config()).net.parameters(), strict=True)
    )


def test_nonzero_lambda_changes_the_update(make_config: Callable[..., TrainConfig]) -> None:
    _, ref = one_step(make_config(method="standard"))
    _, tr = one_step(make_config(method="equivariant-at", options={"lambda": 0.3, "variant": "random"}))
    assert not same_params(ref, tr)


def test_dro_target_maps_perturbed_point_to_same_x0() -> None:
    sch = Schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.001, 0.01, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    a, s = sch.a(t).reshape(-1, 1, 1, 1), sch.s(t).reshape(-1, 1, 1, 1)
    x = a * x0 + s * eps + delta
    target = eps + delta / s
    torch.testing.assert_close((x - s * target) / a, x0, rtol=0, atol=1e-9)


def test_projections_stay_inside() -> None:
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(8, 1, 5, 5, generator=g) * torch.logspace(-2, 2, 8).reshape(-1, 1, 1, 1)
    out = project_l2(delta, 1.5)
    norms = out.flatten(1).norm(dim=1)
    assert bool((norms <= 1.5 * (1 + 1e-6)).all())
    inside = delta.flatten(1).norm(dim=1) <= 1.5
    assert torch.equal(out[inside], delta[inside])
    r = torch.rand(8, 1, 1, 1, generator=g) + 0.1
    boxed = project_box(delta, r)
    assert bool((boxed.abs() <= r).all())


def test_dro_ascent_stays_in_ball_for_large_steps() -> None:
    g = torch.Generator().manual_seed(2)
    for norm, scale in [("l2", "absolute"), ("l2", "sqrt_d"), ("linf", "absolute")]:
        method = get_method("dro-at", {"alpha": 5.0, "eta": 0.05, "norm": norm, "alpha_scale": scale})
        assert isinstance(method, DroAT)
        delta = torch.zeros(4, 1, 8, 8)
        for _ in range(3):
            delta = method.ascend(delta, torch.randn(delta.shape, generator=g), d=64)
        if norm == "l2":
            assert bool((delta.flatten(1).norm(dim=1) <= 0.05 * 8 * (1 + 1e-6)).all())
        else:
            assert bool((delta.abs() <= 0.05).all())


def test_dro_sqrt_d_step_length() -> None:
    method = get_method("dro-at", {"alpha": 0.01, "eta": 1.0, "alpha_scale": "sqrt_d"})
    assert isinstance(method, DroAT)
    delta = method.ascend(torch.zeros(2, 1, 8, 8), torch.randn(2, 1, 8, 8), d=64)
    torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((2,), 0.01 * 8.0))


class GaussianContext:
    """A StepContext whose network is the exact Gaussian eps-predictor (no parameters, no updates)."""

    def __init__(self, mu: float, v: float) -> None:
        self.schedule = Schedule()
        self.device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(0)
        self.net = GaussianEps(self.schedule, mu, v)

    def eps(self, x: torch.Tensor, t: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        return self.net(x, self.schedule.net_time(t))

    def update(self, loss: torch.Tensor) -> None:
        raise AssertionError("not used")

    def remaining(self) -> int:
        return 0


def test_gaussian_equivariance_residual_matches_reference_formula() -> None:
    mu, v = 0.3, 0.2
    ctx = GaussianContext(mu, v)
    method = get_method("equivariant-at", {"variant": "random"})
    assert isinstance(method, EquivariantAT)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.001, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    x0 = mu + math.sqrt(v) * torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ab = ctx.schedule.alphabar(t).reshape(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * x0 + s * eps
    w = method.radius(s) * (torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1)
    residual = method.residual(ctx, x_t, t, s, w, ctx.eps(x_t, t))
    torch.testing.assert_close(residual, (s**2 / (ab * v + s**2) - 1) * w, rtol=1e-9, atol=1e-12)


def test_equivariant_box_and_adversarial_step_stay_in_box() -> None:
    ctx = GaussianContext(0.0, 0.5)
    opts = {"variant": "adversarial", "adv_step": 3.0, "radius": "pixel-floor", "attack": "residual"}
    method = get_method("equivariant-at", opts)
    assert isinstance(method, EquivariantAT)
    t = torch.tensor([0.001, 0.2, 0.9])
    s = ctx.schedule.s(t).float().reshape(-1, 1, 1, 1)
    r = method.radius(s)
    torch.testing.assert_close(r * s, torch.maximum(torch.full_like(s, 16 / 255), 0.1 * s))
    x_t = torch.randn(3, 1, 4, 4)
    w = (torch.rand(x_t.shape) * 2 - 1) * r
    out = method.ascend(ctx, x_t, t.double(), s, w, r, ctx.eps(x_t, t.double()))
    assert bool((out.abs() <= r).all())
    assert bool((out.abs() == r).any())


def test_paper_radius_values_and_random_bias() -> None:
    """r(t) = r_max s_t^rho + b, b ~ U[b_min, b_max] per row, in noise units; b_min is 8/255 on the [0, 1] scale."""
    sch = Schedule()
    t = torch.tensor([0.001, 0.25, 0.5, 1.0], dtype=torch.float64)
    s = sch.s(t).reshape(-1, 1, 1, 1)
    fixed = get_method("equivariant-at", {"r_max": 0.5, "rho": 2.0, "b_min": 0.1, "b_max": 0.1})
    assert isinstance(fixed, EquivariantAT)
    r = fixed.radius(s, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r, 0.5 * (1 - sch.alphabar(t)).reshape(-1, 1, 1, 1) + 0.1)
    assert float(r[-1]) == pytest.approx(0.6, abs=1e-4) and float(r[0]) < 0.1 + 1e-3  # s_1 = 0.01
    default = get_method("equivariant-at", {})
    assert isinstance(default, EquivariantAT) and default.options.radius == "paper"
    assert default.options.b_min == pytest.approx(16 / 255) and default.options.rho == 2.0
    many = default.radius(torch.full((4000, 1), 1e-3), torch.Generator().manual_seed(1)).flatten()
    assert float(many.min()) >= 16 / 255 and float(many.max()) <= 32 / 255 + 1e-6
    assert abs(float(many.mean()) - 24 / 255) < 0.002  # uniform bias: mean (b_min + b_max) / 2
    old = get_method("equivariant-at", {"radius": "pixel-floor"})
    assert isinstance(old, EquivariantAT)
    torch.testing.assert_close(old.radius(s), torch.maximum(16 / 255 / s, torch.full_like(s, 0.1)))
    with pytest.raises(ValueError, match="b_max"):
        get_method("equivariant-at", {"b_min": 0.2, "b_max": 0.1})


def test_lambda_t_noise_weights_by_s_squared() -> None:
    s = torch.tensor([0.1, 0.5, 1.0]).reshape(-1, 1)
    const = get_method("equivariant-at", {"lambda": 0.3})
    noise = get_method("equivariant-at", {"lambda": 0.3, "lambda_t": "noise"})
    assert isinstance(const, EquivariantAT) and isinstance(noise, EquivariantAT)
    torch.testing.assert_close(const.weight(s), torch.full_like(s, 0.3))
    torch.testing.assert_close(noise.weight(s), 0.3 * s**2)


def test_exact_gaussian_denoiser_equivariance_residual_metric() -> None:
    """equivariance_residual for the exact N(mu, v I) denoiser is (s^2 / (alphabar v + s^2) - 1) w."""
    mu, v = -0.2, 0.5
    sch = Schedule()
    net = GaussianEps(sch, mu, v)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.01, 0.2, 0.6, 0.95], dtype=torch.float64)
    ab = sch.alphabar(t).reshape(-1, 1)
    s = (1 - ab).sqrt()
    x_t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    res = equivariance_residual(lambda x: net(x, sch.net_time(t)), x_t, s, w)
    torch.testing.assert_close(res, (s**2 / (ab * v + s**2) - 1) * w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("attack", ["output", "residual"])
@pytest.mark.parametrize("lambda_t", ["constant", "noise"])
def test_equivariant_options_train(
    make_config: Callable[..., TrainConfig], attack: str, lambda_t: str
) -> None:
    losses, tr = one_step(
        make_config(method="equivariant-at", options={"attack": attack, "lambda_t": lambda_t})
    )
    assert len(losses) == 1 and math.isfinite(losses[0]) and tr.state.updates == 1


def test_replay_performs_m_updates_per_batch(make_config: Callable[..., TrainConfig]) -> None:
    losses, tr = one_step(make_config(method="dro-at", options={"m": 3}, updates=10))
    assert len(losses) == 3 and tr.state.updates == 3
    steps = {int(s["step"]) for s in tr.opt.state.values()}
    assert steps == {3}
    assert losses[0] != losses[1]
    capped, tr = one_step(make_config(method="dro-at", options={"m": 3}, updates=2))
    assert len(capped) == 2 and tr.state.updates == 2


@pytest.mark.parametrize(
    ("mode", "dtype"), [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_autocast_setting_decides_the_network_precision(
    make_config: Callable[..., TrainConfig], mode: str, dtype: torch.dtype
) -> None:
    """'auto' is bf16 on CUDA only; 'bf16' forces autocast (on the CPU too); 'fp32' never autocasts."""
    trainer = Trainer(make_config(autocast=mode))
    seen: list[torch.dtype] = []
    handle = trainer.net.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cfg = trainer.net.cfg
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    out = trainer.eps(x, torch.full((2,), 0.5))
    handle.remove()
    assert seen == [dtype] and out.dtype == torch.float32 and out.isfinite().all()
