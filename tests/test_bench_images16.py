"""bench/images16.py: the seed-B arm set (the equal-updates control) and its paired comparisons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import images16  # noqa: E402


def test_equal_updates_control_takes_dro_at_update_count() -> None:
    arms = images16.seed_b_arms(list(images16.SEED_B_ARMS), minibatches=60, m=3)
    assert arms["standard"] == ("standard", {}, 60)
    assert arms["standard-equal-updates"] == ("standard", {}, 180)
    assert arms["dro-at"] == ("dro-at", {"m": 3}, 180)
    assert list(images16.seed_b_arms(["dro-at", "standard"], 10, 2)) == ["dro-at", "standard"]


def test_unknown_arm_is_refused() -> None:
    with pytest.raises(ValueError, match="standard-equal-updates"):
        images16.seed_b_arms(["standard", "dro"], 10, 3)
    proc = subprocess.run(
        [sys.executable, "bench/images16.py", "seed-b", "--arms-b", "dro", "--out", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown seed-b arm(s) ['dro']" in proc.stderr


def _run(arm: str, seed: int, fd: float) -> dict[str, Any]:
    step = {"t": 1.0, "variance_ratio": 1.0 + fd / 100, "eps_norm_gap": fd / 100}
    return {"arm": arm, "seed": seed, "nfe10": {"fd": fd, "kid": fd / 10}, "exposure": {"nfe10": [step] * 10}}


def test_dro_at_is_paired_against_both_standards() -> None:
    fds = {
        "standard": [10.0, 11.0, 12.0],
        "standard-equal-updates": [9.0, 10.0, 11.0],
        "dro-at": [8.0, 9.5, 10.0],
    }
    runs = [_run(arm, s, v[s]) for arm, v in fds.items() for s in range(3)]
    out = images16.compare(runs, "standard-equal-updates", ["dro-at"], [10])
    c = out["dro-at vs standard-equal-updates, fd @ NFE 10"]
    assert c["difference"] == pytest.approx((-1.0 - 0.5 - 1.0) / 3)
    assert c["seed_ids"] == [0, 1, 2]
    exp = images16.exposure_compare(runs, [10], "dro-at", "standard-equal-updates")
    steps = exp["dro-at vs standard-equal-updates, variance_ratio @ NFE 10"]
    assert len(steps) == 10
    assert steps[0]["difference"] == pytest.approx(c["difference"] / 100)


def test_a_stopped_training_run_ends_the_experiment() -> None:
    class Stopped:
        stop_reason = "SIGTERM"
        state = type("S", (), {"updates": 3})()

        def run(self) -> None:
            pass

    with pytest.raises(SystemExit):
        images16.finish(Stopped())  # type: ignore[arg-type]
    Stopped.stop_reason = None  # type: ignore[assignment]
    images16.finish(Stopped())  # type: ignore[arg-type]


def test_seed_a_append_refuses_a_different_setting(tmp_path: Path) -> None:
    """Adding seeds or arms to a finished seed-A report must train them exactly as it was trained."""
    prev = {
        "command": "robustdiff bench images16 seed-a ...",
        "chosen": {"lambda": 1.0, "r_max": 0.5},
        "args": {"updates": 800, "sigma": 0.2},
        "runs": [],
    }
    (tmp_path / "a.json").write_text(json.dumps(prev))
    base = [
        sys.executable,
        "bench/images16.py",
        "seed-a",
        "--append",
        "--sweep",
        "none",
        "--out",
        str(tmp_path / "a"),
    ]
    for extra in (["--chosen", "3:0.5", "--updates", "800"], ["--chosen", "1:0.5", "--updates", "300"]):
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        assert "--chosen 1.0:0.5 --updates 800 --sigma 0.2" in proc.stderr
