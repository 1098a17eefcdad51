"""Benchmarks live in bench/ and run on a GPU; their --smoke mode proves on the CPU that the code runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parent.parent


def test_engine_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    cmd = [
        sys.executable,
        "bench/bench_engine.py",
        "--smoke",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert {"ours ddim-2", "diffusers-eager ddim-2", "ours purify t*=0.1", "ours one evaluation"} <= cases
    assert all(r["images_per_s"] > 0 for r in rows)
    ratio = [r["vs_diffusers_eager"] for r in rows if r["case"] == "ours ddim-2"]
    assert all(x is not None and x > 0 for x in ratio)


def test_engine_benchmark_needs_cuda_without_smoke() -> None:
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run(
        [sys.executable, "bench/bench_engine.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "CUDA device is needed" in proc.stderr


def test_diffusers_baseline_computes_our_function() -> None:
    """The engine benchmark compares like with like: the exported diffusers model equals our UNet."""
    import importlib.util

    import torch

    from models.unet import UNet, preset

    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "bench_engine.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = UNet(preset("tiny", num_heads=2)).eval()
    theirs = mod.to_diffusers(net)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 900.0])
    with torch.no_grad():
        assert float((theirs(x, t).sample - net(x, t)).abs().max()) < 1e-4


def test_gpu_report_reads_committed_results(tmp_path: Path) -> None:
    """bench/gpu_report.py turns the committed H100 JSON into tables and the five docs plots."""
    proc = subprocess.run(
        [sys.executable, "bench/gpu_report.py", "bench/results/gpu", "--img-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = ("seed_b_fd_vs_nfe", "seed_a_fd", "cm_fd_vs_steps", "robust_vs_steps", "train_loss")
    for name in names:
        png = tmp_path / f"gpu_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((ROOT / "bench/results/gpu/quality/fmnist-standard/quality.json").read_text())
    first = rep["results"][0]
    assert (
        f"| fmnist-standard | {first['sampler']} | {first['nfe']} | {first['n']} | {first['fd']:.2f} |"
        in proc.stdout
    )
    for header in ("| run | defence | attack |", "| model | task | sampler |", "| run | updates |"):
        assert header in proc.stdout


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_fd_vs_updates_measures_every_checkpoint_and_resumes(tmp_path: Path) -> None:
    """Two checkpoints of a tiny run -> two measured rows per step count, a plot, and no re-evaluation."""
    from models.evaluation.classifier import (
        ClassifierConfig,
        ClassifierHeader,
        ResNetClassifier,
        save_classifier,
    )
    from models.train.config import build
    from models.train.trainer import train

    cfg = {"name": "tiny", "preset": "tiny", "model": {"image_size": 32}, "data": {"name": "fashion-mnist"}}
    cfg |= {"batch_size": 4, "updates": 4, "checkpoint_every": 2, "sample_count": 0, "progress": False}
    train(build(cfg | {"device": "cpu", "out_dir": str(tmp_path / "run"), "export_path": None}))
    torch.manual_seed(0)
    net = ResNetClassifier(ClassifierConfig(image_size=32, widths=(4, 8))).eval()
    classifier = tmp_path / "cls.safetensors"
    save_classifier(
        classifier, net, ClassifierHeader(name="tiny-classifier", model=net.config, test_accuracy=None)
    )
    out = tmp_path / "curve"
    cmd = [sys.executable, "bench/fd_vs_updates.py", f"tiny={tmp_path / 'run'}", "--sampler", "ddim"]
    cmd += ["--steps", "1,2", "--n", "8", "--classifier", str(classifier), "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((out / "fd_vs_updates.json").read_text())["results"]
    assert [(r["updates"], r["steps"]) for r in rows] == [(2, 1), (2, 2), (4, 1), (4, 2)]
    assert rows[0]["hash"] != rows[2]["hash"] and all(r["fd"] >= 0 for r in rows)
    assert (out / "fd_vs_updates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| tiny | 4 | 2 | {rows[3]['fd']:.2f} |" in first.stdout
    assert first.stdout.count("+ robustdiff eval quality") == 2
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "robustdiff eval quality" not in again.stdout
    assert json.loads((out / "fd_vs_updates.json").read_text())["results"] == rows


def test_fd_vs_updates_rejects_a_folder_without_checkpoints(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/fd_vs_updates.py", f"x={tmp_path}", "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "checkpoints does not exist" in proc.stderr


def _robust_report(
    folder: Path, *, sampler: str, steps: int, majority: float, n: int = 64, t_star: float = 0.1
) -> Path:
    """A minimal ``eval robust`` report: clean and one PGD-EOT row at 10 and 25 steps."""
    folder.mkdir(parents=True)
    row = {"defense": "purifier", "eps": 0.0314, "n": n, "draws": 16, "worst": 0.2}
    ci = {"majority_ci95": [majority - 0.1, majority + 0.1]}
    results = [
        row
        | {"attack": "none", "eps": 0.0, "majority": 0.9, "mean": 0.9, "latency_s_per_purification": 0.01}
        | ci,
        row | {"attack": "pgd-eot", "attack_steps": 10, "eot": 4, "majority": 0.99, "mean": 0.99} | ci,
        row
        | {"attack": "pgd-eot", "attack_steps": 25, "eot": 4, "majority": majority, "mean": majority - 0.02}
        | ci,
    ]
    report = {
        "date": "2026-11-23T00:00:00Z",
        "machine": "test",
        "model": {"name": f"m-{sampler}"},
        "purifier": {"sampler": sampler, "steps": steps, "nfe": steps, "t_star": t_star},
        "threat": "linf",
        "n": n,
        "draws": 16,
        "results": results,
    }
    (folder / "robust.json").write_text(json.dumps(report))
    return folder


def test_robust_vs_purifier_reads_the_longest_attack(tmp_path: Path) -> None:
    """Each point is the report's longest attack; reports at other budgets are refused, not mixed."""
    cm = _robust_report(tmp_path / "cm", sampler="consistency", steps=1, majority=0.55)
    ddim = _robust_report(tmp_path / "ddim", sampler="ddim", steps=10, majority=0.64)
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/robust_vs_purifier.py", "--out", str(out), str(cm), str(ddim)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = json.loads((out / "robust_vs_nfe.json").read_text())["points"]
    assert [(p["nfe"], p["majority"], p["attack_steps"]) for p in points] == [(1, 0.55, 25), (10, 0.64, 25)]
    assert (out / "robust_vs_nfe.png").stat().st_size > 0
    assert "| m-ddim, ddim 10 | 0.1 | 10 | 90.0 | 64.0 [54.0, 74.0] | 62.0 |" in proc.stdout
    other_n = _robust_report(tmp_path / "n128", sampler="ddim", steps=5, majority=0.6, n=128)
    proc = subprocess.run([*cmd, str(other_n)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "differ in n" in proc.stderr


def test_robust_vs_purifier_places_points_at_t_star(tmp_path: Path) -> None:
    """--x t_star: one line per (model, sampler, steps), points ordered by depth."""
    folders = [
        _robust_report(tmp_path / f"d{k}-{t}", sampler="ddim", steps=k, majority=m, t_star=t)
        for k, t, m in ((1, 0.3, 0.3), (1, 0.1, 0.05), (5, 0.3, 0.35))
    ]
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/robust_vs_purifier.py", "--x", "t_star", "--out", str(out)]
    proc = subprocess.run([*cmd, *map(str, folders)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = json.loads((out / "robust_vs_t_star.json").read_text())["points"]
    assert [(p["steps"], p["t_star"], p["majority"]) for p in points] == [
        (1, 0.1, 0.05),
        (1, 0.3, 0.3),
        (5, 0.3, 0.35),
    ]
    assert (out / "robust_vs_t_star.png").stat().st_size > 0 and not (out / "robust_vs_nfe.png").exists()


@pytest.mark.parametrize("network", ["null", "unet"])
def test_host_benchmark_reports_every_case(tmp_path: Path, network: str) -> None:
    out = tmp_path / "host.json"
    cmd = [sys.executable, "bench/bench_host.py", "--repeats", "2", "--network", network]
    cmd += ["--workdir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["network"] == network and report["threads"] == 1
    rows = {(r["task"], r["sampler"], r["steps"]): r for r in report["rows"]}
    assert set(rows) == {
        ("sample", "ddim", 1),
        ("sample", "ddim", 10),
        ("sample", "dpm-solver++", 10),
        ("purify", "ddim", 10),
    }
    for r in rows.values():
        assert r["call_ms"] > 0 and r["cold_ms"] > 0 and r["network_ms"] > 0
        assert r["host_ms"] == pytest.approx(r["call_ms"] - r["network_ms"], abs=1e-3)


def test_host_benchmark_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/bench_host.py", "--checkpoint", str(tmp_path / "none.safetensors")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def _run_device_script(script: str, out: Path, log: str, **env: str) -> list[str]:
    """Run a one-call device script (bench/_steps.sh steps) as the device would; its summary lines."""
    proc = subprocess.run(
        ["bash", f"bench/{script}", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (out / log).read_text().split("== summary\n")[1].splitlines()


def test_gpu_checks_script_runs_every_step_and_reports_each(tmp_path: Path) -> None:
    """The one-call GPU script: a failing step (no CUDA here) does not stop the next; the summary names all."""
    out = tmp_path / "out"
    summary = _run_device_script("gpu_checks.sh", out, "checks.log")
    steps = ["gpu-tests", "host-cd", "host-dro-at", "consistency", "kernels", "engine"]
    assert [line.split()[0] for line in summary] == steps
    if not torch.cuda.is_available():
        assert all("rc=0" not in line for line in summary[1:])  # each benchmark refused: no CUDA device
        assert "a CUDA device is needed" in (out / "gpu_tests.log").read_text()
    assert len(list(out.iterdir())) <= 7  # the script promises at most 7 files


def test_gpu_protocol_script_runs_each_attack_and_brings_back_few_files(tmp_path: Path) -> None:
    """The one-call protocol script, shrunk for the CPU: every step's report and the stored attacks."""
    out = tmp_path / "out"
    shrink = {"DEVICE": "cpu", "N": "2", "N_DEEP": "2", "ATTACK_STEPS": "1", "EOT": "1", "DRAWS": "2"}
    summary = _run_device_script(
        "gpu_protocol.sh", out, "protocol.log", SANITY_N="2", WORK_DIR=str(tmp_path / "w"), **shrink
    )
    steps = ["dro-at-0.1-atcls", "dro-at-0.1-deep", "standard-0.1-deep", "dro-at-8of255", "standard-8of255"]
    compares = ["compare-0.1-deep", "compare-8of255"]
    assert [line.split()[:2] for line in summary] == [[s, "rc=0"] for s in [*steps, *compares]]
    for name in steps:
        report = json.loads((out / f"{name}.json").read_text())
        assert report["n"] == 2 and report["purifier"]["steps"] == (5 if "deep" in name else 1)
        assert any(r["attack"] == "pgd-eot" for r in report["results"])
        classifier = "fmnist-classifier-adversarial-long" if "atcls" in name else "fmnist-classifier"
        assert report["classifier"]["path"] == f"models/weights/{classifier}.safetensors"
    compared = json.loads((out / "compare-0.1-deep.json").read_text())
    assert compared["a"]["model"]["name"] == "fmnist-dro-at"
    assert compared["b"]["model"]["name"] == "fmnist-standard"
    assert compared["results"][0]["n"] == 2 and {r["eps"] for r in compared["results"]} >= {0.1}
    assert "fmnist-dro-at" in (out / "protocol.log").read_text().split("== compare-8of255")[1]
    assert (out / "adversarial.tar.gz").stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # the script promises at most 8 files


def test_gpu_protocol_script_skips_steps_that_do_not_fit_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = _run_device_script(
        "gpu_protocol.sh", out, "protocol.log", BUDGET_S="90", WORK_DIR=str(tmp_path / "w")
    )
    assert [line.split()[1] for line in summary] == ["skipped"] * 5  # 100, 240, 240, 100, 100 s limits > 90 s
    assert [p.name for p in out.iterdir()] == ["protocol.log"]


def _small_fashion_mnist(folder: Path, n_train: int, n_test: int) -> Path:
    """The first images of each split as uncompressed IDX files: a quick stand-in for DATA."""
    from models.data import read_idx

    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            arr = read_idx(FASHION_MNIST_DIR / f"{prefix}-{kind}-ubyte.gz")[:n]
            head = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(head + arr.tobytes())
    return folder


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_gpu_seeds_script_runs_both_experiments_side_by_side_and_survives_a_failed_process(
    tmp_path: Path,
) -> None:
    """The one-call seed-A/B script, shrunk for the CPU (32x32, 2 arms, 1 seed, 2 processes at a time):
    every (arm, seed) its own process, merged; a process that fails costs only its own run. (Pairing
    across seeds: the merge tests in test_bench_images16.py; the schedule: the test below.)"""
    out = tmp_path / "out"
    shrink = {"DEVICE": "cpu", "PRESET": "tiny", "BATCH": "4", "PRETRAIN": "2", "PRETRAIN_CHUNK": "1"}
    shrink |= {"FINETUNE": "1", "M": "2", "SEEDS_B": "1", "ARMS_B": "dro-at,standard", "UPDATES_A": "1"}
    shrink |= {"SEEDS_A": "1", "ARMS_A": "adversarial,standard", "JOBS": "2"}
    shrink |= {"N": "8", "N_EXPOSURE": "4", "N_REAL": "16", "NFE": "1,2"}
    data = _small_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=32)
    python = tmp_path / "python"  # the seed-A adversarial process fails at once, as a crashed one would
    python.write_text(
        '#!/usr/bin/env bash\n[[ " $* " == *" --arms-a adversarial "* ]] && exit 3\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    summary = _run_device_script(
        "gpu_seeds.sh",
        out,
        "seeds.log",
        DATA=str(data),
        WORK_DIR=str(tmp_path / "w"),
        PYTHON=str(python),
        **shrink,
    )
    ended = {line.split()[0]: line.split()[1] for line in summary}
    assert ended.pop("a-adversarial-s0") == "rc=3"
    names = {"b-pretrain", "a-standard-s0", "merge-b", "merge-a"}
    names |= {"b-dro-at-s0", "b-standard-s0"}
    assert ended == dict.fromkeys(names, "rc=0")
    b = json.loads((out / "seed_b.json").read_text())
    assert b["args"]["size"] == 32 and b["args"]["data"] == str(data)
    assert b["network"] == {"preset": "tiny", "model": {"image_size": 32}}
    assert "32x32 as is" in b["feature_space"] and [r["updates"] for r in b["pretrain"]] == [1, 2]
    assert b["init"] == str(tmp_path / "w/b-pretrain/seed_b/pretrain.safetensors")
    assert [(r["seed"], r["arm"], r["updates"]) for r in b["runs"]] == [(0, "dro-at", 2), (0, "standard", 1)]
    assert all(len(r["exposure"]["nfe2"]) == 2 for r in b["runs"])
    assert b["missing"] == [] and len(b["parts"]) == 2 and b["comparisons"] == {}  # one seed: no pair
    a = json.loads((out / "seed_a.json").read_text())
    assert a["chosen"] == {"lambda": 1.0, "r_max": 0.5, "by": "given (--chosen), no sweep"}
    assert a["args"]["sigma"] == 0.2 and a["args"]["updates"] == 1
    assert [(r["seed"], r["arm"]) for r in a["runs"]] == [(0, "standard")] and a["comparisons"] == {}
    assert a["missing"] == [{"arm": "equivariant adversarial", "seed": 0}]
    assert all(r["nfe2"]["n"] == 8 for r in a["runs"] + b["runs"])
    log = (out / "seeds.log").read_text()
    assert "[a-standard-s0] " in log and "missing: equivariant adversarial seed 0" in log
    for name in ("seed_a", "seed_b"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "seed_a.json",
        "seed_a.png",
        "seed_b.json",
        "seed_b.png",
        "seeds.log",
    ]  # the script promises at most 5 files


def test_gpu_seeds_script_skips_processes_that_do_not_fit_the_budget(tmp_path: Path) -> None:
    """40 s of budget, 30 kept for the merges: no process's expected time (>= START_S = 20 s) fits."""
    out = tmp_path / "out"
    summary = _run_device_script(
        "gpu_seeds.sh", out, "seeds.log", BUDGET_S="40", WORK_DIR=str(tmp_path / "w")
    )
    ended = [line.split()[:2] for line in summary]
    assert ended[0] == ["b-pretrain", "skipped"] and len(ended) == 1 + 9 + 2
    assert all(state == "skipped" for _, state in ended[1:10])
    assert ended[10:] == [["merge-b", "nothing-to-merge"], ["merge-a", "nothing-to-merge"]]
    assert [p.name for p in out.iterdir()] == ["seeds.log"]


@pytest.mark.parametrize("pretrain_rc", [0, 1])
def test_gpu_seeds_script_schedules_longest_first_within_jobs(tmp_path: Path, pretrain_rc: int) -> None:
    """The scheduler alone, with a stand-in for python that only records its processes: at most JOBS
    at once, seed-A arms longest first, fine-tunes only after a pre-training that made its checkpoint."""
    record, work = tmp_path / "record", tmp_path / "w"
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        "[[ $1 == -c ]] && exit 0\n"  # the package check
        f'echo "start $(date +%s.%N) $*" >>{record}\n'
        'if [[ " $* " == *" --pretrain-only "* ]]; then\n'
        f"  mkdir -p {work}/b-pretrain/seed_b && touch {work}/b-pretrain/seed_b/pretrain.safetensors\n"
        f'  sleep 0.5; echo "end $(date +%s.%N) $*" >>{record}; exit {pretrain_rc}\n'
        "fi\n"
        f'sleep 0.2; echo "end $(date +%s.%N) $*" >>{record}\n'
    )
    python.chmod(0o755)
    env = {"JOBS": "3", "SEEDS_A": "2", "SEEDS_B": "2", "PYTHON": str(python), "WORK_DIR": str(work)}
    summary = _run_device_script("gpu_seeds.sh", tmp_path / "out", "seeds.log", **env)

    def name(args: list[str]) -> str:
        if "--pretrain-only" in args:
            return "b-pretrain"
        flag = "--arms-a" if "seed-a" in args else "--arms-b"
        return f"{flag[-1]}-{args[args.index(flag) + 1]}"

    events = sorted(
        (float(t), kind, name(args)) for kind, t, *args in map(str.split, record.read_text().splitlines())
    )
    busy = peak = 0
    for _, kind, _ in events:
        busy += 1 if kind == "start" else -1
        peak = max(peak, busy)
    assert peak == 3
    started = [what for _, kind, what in events if kind == "start"]
    assert started[:7] == ["b-pretrain"] + ["a-adversarial"] * 2 + ["a-random"] * 2 + ["a-standard"] * 2
    pretrain_end = next(t for t, kind, what in events if (kind, what) == ("end", "b-pretrain"))
    fine_tunes = [
        t for t, kind, what in events if kind == "start" and what.startswith("b-") and what != "b-pretrain"
    ]
    if pretrain_rc == 0:
        assert started[7:] == ["b-dro-at"] * 2 + ["b-standard-equal-updates"] * 2 + ["b-standard"] * 2
        assert min(fine_tunes) > pretrain_end
    else:
        assert fine_tunes == []
        assert "no pre-trained checkpoint (b-pretrain rc=1)" in (tmp_path / "out/seeds.log").read_text()
    assert summary[-2:] == ["merge-b nothing-to-merge 0s", "merge-a nothing-to-merge 0s"]
