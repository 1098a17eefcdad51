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
