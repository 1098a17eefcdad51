"""Where one micro-batch evaluation of the served network spends its time on the CPU (1 torch thread).

torch.profiler over ``--repeats`` evaluations of one micro-batch (``Pipeline.forward``, the served
batch-invariant path), each op's self time summed into categories: convolution, GroupNorm + SiLU
and attention (every op inside those calls), the embedding Linears, other elementwise ops and
copies, and host overhead (wall time not spent in any op: Python, dispatch). Per layout (NCHW
default, channels_last). Wall time under the profiler: on a busy machine compare the shares.

    OMP_NUM_THREADS=1 python bench/profile_cpu_eval.py --out bench/results/cpu/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import models.unet
from models.pipeline import CpuOptions, Pipeline

# Ops inside these modules' calls are counted as theirs, whatever the op (the channels_last norm is
# built from means, subtractions and multiply-adds).
MARKED = {"robustdiff::groupnorm_silu": "groupnorm+silu", "robustdiff::attention": "attention"}
BY_NAME = {
    "convolution": ("convolution",),
    "embedding linears": ("addmm",),
    "elementwise / copies": ("add", "mul", "cat", "copy", "clone", "upsample", "pool", "silu"),
}


def category(evt: object) -> str:
    parent = evt
    while parent is not None:
        if parent.name in MARKED:  # type: ignore[attr-defined]
            return MARKED[parent.name]  # type: ignore[attr-defined]
        parent = parent.cpu_parent  # type: ignore[attr-defined]
    for cat, keys in BY_NAME.items():
        if any(k in evt.name for k in keys):  # type: ignore[attr-defined]
            return cat
    return "other ops"


def _marked(fn: Callable[..., torch.Tensor], label: str) -> Callable[..., torch.Tensor]:
    def wrapped(*args: object, **kwargs: object) -> torch.Tensor:
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapped


def profile_eval(pipe: Pipeline, batch: int, repeats: int) -> dict[str, float]:
    """ms per image in each category, over ``repeats`` evaluations of ``batch`` rows."""
    x, t = torch.randn(batch, *pipe.info.image_shape), torch.rand(batch) * 999
    with torch.inference_mode():
        for _ in range(3):
            pipe.forward(x, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeats):
                pipe.forward(x, t)
            wall = time.perf_counter() - start
    spent: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.name not in MARKED:
            spent[category(evt)] += evt.self_cpu_time_total / 1e6
    per_image = 1e3 / (repeats * batch)
    out = {cat: sec * per_image for cat, sec in sorted(spent.items(), key=lambda kv: -kv[1])}
    out["host overhead"] = max(0.0, wall - sum(spent.values())) * per_image
    out["total (wall)"] = wall * per_image
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="models/weights/fmnist-dro-at.safetensors")
    parser.add_argument("--batch", type=int, default=16, help="rows: one micro-batch (the default size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models.unet.groupnorm_silu = _marked(models.unet.groupnorm_silu, "robustdiff::groupnorm_silu")  # type: ignore[assignment]
    models.unet.Attention.forward = _marked(models.unet.Attention.forward, "robustdiff::attention")  # type: ignore[method-assign]
    result: dict[str, object] = {"batch": args.batch, "threads": 1, "loadavg_start": os.getloadavg()}
    for name, opts in (("nchw (default)", CpuOptions()), ("channels_last", CpuOptions(channels_last=True))):
        pipe = Pipeline.from_checkpoint(args.checkpoint, cpu=opts)
        rows = profile_eval(pipe, args.batch, args.repeats)
        result[name] = rows
        total = rows["total (wall)"]
        print(f"{name}: {total:.2f} ms per image per evaluation (wall, under the profiler)")
        for cat, ms in rows.items():
            if cat != "total (wall)":
                print(f"  {cat:22s} {ms:6.2f} ms  {ms / total:5.1%}")
    result["loadavg_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
