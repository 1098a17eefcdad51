"""bench/images16.py: the seed-B arm set (the equal-updates control), its paired comparisons, and
the image size / device options (16x16 on the CPU, 32x32 for the GPU script)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.data import FASHION_MNIST_DIR, load_fashion_mnist
from models.evaluation.quality import extract_features
from models.train.config import build

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


def _runs(fds: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One run per arm and seed, FD as given (seed i gets the i-th value)."""
    return [_run(arm, s, fd) for arm, values in fds.items() for s, fd in enumerate(values)]


def test_dro_at_is_paired_against_both_standards() -> None:
    fds = {
        "standard": [10.0, 11.0, 12.0],
        "standard-equal-updates": [9.0, 10.0, 11.0],
        "dro-at": [8.0, 9.5, 10.0],
    }
    runs = _runs(fds)
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


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(
        **({"size": 16, "preset": None, "data": None, "device": "cpu"} | kw), batch=8, lr=1e-3
    )


@pytest.mark.parametrize(
    ("size", "preset", "downsample", "image_size"),
    [(16, "fmnist16-cpu", 2, 16), (32, "fmnist", 1, 32)],
)
def test_size_picks_preset_and_data(size: int, preset: str, downsample: int, image_size: int) -> None:
    cfg = images16.base_config(_args(size=size), Path("unused"), updates=1)
    assert (cfg["preset"], cfg["data"], "model" in cfg) == (
        preset,
        {"name": "fashion-mnist", "downsample": downsample},
        False,
    )
    assert (cfg["device"], cfg["num_threads"]) == ("cpu", 1)
    assert build(cfg).model_config_().image_size == image_size


def test_preset_override_takes_the_size_and_cuda_leaves_threads_to_torch() -> None:
    cfg = images16.base_config(_args(size=32, preset="tiny", device="cuda", data="/d"), Path("u"))
    assert (cfg["preset"], cfg["model"], cfg["data"]["path"]) == ("tiny", {"image_size": 32}, "/d")
    assert (cfg["device"], cfg["num_threads"]) == ("cuda", None)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_judge_scores_32x32_as_is_and_16x16_upsampled() -> None:
    test32 = load_fashion_mnist("test").images
    j32, j16 = images16.Judge(4, size=32), images16.Judge(4, size=16)
    idx = torch.randperm(len(test32), generator=torch.Generator().manual_seed(0))[:4]
    assert torch.equal(j32.test, test32[idx])  # the 32x32 test split itself
    assert torch.equal(j16.test, F.avg_pool2d(test32[idx], 2))
    x32 = j32.test.flip(-1)
    assert np.array_equal(j32.features(x32), extract_features(j32.net, x32))  # no upsampling
    x16 = j16.test.flip(-1)
    up = F.interpolate(x16, scale_factor=2, mode="nearest")
    assert np.array_equal(j16.features(x16), extract_features(j16.net, up))
    assert j32.score(j32.test)["fd"] < 1e-6 < j32.score(x32)["fd"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "24"], "argument --size: invalid choice: 24 (choose from 16, 32)"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["--device", "tpu"], "argument --device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--data", "/no/such/folder"], "--data: /no/such/folder is not a folder"),
        (["--time-limit", "soon"], "argument --time-limit: invalid float value: 'soon'"),
        (["--pretrain-seconds", "x"], "argument --pretrain-seconds: invalid float value: 'x'"),
        (["--pretrain-only", "--init", "m.safetensors"], "--pretrain-only is for seed-b without --init"),
        (["stray.json"], "unrecognized arguments: stray.json (only merge, table and trend take reports)"),
        (
            ["--continue-pretrain"],
            "--continue-pretrain is for seed-b with --pretrain-report and without --init",
        ),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available here")]),
)
def test_argument_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["images16.py", "seed-b", *argv, "--out", "x"])
    with pytest.raises(SystemExit) as exc:
        images16.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_time_limit_stops_before_a_seed_that_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images16, "STARTED", time.monotonic() - 100)  # 100 s spent
    assert images16.time_left_for(_args(time_limit=None), 1e9)
    assert images16.time_left_for(_args(time_limit=10.0), None)  # the first seed always starts
    assert images16.time_left_for(_args(time_limit=200.0), 50.0)
    assert not images16.time_left_for(_args(time_limit=140.0), 50.0)


def test_continue_pretrain_resumes_the_reports_last_chunk(tmp_path: Path) -> None:
    pre_dir = tmp_path / "pretrain"
    (pre_dir / "checkpoints").mkdir(parents=True)
    report = {"pretrain": [{"updates": 800}, {"updates": 1600}]}
    with pytest.raises(SystemExit, match=r"step-00001600\.json is missing"):
        images16.continued_updates(_args(pretrain_chunk=800), report, pre_dir)
    (pre_dir / "checkpoints" / "step-00001600.json").write_text("{}")
    assert images16.continued_updates(_args(pretrain_chunk=800), report, pre_dir) == 1600
    with pytest.raises(SystemExit, match="chunks are 800 updates; use --pretrain-chunk 800"):
        images16.continued_updates(_args(pretrain_chunk=400), report, pre_dir)


def _part(kind: str, runs: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    """A hand-made per-seed report as ``images16 seed-a|seed-b`` writes it (no training)."""
    args = {"size": 32, "preset": "tiny", "data": None, "batch": 4, "n": 8, "n_real": 16, "nfe": [10]}
    args |= {"updates": 800, "sigma": 0.2, "lr": 1e-3, "finetune": 200, "m": 3, "finetune_lr": 2e-4}
    args |= {"n_exposure": 4, "first_seed": runs[0]["seed"] if runs else 0, "seeds": 1, "out": "part"}
    args |= {k: v for k, v in changes.items() if k in args}
    report: dict[str, Any] = {
        "experiment": f"{kind}, 32x32 Fashion-MNIST",
        "command": f"robustdiff bench images16 {kind} (part)",
        "machine": "test",
        "date": "2026-12-03 17:00 UTC",
        "args": args,
        "network": {"preset": "tiny", "model": {"image_size": 32}},
        "feature_space": "test",
        "runs": runs,
    }
    if kind == "seed A":
        chosen = {"lambda": changes.get("lam", 1.0), "r_max": changes.get("r_max", 0.5), "by": "given"}
        report |= {"chosen": chosen, "sweep": []}
    else:
        report |= {"init": changes.get("init", "pre.safetensors"), "arms": {r["arm"]: {} for r in runs}}
        report |= {"pretrain": [{"updates": 250, "nfe10": {"fd": 30.0}}], "plateau": {"reached": True}}
    return report


def _merge(
    tmp_path: Path, parts: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, *extra: str
) -> dict[str, Any]:
    files = []
    for i, part in enumerate(parts):
        files.append(tmp_path / f"part{i}.json")
        files[-1].write_text(json.dumps(part))
    out = tmp_path / "merged"
    monkeypatch.setattr(sys, "argv", ["images16.py", "merge", "--out", str(out), *extra, *map(str, files)])
    images16.main()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(out.with_suffix(".json").read_text())


def test_merge_pairs_seed_b_runs_across_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-seed and per-arm parts give the comparisons a single run over all seeds would give."""
    fds = {"standard": [10.0, 11.0, 12.0], "standard-equal-updates": [9.0, 10.2, 11.0]}
    fds["dro-at"] = [8.0, 9.5, 10.0]
    runs = {(arm, s): _run(arm, s, v[s]) for arm, v in fds.items() for s in range(3)}
    parts = [_part("seed B", [runs[(a, s)] for a in fds]) for s in (0, 1)]
    parts += [_part("seed B", [runs[("dro-at", 2)], runs[("standard", 2)]])]
    parts += [_part("seed B", [runs[("standard-equal-updates", 2)]])]
    parts[0].pop("pretrain")  # the curve comes from whichever part carries it
    merged = _merge(tmp_path, parts, monkeypatch, "--seeds", "3")
    everything = list(runs.values())
    assert merged["comparisons"] == images16.seed_b_comparisons(everything, [10])["comparisons"]
    c = merged["comparisons"]["dro-at vs standard, fd @ NFE 10"]
    assert c["difference"] == pytest.approx((-2.0 - 1.5 - 2.0) / 3) and c["seed_ids"] == [0, 1, 2]
    assert set(merged["comparisons"]) == {
        f"{a} vs {b}, {m} @ NFE 10" for a, b in images16.B_COMPARISONS for m in ("fd", "kid")
    }
    steps = merged["exposure_comparison"]["dro-at vs standard-equal-updates, variance_ratio @ NFE 10"]
    assert steps[0]["difference"] == pytest.approx((-1.0 - 0.7 - 1.0) / 3 / 100)
    assert [(r["seed"], r["arm"]) for r in merged["runs"]] == sorted((s, a) for a, s in runs)
    assert merged["missing"] == [] and merged["pretrain"] == parts[1]["pretrain"]
    assert merged["init"] == "pre.safetensors" and set(merged["arms"]) == set(fds)
    assert [p["runs"] for p in merged["parts"]][3] == [["standard-equal-updates", 2]]
    assert "first_seed" not in merged["args"] and merged["args"]["finetune"] == 200


def test_merge_lists_missing_runs_and_pairs_only_complete_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that never came (a failed or cut process): its run is listed, its arm pairs on fewer seeds."""
    arms = ("standard", "equivariant adversarial", "equivariant random")
    present = [(a, s) for a in arms for s in (0, 1, 2) if (a, s) != ("equivariant adversarial", 1)]
    parts = [_part("seed A", [_run(a, s, 10.0 + s + len(a) * (s + 1) / 10)]) for a, s in present]
    parts[-1]["stopped"] = "--time-limit: seed 3 would not have finished in time; seeds before it ran"
    merged = _merge(tmp_path, parts, monkeypatch, "--seeds", "3")
    assert merged["missing"] == [{"arm": "equivariant adversarial", "seed": 1}]
    assert merged["comparisons"]["equivariant adversarial vs standard, fd @ NFE 10"]["seed_ids"] == [0, 2]
    assert merged["comparisons"]["equivariant random vs standard, kid @ NFE 10"]["seed_ids"] == [0, 1, 2]
    assert merged["chosen"]["lambda"] == 1.0 and merged["parts"][-1]["stopped"].startswith("--time-limit")
    # expected runs come from --seeds/--first-seed and --arms-a as well as from the parts
    merged = _merge(tmp_path, parts[:1], monkeypatch, "--seeds", "2", "--arms-a", "standard,adversarial")
    assert merged["missing"] == [
        {"arm": "equivariant adversarial", "seed": 0},
        {"arm": "equivariant adversarial", "seed": 1},
        {"arm": "standard", "seed": 1},
    ]
    assert merged["comparisons"] == {}


@pytest.mark.parametrize(
    ("kind", "change", "field"),
    [
        ("seed A", {"size": 16}, "size"),
        ("seed A", {"preset": "fmnist"}, "preset"),
        ("seed A", {"updates": 75}, "updates"),
        ("seed A", {"lam": 3.0}, "lambda"),
        ("seed A", {"r_max": 1.5}, "r_max"),
        ("seed B", {"init": "other.safetensors"}, "init"),
        ("seed B", {"finetune": 20}, "finetune"),
        ("seed B", {"m": 2}, "m"),
        ("seed B", {"nfe": [5, 10]}, "nfe"),
    ],
)
def test_merge_refuses_parts_made_differently(
    kind: str, change: dict[str, Any], field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [_part(kind, [_run("standard", 0, 10.0)]), _part(kind, [_run("standard", 1, 11.0)], **change)]
    with pytest.raises(SystemExit) as exc:
        _merge(tmp_path, parts, monkeypatch)
    message = str(exc.value.code)
    assert f"part1.json differs from {tmp_path / 'part0.json'} in {field}: " in message
    assert "\n" not in message and not (tmp_path / "merged.json").exists()


def test_merge_refuses_mixed_experiments_duplicates_and_non_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _part("seed A", [_run("standard", 0, 10.0)]), _part("seed B", [_run("standard", 1, 10.0)])
    for parts, message in (
        ([a, b], "in experiment: 'seed B' vs 'seed A'"),
        ([a, a], "standard seed 0 is in both"),
        ([a, {"runs": []}], "part1.json is not a seed-a or seed-b report"),
    ):
        with pytest.raises(SystemExit, match=message):
            _merge(tmp_path, parts, monkeypatch)


def test_seed_a_pairs_adversarial_against_random_too() -> None:
    fds = {
        "standard": [10.0, 11.0, 12.0],
        "equivariant random": [9.0, 10.0, 11.0],
        "equivariant adversarial": [8.0, 9.5, 10.0],
    }
    runs = _runs(fds)
    out = images16.seed_a_comparisons(runs, [10])
    assert out["equivariant random vs standard, fd @ NFE 10"]["difference"] == pytest.approx(-1.0)
    c = out["equivariant adversarial vs equivariant random, fd @ NFE 10"]
    assert c["difference"] == pytest.approx((-1.0 - 0.5 - 1.0) / 3)
    assert c["seed_ids"] == [0, 1, 2]


def test_table_prints_what_the_report_holds_and_judges_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/RESULTS.md's tables come from ``images16 table``: the arm means, the paired comparisons
    and the plan target met or missed (seed A asks 30% lower with the interval below 0)."""
    fds = {"standard": [10.0, 11.0, 12.0], "equivariant adversarial": [6.0, 7.5, 8.0]}
    fds["equivariant random"] = [9.0, 10.5, 11.0]
    runs = _runs(fds)
    report = _part("seed A", runs) | {"comparisons": images16.seed_a_comparisons(runs, [10])}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(report))
    monkeypatch.setattr(sys, "argv", ["images16.py", "table", str(path)])
    images16.main()
    out = capsys.readouterr().out
    assert "| standard | 800 | 3 | 11.00 [" in out
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if " vs " in line}
    adv = rows["equivariant adversarial vs standard, fd @ NFE 10"]
    assert "| -3.83 | -34.8% [" in adv and adv.endswith("| >= 30% lower, CI excludes 0 | met |")
    assert rows["equivariant random vs standard, fd @ NFE 10"].endswith("| - | - |")
    base = fds["standard"]  # every equivariant arm 10% below standard on every seed
    report["runs"] = [_run(a, s, base[s] * (1 if a == "standard" else 0.9)) for a in fds for s in range(3)]
    report["comparisons"] = images16.seed_a_comparisons(report["runs"], [10])
    assert "**missed**" in images16.tables(report)  # 10% lower: the interval excludes 0, too small


def test_table_refuses_anything_but_one_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.json").write_text('{"runs": []}')
    for argv, message in (
        ([], "table: name exactly one OUT.json report"),
        ([str(tmp_path / "x.json")], "is not a seed-a or seed-b report (KeyError('args'))"),
        ([str(tmp_path / "none.json")], "none.json is not a seed-a or seed-b report (FileNotFoundError"),
    ):
        monkeypatch.setattr(sys, "argv", ["images16.py", "table", *argv])
        with pytest.raises(SystemExit) as exc:
            images16.main()
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_seed_b_table_gives_budgets_and_dro_ats_exposure_per_step() -> None:
    fds = {"standard": [10.0, 11.0, 12.0], "standard-equal-updates": [9.0, 10.2, 11.0]}
    fds["dro-at"] = [8.0, 9.5, 10.0]
    runs = _runs(fds)
    report = _part("seed B", runs) | images16.seed_b_comparisons(runs, [10])
    report["arms"] = {a: {"updates": u} for a, (_, _, u) in images16.seed_b_arms(list(fds), 200, 3).items()}
    out = images16.tables(report)
    assert "| dro-at | 600 (200) | 3 | 9.17 [" in out and "| standard | 200 (200) | 3 |" in out
    assert "| dro-at vs standard, fd @ NFE 10 | -1.83 |" in out
    bullet = next(line for line in out.splitlines() if line.startswith("- dro-at vs standard,"))
    assert bullet.count("t=1.00: -0.0183*") == 10  # every step 1.83/100 closer, on all 3 seeds


def test_trend_sets_budgets_side_by_side_and_refuses_other_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for updates, gain in ((2000, 0.8), (300, 1.0), (800, 0.9)):  # given out of order
        runs = [
            _run(a, s, 10.0 + s if a == "standard" else (10.0 + s) * gain)
            for a in ("standard", "equivariant adversarial")
            for s in range(3)
        ]
        report = _part("seed A", runs, updates=updates) | {
            "comparisons": images16.seed_a_comparisons(runs, [10])
        }
        files.append(tmp_path / f"a{updates}.json")
        files[-1].write_text(json.dumps(report))
    out = tmp_path / "trend"
    monkeypatch.setattr(sys, "argv", ["images16.py", "trend", "--out", str(out), *map(str, files)])
    images16.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line[2:3].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 300", "| 800", "| 2000"]
    assert rows[2].startswith("| 2000 | 3 | -20.0% [") and rows[2].endswith("(3) | - |")  # no random arm
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = json.loads(files[0].read_text())
    other["args"]["sigma"] = 0.1
    files[0].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"a300\.json differs from .*a2000\.json in sigma"):
        images16.main()
