"""The sanity checks of ``eval robust``: when a trend check fails, and what a failure says."""

from __future__ import annotations

from typing import Any

from models.evaluation.robust import _trend, sanity_failures


def _m(mean: float, majority: float, n: int = 16) -> dict[str, Any]:
    return {"mean": mean, "majority": majority, "n": n}


def _sanity(**checks: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "gradients_finite": True,
        "gradients_nonzero": True,
        "non_increasing_in_steps": [],
        "non_increasing_in_eot": [],
    }
    return base | checks


def test_a_trend_passes_within_the_tolerance_and_fails_beyond_it() -> None:
    tol = 2 / 16
    assert _trend("eot", [_m(0.5, 0.5), _m(0.6, 0.625)], tol, "c")["non_increasing"] is True
    assert _trend("eot", [_m(0.5, 0.5), _m(0.4, 0.375), _m(0.3, 0.3)], tol, "c")["non_increasing"] is True
    assert _trend("eot", [_m(0.5, 0.5), _m(0.7, 0.5)], tol, "c")["non_increasing"] is False


def test_a_majority_that_rises_fails_the_trend_even_when_the_mean_does_not() -> None:
    entry = _trend("steps", [_m(0.5, 0.4), _m(0.5, 0.6)], 2 / 16, "c", attack="pgd-eot", eps=0.03)
    assert entry["non_increasing"] is False
    assert entry["mean_by_steps"] == [0.5, 0.5] and entry["majority_by_steps"] == [0.4, 0.6]
    assert entry["n"] == 16 and entry["compared"] == "c" and entry["attack"] == "pgd-eot"


def test_every_failed_check_gives_one_line_and_passed_ones_none() -> None:
    rising = _trend("eot", [_m(0.5, 0.5), _m(0.75, 0.75)], 2 / 16, "c", attack="pgd-eot", eps=0.0314)
    rising["attack_steps"], rising["eot"] = 25, [1, 4]
    flat = _trend("steps", [_m(0.5, 0.5), _m(0.5, 0.5)], 2 / 16, "c", attack="pgd-eot", eps=0.0314)
    flat["eot"], flat["attack_steps"] = 4, [12, 25]
    big = {"attack": "pgd-eot", "eps": 0.5, "mean": 0.25, "n": 16, "reaches_zero": False}
    failed = sanity_failures(
        _sanity(non_increasing_in_eot=[rising], non_increasing_in_steps=[flat], large_eps=big)
    )
    assert len(failed) == 2
    assert failed[0].startswith("non_increasing_in_eot: pgd-eot eps 0.0314, eot 1 -> 4: accuracy rose")
    assert "mean 0.500 -> 0.750" in failed[0] and "tolerance 0.125, n 16" in failed[0]
    assert failed[1].startswith("large_eps: pgd-eot at eps 0.5 leaves mean accuracy 0.250 > 0.1")
    assert sanity_failures(_sanity(non_increasing_in_steps=[flat])) == []


def test_gradients_fail_only_when_measured_and_bad() -> None:
    assert sanity_failures(_sanity(gradients_finite=None, gradients_nonzero=None)) == []
    failed = sanity_failures(_sanity(gradients_finite=False, gradients_nonzero=False))
    assert [f.split(":")[0] for f in failed] == ["gradients_finite", "gradients_nonzero"]
