"""Host overhead of one batch-1 Pipeline call: the Python and tensor work around the network.

At batch 1 a CUDA-graphed network evaluation takes ~0.1-2 ms, so whatever the call does on the host
besides it (time grid, sampler coefficients, copies, checks) is the latency floor that no kernel
removes. For each (task, sampler, steps) this times, median of ``--repeats``:

- ``call``: the whole ``Pipeline.sample`` / ``Pipeline.purify`` call, sampler plans cached (served case);
- ``cold``: the same call with the plan cache emptied first (the table every call rebuilt before plans were cached);
- ``network``: the call's network evaluations alone (``steps`` batch-1 forwards);

and reports host = call - network and the plan cost = cold - call. On a CPU the network's own
noise hides sub-millisecond host costs, so ``--network null`` replaces it by zeros: every timing is
then the host overhead alone, and ``--clock cpu`` counts this process's CPU time instead of wall
time, so other jobs on a shared machine do not inflate it.

    python bench/bench_host.py --device cpu --network null --clock cpu --out bench/results/host/host-cpu.json
    python bench/bench_host.py --device cuda --checkpoint models/weights/fmnist-cd.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from models.devices import device_option
from models.evaluation.common import machine_description
from models.pipeline import Pipeline
from models.samplers import PLANS
from models.testing import tiny_checkpoint

CASES = (
    ("sample", "ddim", 1),
    ("sample", "ddim", 10),
    ("sample", "dpm-solver++", 10),
    ("purify", "ddim", 10),
)
CM_CASES = (("sample", "consistency", 1), ("sample", "consistency", 2), ("purify", "consistency", 1))


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed_ms(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (clock() - start)


def null_network(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """A network that costs nothing, so a call's time is its host overhead alone."""
    return torch.zeros_like(x)


def bench(pipe: Pipeline, repeats: int, clock: str = "wall") -> list[dict[str, object]]:
    """Rows per case; the three timings are interleaved per repeat so machine drift hits all alike."""
    cases = CM_CASES if pipe.info.kind == "consistency" else CASES
    labels = [0] if pipe.info.num_classes else None
    image = torch.zeros(1, *pipe.info.image_shape)
    x = torch.zeros(1, *pipe.info.image_shape, device=pipe.device)
    t = torch.zeros(1, device=pipe.device)
    y = None if labels is None else torch.zeros(1, dtype=torch.long, device=pipe.device)
    rows: list[dict[str, object]] = []
    for task, sampler, steps in cases:

        def call(task: str = task, sampler: str = sampler, steps: int = steps) -> object:
            if task == "sample":
                return pipe.sample([7], sampler=sampler, steps=steps, labels=labels)
            return pipe.purify(image, [7], t_star=0.1, sampler=sampler, steps=steps, labels=labels)

        def cold() -> object:
            PLANS.clear()
            return call()

        @torch.inference_mode()
        def network(steps: int = steps) -> object:
            return [pipe.forward(x, t, y) for _ in range(steps)]

        call()  # warm-up: pages the weights in, captures graphs, builds the plan
        network()
        times: dict[str, list[float]] = {"call": [], "cold": [], "network": []}
        for _ in range(repeats):
            for name, fn in (("call", call), ("cold", cold), ("network", network)):
                times[name].append(_timed_ms(fn, pipe.device, CLOCKS[clock]))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "task": task,
                "sampler": sampler,
                "steps": steps,
                "call_ms": round(med["call"], 4),
                "cold_ms": round(med["cold"], 4),
                "network_ms": round(med["network"], 4),
                "host_ms": round(med["call"] - med["network"], 4),
                "plan_ms": round(med["cold"] - med["call"], 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint to run (default: a fresh random tiny model)")
    p.add_argument("--device", default="cpu", type=device_option, help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per case (median reported)")
    p.add_argument(
        "--network",
        choices=("unet", "null"),
        default="unet",
        help="null: replace the network by zeros, so every timing is host overhead alone (CPU-measurable)",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall (perf_counter), or cpu: this process's CPU time, which a busy machine does not inflate "
        "(CPU device only: it leaves out time spent waiting for a GPU)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--workdir", default="runs/bench-host", help="where the tiny checkpoint is written")
    p.add_argument("--out", help="JSON file for the rows and the machine")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        sys.exit("bench_host: --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    path = args.checkpoint
    if path is None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        path = tiny_checkpoint(Path(args.workdir) / "tiny.safetensors")
    elif not Path(path).is_file():
        sys.exit(f"bench_host: --checkpoint {path} does not exist")
    try:
        pipe = Pipeline.from_checkpoint(path, device=args.device)
    except ValueError as err:
        sys.exit(f"bench_host: {err}")
    if args.network == "null":
        pipe._forward = null_network
    if args.clock == "cpu" and pipe.device.type == "cuda":
        sys.exit("bench_host: --clock cpu leaves out the GPU's time; use --clock wall on CUDA")
    rows = bench(pipe, args.repeats, args.clock)
    if args.out:
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_description(str(pipe.device)),
            "torch": torch.__version__,
            "device": str(pipe.device)
            + (f" ({torch.cuda.get_device_name(pipe.device)})" if pipe.device.type == "cuda" else ""),
            "threads": args.threads,
            "checkpoint": str(path),
            "model": pipe.info.name,
            "network": args.network,
            "clock": args.clock,
            "repeats": args.repeats,
            "command": " ".join(
                ["python", "bench/bench_host.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
