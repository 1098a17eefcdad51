"""bench/seed_known.py's subspace experiment on cases with known answers, through its own sampler.

The exact eps-predictor of Gaussian data on a K-dim subspace puts DDIM's samples on the subspace
with the right covariance; the preconditioned MLP with F = 0 is exactly the isotropic Gaussian
answer; the corruptions hit the stated shares of points.
"""

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _toy import MLP, VectorTrainer
from seed_known import (
    ARMS_A,
    Subspace,
    build_parser,
    in_subspace_variance_ratio_bound,
    linear_gaussian_ddim_variance,
    linear_gaussian_std_ratio,
    penalty_scale,
    skip_only_off_subspace,
    subspace,
    subspace_arms,
)

from models.generate import sampler_grid
from models.noise import NoiseSource
from models.schedules import Schedule
from models.train.methods import EquivariantAT, get_method


class ExactSubspaceEps(nn.Module):
    """eps*(x, t) = s_t (a_t^2 Sigma + s_t^2 I)^-1 x for x0 ~ N(0, Sigma), Sigma = U diag(s_i^2) U^T."""

    def __init__(self, space: Subspace, schedule: Schedule) -> None:
        super().__init__()
        self.space, self.schedule = space, schedule

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: object = None) -> torch.Tensor:
        t = (timestep.double() + 1.0) / self.schedule.T
        ab = self.schedule.alphabar(t).reshape(-1, 1)
        u, v = self.space.u, self.space.scales**2
        xd = x.double()
        proj = xd @ u
        perp = xd - proj @ u.T
        # In the subspace: s / (ab v_i + 1 - ab); off it the data variance is 0: 1 / s.
        inside = (proj * (1 - ab).sqrt() / (ab * v + 1 - ab)) @ u.T
        return (inside + perp / (1 - ab).sqrt()).float()


def ddim_variance(v: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
    """Variance after deterministic DDIM from N(0, 1) with the exact eps of N(0, v): each step
    multiplies x by a_s / a_t (1 - s_t k_t) + s_s k_t, k_t = s_t / (a_t^2 v + s_t^2)."""
    ts = sampler_grid(schedule, "ddim", steps=steps)
    var = torch.ones_like(v)
    for t, s in itertools.pairwise(ts):
        ab_t, ab_s = schedule.alphabar(t), schedule.alphabar(s)
        k = (1 - ab_t).sqrt() / (ab_t * v + 1 - ab_t)
        var = var * ((ab_s / ab_t).sqrt() * (1 - (1 - ab_t).sqrt() * k) + (1 - ab_s).sqrt() * k) ** 2
    return var


def test_exact_subspace_denoiser_samples_lie_on_the_subspace() -> None:
    space = Subspace(32, 4)
    tr = VectorTrainer(32, "standard", {}, 1, 0)
    tr.ema = ExactSubspaceEps(space, tr.schedule)
    m = space.metrics(tr.sample(1000, 50, seed=123))
    assert m["off_subspace"] < 1e-3  # an unclipped DDIM sample from pure noise, truth 0
    # DDIM's own discretisation under-disperses (ratio 0.86 at 50 steps here), so the in-subspace
    # variance is checked against the sampler's exact linear map, within the sampling error of n = 1000.
    expected = ddim_variance(space.scales**2, tr.schedule, 50)
    assert 0.75 < float(expected.sum() / (space.scales**2).sum()) < 0.95
    assert m["in_subspace_variance_ratio"] == pytest.approx(
        float(expected.sum() / (space.scales**2).sum()), rel=0.1
    )
    assert m["max_principal_angle_deg"] < 10.0


def test_a_denoiser_that_misses_the_identity_off_the_subspace_multiplies_it_by_1_over_a1() -> None:
    """Why the MLP is preconditioned: with eps_theta = 0 off the subspace (the exact answer there is
    x / s_t), each DDIM step multiplies the off-subspace part by a_s / a_t, so it ends 1 / a_1 = 157
    times its start: the reduced run's 119."""
    space = Subspace(32, 4)
    tr = VectorTrainer(32, "standard", {}, 1, 0)
    exact = ExactSubspaceEps(space, tr.schedule)
    u = space.u.float()

    def inside_only(x: torch.Tensor, timestep: torch.Tensor, labels: object = None) -> torch.Tensor:
        e = exact(x, timestep)
        return (e @ u) @ u.T

    tr.ema = inside_only  # type: ignore[assignment]
    x = tr.sample(200, 50, seed=123).double()
    start = NoiseSource(range(123, 323), (32,)).initial().double()
    gain = 1.0 / float(tr.schedule.a(1.0))
    assert 150 < gain < 160
    perp = lambda z: z - (z @ space.u) @ space.u.T  # noqa: E731
    torch.testing.assert_close(perp(x), gain * perp(start), rtol=1e-3, atol=1e-3)


def test_preconditioned_mlp_with_zero_output_layer_is_the_gaussian_answer() -> None:
    sched = Schedule()
    sigma = 0.3
    net = MLP(8, hidden=16, sigma_data=sigma, schedule=sched)
    last = net.net[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    x = torch.randn(5, 8)
    for k in (1, 250, 999):
        t = torch.tensor(k / sched.T, dtype=torch.float64)
        ab = float(sched.alphabar(t))
        expected = math.sqrt(1 - ab) / (ab * sigma**2 + 1 - ab) * x
        got = net(x, sched.net_time(t.repeat(5)))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_corruptions_hit_the_stated_shares() -> None:
    space = Subspace(256, 4)
    n = 4000
    clean = space.training("clean", n, 3)
    assert float(((clean.double() - (clean.double() @ space.u) @ space.u.T).norm(dim=1)).max()) < 1e-5
    mixed = space.training("noisy sigma 0.2 + outliers", n, 3).double()
    off = (mixed - (mixed @ space.u) @ space.u.T).norm(dim=1) / 16  # / sqrt(D)
    outliers = (off > 0.223).double().mean()  # 0.25 * sqrt(252/256) = 0.248 vs noisy 0.198, each +-0.01
    untouched = (off < 1e-5).double().mean()
    assert float(outliers) == pytest.approx(0.1, abs=0.015)
    assert float(untouched) == pytest.approx(0.9 * 0.1, abs=0.015)  # the rest: 90% noisy
    with pytest.raises(ValueError, match="unknown condition"):
        space.training("blurry", 10, 0)


class LinearContext:
    """A StepContext whose eps-model is k * x: the equivariance residual is then (k s_t - 1) w."""

    def __init__(self, k: float) -> None:
        self.schedule, self.device, self.k = Schedule(), torch.device("cpu"), k
        self.generator = torch.Generator().manual_seed(0)

    def eps(self, x: torch.Tensor, t: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        return self.k * x


@pytest.mark.parametrize(
    ("variant", "radius"), [("random", "paper"), ("adversarial", "paper"), ("adversarial", "pixel-floor")]
)
def test_penalty_scale_is_the_methods_own_mean_squared_residual_for_a_linear_model(
    variant: str, radius: str
) -> None:
    """subspace-theory's c(t) = lambda E[w^2] against EquivariantAT's radius draw and ascent step."""
    ctx = LinearContext(k=0.7)
    method = get_method("equivariant-at", {"variant": variant, "radius": radius, "lambda": 1.0})
    assert isinstance(method, EquivariantAT)
    n, d = 20_000, 4
    for t_value in (0.05, 0.5):
        t = torch.full((n,), t_value, dtype=torch.float64)
        s = ctx.schedule.s(t).reshape(-1, 1).float()
        x = torch.randn(n, d, generator=ctx.generator)
        r = method.radius(s, ctx.generator)
        w = (torch.rand(n, d, generator=ctx.generator) * 2 - 1) * r
        anchor = ctx.eps(x, t)
        if variant == "adversarial":
            w = method.ascend(ctx, x, t, s, w, r, anchor)  # type: ignore[arg-type]
        got = method.residual(ctx, x, t, s, w, anchor).pow(2).mean()  # type: ignore[arg-type]
        s0 = ctx.schedule.s(torch.tensor(t_value, dtype=torch.float64))
        scale = penalty_scale(s0, variant, 1.0, method.options.r_max, radius)
        assert float(got) == pytest.approx(float(scale) * (0.7 * float(s0) - 1) ** 2, rel=0.03)


def test_linear_gaussian_bound_is_1_without_penalty_and_shrinks_with_lambda() -> None:
    assert linear_gaussian_std_ratio(0.04, "adversarial", 0.0, 0.5, steps=20) == pytest.approx(1.0)
    ratios = [linear_gaussian_std_ratio(0.04, "adversarial", lam, 3.0, steps=20) for lam in (0.3, 3.0, 30.0)]
    assert 1.0 > ratios[0] > ratios[1] > ratios[2]


def test_linear_gaussian_standard_variance_is_ddims_exact_map() -> None:
    v = torch.tensor([0.0012, 0.04, 0.16], dtype=torch.float64)
    got = linear_gaussian_ddim_variance(v, "adversarial", 0.0, 3.0, steps=50)
    torch.testing.assert_close(got, ddim_variance(v, Schedule(), 50), rtol=1e-12, atol=0.0)


def test_linear_gaussian_bound_uses_the_radius_it_is_given() -> None:
    """The pixel-floor box is >= 0.1 noise units everywhere (6.3 at t = 1/T), the paper's box with
    r_max = 0 only its bias U[16/255, 32/255]: the pixel-floor bound must cut more."""
    paper = linear_gaussian_std_ratio(0.0386, "adversarial", 0.3, 0.0, radius="paper")
    floor = linear_gaussian_std_ratio(0.0386, "adversarial", 0.3, 0.0, radius="pixel-floor")
    assert floor < paper - 0.03
    assert paper > 0.99


def test_in_subspace_bound_is_the_variance_weighted_mean_of_per_direction_ratios() -> None:
    v = torch.tensor([0.16, 0.01], dtype=torch.float64)
    ratios = [linear_gaussian_std_ratio(float(x), "random", 10.0, 3.0, steps=20) ** 2 for x in v]
    assert in_subspace_variance_ratio_bound(v[:1], "random", 10.0, 3.0, steps=20) == pytest.approx(ratios[0])
    standard = ddim_variance(v, Schedule(), 20)
    expected = float((standard * torch.tensor(ratios)).sum() / standard.sum())
    assert in_subspace_variance_ratio_bound(v, "random", 10.0, 3.0, steps=20) == pytest.approx(expected)
    assert 0 < expected < 1


STRONG_ADV = "equivariant adversarial (lambda 10, r_max 3)"
STRONG_RANDOM = "equivariant random (lambda 10, r_max 3)"


def test_without_strong_the_subspace_arms_are_the_published_ones() -> None:
    args = build_parser().parse_args(["subspace", "--out", "x"])
    table, corrupted, clean = subspace_arms(args)
    assert table == ARMS_A
    assert corrupted == list(ARMS_A)
    assert clean == ["standard", "equivariant adversarial"]


def test_strong_adds_an_adversarial_arm_and_its_random_twin_at_that_lambda_and_box() -> None:
    args = build_parser().parse_args(
        ["subspace", "--strong", "10:3", "1:1.5", "--arms", "standard", STRONG_ADV, "--out", "x"]
    )
    assert args.strong == [(10.0, 3.0), (1.0, 1.5)]
    table, corrupted, _ = subspace_arms(args)
    assert list(table)[: len(ARMS_A)] == list(ARMS_A)
    assert list(table)[len(ARMS_A) :] == [
        STRONG_ADV,
        STRONG_RANDOM,
        "equivariant adversarial (lambda 1, r_max 1.5)",
        "equivariant random (lambda 1, r_max 1.5)",
    ]
    assert corrupted == ["standard", STRONG_ADV]
    for name, variant in ((STRONG_ADV, "adversarial"), (STRONG_RANDOM, "random")):
        method_name, options = table[name]
        method = get_method(method_name, options)
        assert isinstance(method, EquivariantAT)
        o = method.options
        assert (o.variant, o.lam, o.r_max, o.radius, o.rho) == (variant, 10.0, 3.0, "paper", 2.0)


@pytest.mark.parametrize("bad", ["10", "10:3:1", "ten:3", "-1:3", "10:-3", "nan:3", "10:inf"])
def test_strong_refuses_anything_but_two_numbers_at_least_0(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["subspace", f"--strong={bad}", "--out", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "LAMBDA:R_MAX" in err and repr(bad) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arms", "standard", STRONG_ADV], "--arms: unknown arm"),  # no --strong 10:3
        (["--strong", "10:3", "--arms", STRONG_ADV], "--arms must include 'standard'"),
        (["--clean-arms", "standard", "equivariant sideways"], "--clean-arms: unknown arm"),
        (["--clean-arms", "equivariant adversarial"], "--clean-arms must include 'standard'"),
    ],
)
def test_subspace_arms_refuse_unknown_arms_and_a_missing_baseline(argv: list[str], message: str) -> None:
    args = build_parser().parse_args(["subspace", *argv, "--out", "x"])
    with pytest.raises(SystemExit, match=message):
        subspace_arms(args)


def test_subspace_trains_only_the_chosen_arms_and_pairs_the_strong_ones_with_standard(
    tmp_path: Path,
) -> None:
    """A tiny end-to-end run: the report holds exactly the chosen arms per set, each paired with
    standard over the same seeds."""
    argv = ["subspace", "--dim", "8", "--k", "2", "--seeds", "2", "--updates", "3", "--batch", "8"]
    argv += ["--hidden", "8", "--n-train", "40", "--n-samples", "20", "--steps", "2", "--sigmas", "0.2"]
    argv += ["--strong", "10:3", "--arms", "standard", STRONG_ADV, STRONG_RANDOM]
    argv += ["--clean-arms", "standard", STRONG_ADV, "--out", str(tmp_path / "sub")]
    subspace(build_parser().parse_args(argv))
    report = json.loads((tmp_path / "sub.json").read_text())
    assert (tmp_path / "sub.png").stat().st_size > 0
    noisy, clean = report["results"]["noisy sigma 0.2 + outliers"], report["results"]["clean"]
    assert list(noisy["summary"]) == ["standard", STRONG_ADV, STRONG_RANDOM]
    assert list(clean["summary"]) == ["standard", STRONG_ADV]
    for arm in (STRONG_ADV, STRONG_RANDOM):
        assert len(noisy["per_seed"][arm]["off_subspace"]) == 2
        assert "vs_standard" in noisy["summary"][arm]["off_subspace"]
    # the strong regulariser changes the model: the arms are not the same training under another name
    assert noisy["per_seed"][STRONG_ADV]["off_subspace"] != noisy["per_seed"]["standard"]["off_subspace"]

    # --clean-arms with no names: no clean set at all
    subspace(
        build_parser().parse_args([*argv[:-5], "--seeds", "1", "--clean-arms", "--out", str(tmp_path / "c")])
    )
    assert list(json.loads((tmp_path / "c.json").read_text())["results"]) == ["noisy sigma 0.2 + outliers"]


def test_a_preconditioned_mlp_that_learns_nothing_ends_where_skip_only_off_subspace_says() -> None:
    """F = 0 (zeroed output layer): the samples' off-subspace RMS is the Gaussian answer's, through
    the bench's own sampler, within the sampling error of 1,000 x 28 coordinates."""
    space = Subspace(32, 4)
    sigma_data = 0.2
    tr = VectorTrainer(32, "standard", {}, 1, 0, sigma_data=sigma_data)
    last = tr.ema.net[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    x = tr.sample(1000, 50, seed=7).double()
    off = x - (x @ space.u) @ space.u.T
    rms = float(off.pow(2).sum(dim=1).mean().sqrt()) / math.sqrt(32)
    assert rms == pytest.approx(skip_only_off_subspace(sigma_data, 32, 4, steps=50), rel=0.02)
