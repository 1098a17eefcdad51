"""``eval compare-quality``: two arms of quality reports paired by training seed, on constructed numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from service.cli import main

SETTINGS = [("ddim", 5), ("ddim", 10)]


def _report(fd: dict[tuple[str, int], float], kid: float = 0.05, **extra: Any) -> dict[str, Any]:
    rows = [
        {
            "sampler": s,
            "steps": k,
            "nfe": k,
            "n": 100,
            "fd": v,
            "fd_ci95": [v - 0.5, v + 0.5],
            "kid": kid + v / 1000,
            "kid_ci95": [kid, kid + 0.02],
        }
        for (s, k), v in fd.items()
    ]
    return {
        "feature_network": "tiny",
        "real_set": "test",
        "kid": "unbiased, cubic kernel, against a fixed random 2000 test images",
        "results": rows,
    } | extra


def _write(folder: Path, name: str, report: dict[str, Any]) -> Path:
    path = folder / name / "quality.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(report))
    return path


def _arms(tmp_path: Path, a_fd: list[float], b_fd: list[float]) -> tuple[list[str], list[str]]:
    a = [
        _write(tmp_path, f"a{i}", _report({k: v + j for j, k in enumerate(SETTINGS)}))
        for i, v in enumerate(a_fd)
    ]
    b = [
        _write(tmp_path, f"b{i}", _report({k: v + j for j, k in enumerate(SETTINGS)}))
        for i, v in enumerate(b_fd)
    ]
    return [str(p) for p in a], [str(p.parent) for p in b]  # a file or its folder both work


def test_paired_difference_t_interval_and_sign_flip_on_known_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b_fd = [9.0, 10.0, 11.0, 12.0, 13.0]
    diffs = [1.0, 2.0, 1.0, 2.0, 1.0]  # mean 1.4, sd 0.5477, all positive
    a, b = _arms(tmp_path, [x + d for x, d in zip(b_fd, diffs, strict=True)], b_fd)
    out = tmp_path / "cmp"
    cmd = ["eval", "compare-quality", "--a", *a, "--b", *b, "--names", "at", "standard", "--out", str(out)]
    assert main(cmd) == 0
    report = json.loads((out / "compare_quality.json").read_text())
    assert (out / "compare_quality.png").is_file()
    assert [(r["sampler"], r["steps"], r["seeds"]) for r in report["results"]] == [
        ("ddim", 5, 5),
        ("ddim", 10, 5),
    ]
    fd = report["results"][0]["fd"]
    half = stats.t.ppf(0.975, 4) * 0.5477226 / 5**0.5
    assert fd["difference"] == pytest.approx(1.4)
    assert fd["difference_ci95"] == pytest.approx([1.4 - half, 1.4 + half], rel=1e-5)
    assert fd["relative"] == pytest.approx(1.4 / 11.0)
    assert fd["sign_flip_p"] == pytest.approx(2 / 32) and fd["ci_excludes_0"]
    assert fd["a"]["mean"] == pytest.approx(12.4) and fd["b"]["mean"] == pytest.approx(11.0)
    assert fd["b_per_seed"][0] == [9.0, [8.5, 9.5]]  # each seed keeps its own bootstrap interval
    assert report["results"][0]["kid"]["difference"] == pytest.approx(0.0014)
    printed = capsys.readouterr().out
    assert "A = at (5 seeds), B = standard" in printed and "+12.7%" in printed


def test_identical_arms_differ_by_zero_with_p_1(tmp_path: Path) -> None:
    a, b = _arms(tmp_path, [5.0, 6.0, 7.0], [5.0, 6.0, 7.0])
    assert main(["eval", "compare-quality", "--a", *a, "--b", *b, "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "compare_quality.json").read_text())["results"]
    assert all(r[m]["difference"] == 0 and r[m]["sign_flip_p"] == 1.0 for r in rows for m in ("fd", "kid"))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_refuses_mismatched_seeds_settings_and_old_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _arms(tmp_path, [5.0, 6.0, 7.0], [5.0, 6.0, 7.0])
    out = ["--out", str(tmp_path / "x")]
    assert "arm A has 3 reports and arm B 2" in _refused(
        ["eval", "compare-quality", "--a", *a, "--b", *b[:2], *out], capsys
    )
    assert "at least 2 seeds" in _refused(["eval", "compare-quality", "--a", a[0], "--b", b[0], *out], capsys)
    assert "listed twice" in _refused(
        ["eval", "compare-quality", "--a", a[0], a[0], "--b", *b[:2], *out], capsys
    )
    other = _write(tmp_path, "steps", _report({("ddim", 5): 5.0, ("ddim", 20): 6.0}))
    err = _refused(["eval", "compare-quality", "--a", *a[:2], str(other), "--b", *b, *out], capsys)
    assert "measured other settings" in err
    feats = _write(tmp_path, "feats", _report({k: 5.0 for k in SETTINGS}, feature_network="other"))
    assert "differ in feature_network" in _refused(
        ["eval", "compare-quality", "--a", *a[:2], str(feats), "--b", *b, *out], capsys
    )
    old = _report({k: 5.0 for k in SETTINGS})
    for row in old["results"]:
        del row["kid"]
    old_path = _write(tmp_path, "old", old)
    assert "no KID" in _refused(
        ["eval", "compare-quality", "--a", *a[:2], str(old_path), "--b", *b, *out], capsys
    )
    missing = str(tmp_path / "nowhere")
    assert "does not exist" in _refused(
        ["eval", "compare-quality", "--a", *a[:2], missing, "--b", *b, *out], capsys
    )
    assert not (tmp_path / "x").exists()
