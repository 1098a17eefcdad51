"""The one torch-free sampling spec: names, kinds, eta, spacing, defaults and the pure checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models import sampling_spec as spec
from models.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_every_sampler_has_a_rule_and_a_spacing() -> None:
    from models.samplers import RULES

    assert set(RULES) - {"ddim-model-eps"} == set(spec.SAMPLERS) == set(spec.SPACING)  # + ddim_eps="model"
    assert set(spec.ETA_SAMPLERS) <= set(spec.SAMPLERS)


def test_kinds() -> None:
    assert spec.samplers_for("diffusion") == ("ddpm", "ddim", "dpm-solver++")
    assert spec.samplers_for("consistency") == ("consistency",)
    assert (
        spec.default_sampler("consistency") == "consistency" and spec.default_sampler("diffusion") == "ddim"
    )
    assert spec.default_steps("consistency") == 1 and spec.default_steps("diffusion") == spec.DEFAULT_STEPS
    assert (
        spec.steps_that_fit("ddim", 0.05, 1000) == 50
        and spec.steps_that_fit("dpm-solver++", 0.05, 1000) is None
    )


@pytest.mark.parametrize(
    ("sampler", "kind", "reason"),
    [
        ("consistency", "diffusion", "'consistency' needs a consistency model; 'm' is a diffusion model"),
        ("ddim", "consistency", "'m' is a consistency model; use 'consistency'"),
        ("euler", "diffusion", "unknown sampler 'euler'; 'm' supports ['ddpm', 'ddim', 'dpm-solver++']"),
    ],
)
def test_check_sampler_names_what_to_use(sampler: str, kind: str, reason: str) -> None:
    with pytest.raises(UserError) as err:
        spec.check_sampler(sampler, kind, "m")
    assert (err.value.field, err.value.reason) == ("sampler", reason)
    spec.check_sampler(spec.default_sampler(kind), kind, "m")


@pytest.mark.parametrize(
    ("times", "start", "steps", "message"),
    [
        ([0.3, 0.6], 1.0, None, "times: must be strictly decreasing"),
        ([0.5, float("nan")], 1.0, None, "times: must be finite"),
        ([0.5], 0.4, None, r"times: must be in \[0.001, 0.4\)"),
        ([0.5, 0.0001], 1.0, None, r"times: must be in \[0.001, 1.0\)"),
        ([0.5, 0.2], 1.0, 2, "steps: 2 does not match the 3 network evaluations"),
    ],
)
def test_check_times(times: list[float], start: float, steps: int | None, message: str) -> None:
    with pytest.raises(UserError, match=message):
        spec.check_times(times, start, 1000, steps)


def test_check_eta_and_t_star() -> None:
    spec.check_eta("ddim", 0.5)
    with pytest.raises(UserError, match="eta: only the ddim sampler uses eta; ddpm would ignore it"):
        spec.check_eta("ddpm", 0.5)
    with pytest.raises(UserError, match="eta: must be a finite number >= 0"):
        spec.check_eta("ddim", float("inf"))
    with pytest.raises(UserError, match=r"t_star: must be in \[0.001, 1\]"):
        spec.check_t_star(0.0001, 1000)
    assert spec.check_times([0.6, 0.2], 1.0, 1000, None) == 3


def test_the_spec_imports_no_torch() -> None:
    code = "import sys, models.sampling_spec; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_diffusers_timesteps_are_diffusers_set_timesteps() -> None:
    """The indices diffusers' DDIMScheduler.set_timesteps(10) gives at T = 1000 (steps_offset 0)."""
    assert spec.diffusers_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert spec.diffusers_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert spec.diffusers_timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    with pytest.raises(UserError, match="steps: at most 1000 steps fit in T = 1000"):
        spec.diffusers_timesteps(1000, 1001, "trailing")
    # np.arange(50, 0, -50 / 29) has 30 points in float arithmetic: diffusers has no such grid either
    with pytest.raises(
        UserError, match="steps: diffusers' 'trailing' spacing gives no 29-step grid for T = 50"
    ):
        spec.diffusers_timesteps(50, 29, "trailing")


def test_check_spacing_and_ddim_eps() -> None:
    spec.check_spacing(None, "consistency", times=True, purify=True)
    spec.check_spacing("trailing", "ddpm")
    for spacing, sampler, kw, reason in [
        ("cosine", "ddim", {}, "unknown spacing 'cosine'; known: leading, trailing, linspace"),
        ("leading", "consistency", {}, "diffusers' spacings are for diffusion samplers, not consistency"),
        ("leading", "ddim", {"times": True}, "give either times or a spacing, not both"),
        (
            "leading",
            "ddim",
            {"purify": True},
            "'leading' is diffusers' grid for sampling from noise, not for",
        ),
    ]:
        with pytest.raises(UserError) as err:
            spec.check_spacing(spacing, sampler, **kw)
        assert err.value.field == "spacing" and err.value.reason.startswith(reason)
    spec.check_ddim_eps("model", "ddim")
    spec.check_ddim_eps("from-x0", "consistency")
    for eps, sampler in [("model", "ddpm"), ("model", "consistency"), ("x0", "ddim")]:
        with pytest.raises(UserError, match="ddim_eps: 'from-x0', or 'model' with the ddim sampler"):
            spec.check_ddim_eps(eps, sampler)
