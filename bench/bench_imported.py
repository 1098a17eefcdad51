"""Per-resolution cost of the public checkpoints users import: one network evaluation and peak memory.

For the full-width public layouts (google/ddpm-cifar10-32, the 256x256 DDPM layout of
ddpm-celebahq-256 / ddpm-ema-church-256, openai/diffusers-cd_imagenet64), built from their
diffusers configs through ``models.diffusers_import`` with random weights (the cost does not depend
on the values), this times batch-1 and batch-4 network evaluations, interleaved across layouts,
on the plain network (``--path plain``) or as a CPU worker runs it (``--path served``: pinned
batch-invariant kernels, ROBUSTDIFF_CPU_MICRO_BATCH_PIXELS' rows per call, through ``Pipeline.forward``),
median of ``--repeats``, and reads the process's peak resident memory after each layout. A served
request costs about images x NFE x (seconds per image per evaluation): the figure the worker also
measures at warm-up (ModelInfo.eval_s) and the API uses to answer 202 instead of timing out.

    OMP_NUM_THREADS=1 python bench/bench_imported.py --device cpu --out bench/results/imported/cpu.json
    OMP_NUM_THREADS=1 python bench/bench_imported.py --path served --out bench/results/imported/cpu_served.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.checkpoint import CheckpointHeader, TrainingInfo  # noqa: E402
from models.diffusers_import import unet_config_from_diffusers  # noqa: E402
from models.evaluation.common import machine_description  # noqa: E402
from models.pipeline import Pipeline  # noqa: E402
from models.schedules import ScheduleConfig  # noqa: E402
from models.testing import DDPM_CIFAR10_32  # noqa: E402
from models.unet import UNet, count_parameters  # noqa: E402

LAYOUTS: dict[str, dict[str, object]] = {
    "ddpm-cifar10-32": DDPM_CIFAR10_32,
    "ddpm-256 (celebahq/church/bedroom/cat)": {
        **DDPM_CIFAR10_32,
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
        "sample_size": 256,
    },
    "cd_imagenet64": {
        "sample_size": 64,
        "layers_per_block": 3,
        "num_class_embeds": 1000,
        "block_out_channels": [192, 384, 576, 768],
        "attention_head_dim": 64,
        "attn_norm_num_groups": 32,
        "down_block_types": ["ResnetDownsampleBlock2D"] + ["AttnDownBlock2D"] * 3,
        "up_block_types": ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
        "resnet_time_scale_shift": "scale_shift",
        "upsample_type": "resnet",
        "downsample_type": "resnet",
    },
}


def served_forward(net: UNet, device: torch.device) -> Any:
    """The network as a worker calls it: ``Pipeline.forward`` with the service's default CPU options."""
    header = CheckpointHeader(
        name="bench",
        model=net.cfg,
        schedule=ScheduleConfig(),
        training=TrainingInfo(method="random-init", dataset="none"),
        class_names=[str(i) for i in range(net.cfg.num_classes)],
    )
    return Pipeline(net, header, device).forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--only", default=None, help="comma-separated layout names (default: all)")
    parser.add_argument("--path", choices=["plain", "served"], default="plain")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    nets: dict[str, Any] = {}
    calls: dict[str, Any] = {}
    chosen = LAYOUTS if args.only is None else {k: LAYOUTS[k] for k in args.only.split(",")}
    for name, config in chosen.items():
        nets[name] = UNet(unet_config_from_diffusers(config)).to(device).eval()
        calls[name] = nets[name] if args.path == "plain" else served_forward(nets[name], device)
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in nets for b in batches}
    peak_mib: dict[str, float] = {}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, net in nets.items():
                size, classes = net.cfg.image_size, net.cfg.num_classes
                for b in batches:
                    x = torch.randn(b, 3, size, size, device=device)
                    t = torch.full((b,), 500.0, device=device)
                    y = torch.zeros(b, dtype=torch.long, device=device) if classes else None
                    start = time.perf_counter()
                    calls[name](x, t, y)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep:
                        times[(name, b)].append(time.perf_counter() - start)
                    print(f"round {rep} {name} batch {b}: {time.perf_counter() - start:.2f} s", flush=True)
                peak_mib[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        {
            "layout": name,
            "image_size": nets[name].cfg.image_size,
            "parameters": count_parameters(nets[name]),
            "batch": b,
            "median_s": statistics.median(times[(name, b)]),
            "s_per_image": statistics.median(times[(name, b)]) / b,
            "peak_rss_mib_so_far": round(peak_mib[name]),
        }
        for name in nets
        for b in batches
    ]
    result = {
        "benchmark": "bench_imported",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "path": args.path,
        "machine": machine_description(args.device),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['layout']:<40} batch {r['batch']}: {r['median_s']:.2f} s ({r['s_per_image']:.2f} s/image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
