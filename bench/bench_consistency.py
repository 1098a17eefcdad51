"""Consistency-model serving cost: one-step sampling and purification through the served Pipeline.

Two modes, both timing ``models.pipeline.Pipeline`` exactly as the worker calls it:

* ``--mode cpu`` (default): images/s of one-step (and two-step) CM sampling and of one-step CM
  purification next to the 10-step DDIM diffusion purifier, on this machine's CPU.
* ``--mode gpu``: the issue's targets on CUDA: images/s at batch 256 and latency at batch 1 for
  one-step sampling and purification, for a CM checkpoint (default the fmnist CM) and for a
  randomly initialised CM of the ddpm-cifar10 network's size. Exits with a message without CUDA.

Usage:
    python bench/bench_consistency.py --mode cpu --cm models/weights/fmnist-cd.safetensors \
        --diffusion models/weights/fmnist-standard.safetensors --out bench/results/consistency-cpu.json
    python bench/bench_consistency.py --mode gpu --out bench/results/consistency-gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from models.bench_cli import BenchParser, positive_int
from models.checkpoint import read_header
from models.evaluation.common import machine_description
from models.pipeline import Pipeline
from models.testing import tiny_checkpoint
from models.unet import PRESETS

CIFAR_TARGET_IPS = 25_000
CIFAR_TARGET_LATENCY_MS = 1.5


def timed(fn: Callable[[], Any], repeats: int, sync: bool) -> list[float]:
    """Wall seconds of ``repeats`` calls after one warm-up call (CUDA-synchronised when asked)."""
    fn()
    out = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def measure(pipe: Pipeline, what: str, batch: int, steps: int, repeats: int, sync: bool) -> dict[str, Any]:
    """One configuration: median seconds per call, images/s and ms per call."""
    shape = pipe.info.image_shape
    seeds = list(range(batch))
    images = torch.rand(batch, *shape) * 2 - 1
    sampler = "consistency" if pipe.info.kind == "consistency" else "ddim"
    if what == "sample":

        def fn() -> Any:
            return pipe.sample(seeds, sampler=sampler, steps=steps)
    else:

        def fn() -> Any:
            return pipe.purify(images, seeds, sampler=sampler, steps=steps, t_star=0.1)

    secs = timed(fn, repeats, sync)
    med = statistics.median(secs)
    return {
        "model": pipe.info.name,
        "kind": pipe.info.kind,
        "task": what,
        "sampler": sampler,
        "steps": steps,
        "batch": batch,
        "repeats": repeats,
        "median_s": med,
        "images_per_s": batch / med,
        "ms_per_call": 1000 * med,
    }


def cpu_mode(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cm = Pipeline.from_checkpoint(args.cm, "cpu")
    rows = [
        measure(cm, "sample", args.batch, 1, args.repeats, False),
        measure(cm, "sample", args.batch, 2, args.repeats, False),
        measure(cm, "purify", args.batch, 1, args.repeats, False),
    ]
    if args.diffusion:
        diff = Pipeline.from_checkpoint(args.diffusion, "cpu")
        rows.append(measure(diff, "purify", args.batch, 10, args.repeats, False))
    summary: dict[str, Any] = {}
    if args.diffusion:
        cm_ips, diff_ips = rows[2]["images_per_s"], rows[3]["images_per_s"]
        summary = {
            "cm_1step_purify_images_per_s": cm_ips,
            "ddim_10step_purify_images_per_s": diff_ips,
            "cm_cost_fraction_of_10step": diff_ips / cm_ips,
        }
    return {"rows": rows, "summary": summary, "threads": args.threads}


def gpu_mode(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("bench_consistency --mode gpu needs a CUDA device; none is available here.", file=sys.stderr)
        raise SystemExit(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cifar = tiny_checkpoint(
            Path(tmp) / "cm-ddpm-cifar10.safetensors",
            kind="consistency",
            name="cm-ddpm-cifar10-random",
            **PRESETS["ddpm-cifar10"].model_dump(),
        )
        for path in (args.cm, cifar):
            pipe = Pipeline.from_checkpoint(path, "cuda")
            for task in ("sample", "purify"):
                rows.append(measure(pipe, task, 256, 1, args.repeats, True))
                rows.append(measure(pipe, task, 1, 1, args.repeats, True))
    big = [r for r in rows if r["model"] == "cm-ddpm-cifar10-random"]
    summary = {
        "cifar_one_step_images_per_s_b256": min(r["images_per_s"] for r in big if r["batch"] == 256),
        "cifar_latency_ms_b1": max(r["ms_per_call"] for r in big if r["batch"] == 1),
        "targets": {"images_per_s": CIFAR_TARGET_IPS, "latency_ms": CIFAR_TARGET_LATENCY_MS},
    }
    return {"rows": rows, "summary": summary, "device": torch.cuda.get_device_name()}


def main(argv: list[str] | None = None) -> int:
    p = BenchParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--cm", default="models/weights/fmnist-cd.safetensors", help="consistency checkpoint")
    p.add_argument(
        "--diffusion", default="models/weights/fmnist-standard.safetensors", help="cpu mode: 10-step purifier"
    )
    p.add_argument("--batch", type=positive_int, default=16, help="cpu mode: batch size")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=1, help="cpu mode: torch threads")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    for option, path, kind in (
        ("cm", args.cm, "consistency"),
        ("diffusion", args.diffusion if args.mode == "cpu" else None, "diffusion"),
    ):
        if not path:
            continue
        if not Path(path).is_file():
            p.error(f"--{option}: no checkpoint at {path}")
        if read_header(path).kind != kind:
            p.error(f"--{option}: {path} is a {read_header(path).kind} model, not a {kind} model")
    report = cpu_mode(args) if args.mode == "cpu" else gpu_mode(args)
    report |= {
        "command": " ".join(
            ["python", "bench/bench_consistency.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description("cuda" if args.mode == "gpu" else "cpu"),
    }
    for r in report["rows"]:
        print(
            f"{r['model']:>26} {r['task']:>6} {r['sampler']:>11} steps={r['steps']:<2} batch={r['batch']:<3} "
            f"{r['images_per_s']:10.1f} img/s  {r['ms_per_call']:9.2f} ms/call"
        )
    if report.get("summary"):
        print(json.dumps(report["summary"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
