"""Training throughput per method: parameter updates per second and the cost relative to `standard`.

Runs the real trainer (``models.train.Trainer``) on a slice of Fashion-MNIST for each method and
preset, interleaving the methods round by round so that a noisy (shared) machine biases none of
them. Targets (issue 3): dro-at <= 1.15x and equivariant-at <= 2.5x the time of a standard update.

    .venv/bin/python bench/bench_train.py --presets fmnist-cpu fmnist --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.devices import device_option
from models.evaluation.common import machine_description
from models.train.config import build
from models.train.trainer import Trainer

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "dro-at (m=3)": ("dro-at", {}),
    "equivariant-at random": ("equivariant-at", {"variant": "random"}),
    "equivariant-at adversarial": ("equivariant-at", {"variant": "adversarial"}),
    "input-perturbation": ("input-perturbation", {}),
}


def trainer(preset: str, method: str, options: dict[str, Any], batch: int, device: str, out: str) -> Trainer:
    cfg = build(
        {
            "preset": preset,
            "method": method,
            "options": options,
            "batch_size": batch,
            "updates": 10**9,
            "device": device,
            "data": {"name": "fashion-mnist", "limit": 1024},
            "out_dir": out,
            "progress": False,
        }
    )
    return Trainer(cfg)


def timed_updates(tr: Trainer, updates: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per parameter update over at least ``updates`` updates (whole minibatches).

    On a shared CPU the process time is the fair measure: it does not count time spent waiting for
    a core (with one torch thread it is the compute itself). On CUDA only the wall time means much.
    """
    batches = tr.batches()
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    sync()
    start, cpu, before = time.perf_counter(), time.process_time(), tr.state.updates
    while tr.state.updates - before < updates:
        tr.method.step(tr, next(batches))
    sync()
    n = tr.state.updates - before
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["fmnist-cpu", "fmnist"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--updates", type=int, default=6, help="timed updates per method per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto", type=device_option)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_description(args.device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "batch": args.batch,
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            trainers = {
                k: trainer(preset, m, o, args.batch, args.device, tmp) for k, (m, o) in METHODS.items()
            }
            for tr in trainers.values():
                timed_updates(tr, 2)  # warm-up: allocator, oneDNN / cuDNN choices
            wall: dict[str, list[float]] = {k: [] for k in trainers}
            cpu: dict[str, list[float]] = {k: [] for k in trainers}
            for _ in range(args.rounds):
                for k, tr in trainers.items():
                    w, c = timed_updates(tr, args.updates)
                    wall[k].append(w)
                    cpu[k].append(c)
            bw = {k: min(v) for k, v in wall.items()}
            bc = {k: min(v) for k, v in cpu.items()}
            rows = {
                k: {
                    "wall_updates_per_s": 1 / bw[k],
                    "wall_vs_standard": bw[k] / bw["standard"],
                    "cpu_updates_per_s": 1 / bc[k],
                    "cpu_vs_standard": bc[k] / bc["standard"],
                    "wall_s_rounds": wall[k],
                    "cpu_s_rounds": cpu[k],
                }
                for k in trainers
            }
            report["results"][preset] = rows
            for k, r in rows.items():
                print(
                    f"{preset:11s} {k:28s} wall {r['wall_updates_per_s']:7.3f} upd/s ({r['wall_vs_standard']:.2f}x)"
                    f"  CPU-time {r['cpu_updates_per_s']:7.3f} upd/s ({r['cpu_vs_standard']:.2f}x standard)",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
