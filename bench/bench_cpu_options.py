"""CPU engine options, one process, 1 torch thread: CPU time per image of one network evaluation at a
micro-batch and for one image (padded where the option pads), start-up, DDIM-10 error against fp32 and
bitwise batch invariance, per option given on the command line, the options interleaved round by round.

    OMP_NUM_THREADS=1 python bench/bench_cpu_options.py fp32 bf16 cl pad
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 10 python bench/bench_cpu_options.py --batch 16 \\
        --rounds 7 --out bench/results/cpu/options-compile.json fp32 compile compile-freeze ...

Times are CPU time of this process (time.process_time), so the machine's other work does not count;
start-up is wall clock (Inductor compiles in worker processes). Inductor's on-disk cache goes to a
fresh directory unless TORCHINDUCTOR_CACHE_DIR is set, so a compile's start-up is a cold one.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-bench-"))

import torch

from models.evaluation.common import machine_description
from models.pipeline import CpuOptions, Pipeline

OPTIONS: dict[str, dict[str, object]] = {
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "cl": {"channels_last": True},
    "pad": {"pad": True},
    "compile": {"compile": True, "freeze": False},
    "compile-freeze": {"compile": True, "freeze": True},
    "compile-freeze-cl": {"compile": True, "freeze": True, "channels_last": True},
    "bf16compile": {"dtype": "bfloat16", "compile": True, "freeze": False},
    "bf16compile-freeze": {"dtype": "bfloat16", "compile": True, "freeze": True},
    "bf16compile-freeze-cl": {"dtype": "bfloat16", "compile": True, "freeze": True, "channels_last": True},
}


def invariant(p: Pipeline, x: torch.Tensor, t: torch.Tensor) -> bool:
    """Every row of a batch that spans a micro-batch and a partial one equals the same row in a
    shuffled batch, and a few rows equal themselves evaluated alone (padded with copies of themselves
    where the option pads), bitwise."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = p.forward(x, t)
        if not torch.equal(p.forward(x[perm], t[perm]), full[perm]):
            return False
        return all(torch.equal(full[i : i + 1], p.forward(x[i : i + 1], t[i : i + 1])) for i in (0, 7, n - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("options", nargs="+", choices=sorted(OPTIONS))
    ap.add_argument("--checkpoint", default="models/weights/fmnist-dro-at.safetensors")
    ap.add_argument("--batch", type=int, default=32, help="rows of the timed evaluation (a micro-batch: 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="JSON with every round, the medians and the load averages")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Every compiled pipeline adds entries to the one cache of UNet.forward (per module, per autocast
    # state); past the limit Dynamo would quietly run the later options eagerly.
    torch._dynamo.config.recompile_limit = 64

    pipes: dict[str, Pipeline] = {}
    startup: dict[str, float] = {}
    loads: list[list[float]] = [list(os.getloadavg())]
    for name in args.options:
        t0 = time.perf_counter()
        pipes[name] = Pipeline.from_checkpoint(args.checkpoint, cpu=CpuOptions(**OPTIONS[name]))  # type: ignore[arg-type]
        pipes[name].warmup()
        startup[name] = time.perf_counter() - t0
        loads.append(list(os.getloadavg()))
        print(
            f"{name}: start-up and warm-up {startup[name]:.1f} s (wall)  load {loads[-1][0]:.1f}", flush=True
        )

    rounds: dict[str, list[float]] = {}
    with torch.inference_mode():  # inputs made here, as the sampler makes them (no retrace on their kind)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, *pipes[args.options[0]].info.image_shape, generator=gen)
        t = torch.rand(args.batch, generator=gen) * 999
        for name in args.options:  # one untimed call at each shape
            pipes[name].forward(x, t)
            pipes[name].forward(x[:1], t[:1])
        for rnd in range(args.rounds):
            for name, p in pipes.items():
                t0 = time.process_time()
                p.forward(x, t)
                rounds.setdefault(f"{name} batch {args.batch}", []).append(
                    (time.process_time() - t0) / args.batch
                )
                t0 = time.process_time()
                p.forward(x[:1], t[:1])
                rounds.setdefault(f"{name} batch 1", []).append(time.process_time() - t0)
            loads.append(list(os.getloadavg()))
            print(f"round {rnd} done  load {loads[-1][0]:.1f}", flush=True)

    ms = {k: 1000 * statistics.median(v) for k, v in rounds.items()}
    for k, v in ms.items():
        print(f"{k:34s} {v:8.2f} ms/img cpu", flush=True)
    ref = pipes.get("fp32") or Pipeline.from_checkpoint(args.checkpoint)
    a = ref.sample(list(range(8)), sampler="ddim", steps=10)
    err: dict[str, float] = {}
    inv: dict[str, bool] = {}
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(1)
        xi = torch.randn(20, *ref.info.image_shape, generator=gen)
        ti = torch.rand(20, generator=gen) * 999
    for name, p in pipes.items():
        b = p.sample(list(range(8)), sampler="ddim", steps=10)
        err[name] = ((a - b).norm() / a.norm()).item()
        inv[name] = invariant(p, xi, ti)
        print(f"{name}: DDIM-10 rel L2 vs fp32 {err[name]:.2e}  bitwise invariant {inv[name]}", flush=True)
    loads.append(list(os.getloadavg()))
    print("load averages", loads[0], "->", loads[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fp32 = {b: ms.get(f"fp32 batch {b}") for b in (args.batch, 1)}
        result = {
            "command": " ".join(sys.argv),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_description("cpu"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "checkpoint": args.checkpoint,
            "batch": args.batch,
            "rounds": args.rounds,
            "startup_wall_s": startup,
            "ms_per_image_cpu_median": ms,
            "vs_fp32_cpu": {
                k: fp32[int(k.rsplit(" ", 1)[1])] / v if fp32[int(k.rsplit(" ", 1)[1])] else None
                for k, v in ms.items()
            },
            "rounds_s_per_image_cpu": rounds,
            "ddim10_rel_l2_vs_fp32": err,
            "bitwise_invariant": inv,
            "loadavg": loads,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
