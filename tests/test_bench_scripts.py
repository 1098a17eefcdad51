"""Benchmarks live in bench/ and run on a GPU; their --smoke mode proves on the CPU that the code runs."""

import json
import subprocess
import sys
from pathlib import Path

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
