"""bench/bench_consistency.py runs on the CPU with tiny checkpoints and refuses GPU mode without CUDA."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from models.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_mode_reports_cm_and_diffusion_purification(tmp_path: Path) -> None:
    cm = tiny_checkpoint(tmp_path / "cm.safetensors", kind="consistency")
    diff = tiny_checkpoint(tmp_path / "diff.safetensors")
    out = tmp_path / "report.json"
    cmd = [sys.executable, "bench/bench_consistency.py", "--cm", str(cm), "--diffusion", str(diff)]
    cmd += ["--batch", "2", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    tasks = [(r["kind"], r["task"], r["steps"]) for r in report["rows"]]
    assert tasks == [
        ("consistency", "sample", 1),
        ("consistency", "sample", 2),
        ("consistency", "purify", 1),
        ("diffusion", "purify", 10),
    ]
    assert all(r["images_per_s"] > 0 for r in report["rows"])
    assert report["summary"]["cm_cost_fraction_of_10step"] > 0


def test_gpu_mode_needs_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        return
    cm = tiny_checkpoint(tmp_path / "cm.safetensors", kind="consistency")
    cmd = [sys.executable, "bench/bench_consistency.py", "--mode", "gpu", "--cm", str(cm)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
