"""Engine benchmark: our sampling engine vs diffusers' UNet2DModel with the same weights, one run.

Cases (issue 5): our engine (bf16 + CUDA graphs + fused Triton kernels through ``Pipeline``) on the
``ddpm-cifar10`` preset and on the served ``fmnist`` model; diffusers UNet2DModel with the same
weights (our UNet exported to diffusers' layout, so both compute the same function) in eager
fp16 and, with ``--compile``, torch.compile; batch 1, 16, 64, 256; DDIM 10 and 50 steps;
purification (t* = 0.1, 10 steps); and a single network evaluation. Prints images/s, latency,
TFLOP/s achieved (12.1 GFLOP per image per evaluation for ddpm-cifar10) and the ratio to
diffusers eager.

    python bench/bench_engine.py [--out bench.json] [--compile]       # on a CUDA machine
    python bench/bench_engine.py --smoke                                # seconds on a CPU: tiny shapes
    python bench/bench_engine.py --device cpu --checkpoint models/weights/fmnist-dro-at.safetensors

``--device cpu`` (issue 29) times the served CPU path (``Pipeline.sample`` with its ``CpuOptions``:
fp32, and with ``--variants`` bf16 / bf16+compile / ...) against diffusers' UNet2DModel +
DDIMScheduler with the same weights in eager fp32, at ``--batches`` and ``--threads``, all cases
interleaved round by round (the machine may be shared: compare ratios within a round), and measures
the fp32 and bf16 ceilings in the same run: oneDNN's GFLOP/s on the network's own convolutions at
batch 128, turned into images/s with the network's FLOPs per image. Medians of ``--rounds``.

Timing: warm-up first (graph capture included in warm-up, reported separately as start-up),
then the median of ``--repeats`` timed runs, synchronising the device around each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see service/threads.py

import torch

from models.checkpoint import CheckpointHeader, save_checkpoint
from models.evaluation.common import machine_description
from models.pipeline import Pipeline
from models.unet import UNet, UNetConfig, preset

GFLOP_PER_EVAL = {"ddpm-cifar10": 12.1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def to_diffusers(net: UNet) -> object:
    """A diffusers UNet2DModel holding ``net``'s weights (the inverse of models.diffusers_import)."""
    from diffusers import UNet2DModel

    from models.diffusers_import import rename_key

    cfg: UNetConfig = net.cfg
    chans = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    res = [cfg.image_size // 2**i for i in range(len(chans))]
    attn = [r in cfg.attention_resolutions for r in res]
    model = UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=chans,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.groups,
        norm_eps=cfg.norm_eps,
        attention_head_dim=chans[attn.index(True)] // cfg.num_heads if any(attn) else None,
        flip_sin_to_cos=cfg.time_flip_sin_to_cos,
        freq_shift=int(cfg.time_freq_shift),
        dropout=cfg.dropout,
    )
    ours = net.state_dict()
    theirs = {k: ours[rename_key(k)] for k in model.state_dict()}
    model.load_state_dict(theirs)
    return model.eval()


def diffusers_ddim(
    model: object, batch: int, steps: int, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]
) -> Callable[[], torch.Tensor]:
    """diffusers' own DDIM scheduler loop (what a diffusers user runs), in ``dtype``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    sched.set_timesteps(steps)
    gen = torch.Generator(device=device).manual_seed(0)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        x = torch.randn((batch, *shape), generator=gen, device=device, dtype=dtype)
        for t in sched.timesteps:
            eps = model(x, t.to(device)).sample  # type: ignore[operator]
            x = sched.step(eps, t, x).prev_sample
        return x

    return run


def bench(args: argparse.Namespace) -> list[dict[str, object]]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench_engine: a CUDA device is needed (use --smoke for a quick CPU run of the same code)")
    presets = ["tiny"] if args.smoke else ["ddpm-cifar10", "fmnist"]
    batches = [1, 4] if args.smoke else [1, 16, 64, 256]
    step_counts = [2] if args.smoke else [10, 50]
    rows: list[dict[str, object]] = []
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in presets:
        torch.manual_seed(0)
        net = UNet(preset(name))
        ckpt = workdir / f"{name}-random.safetensors"
        save_checkpoint(ckpt, net, CheckpointHeader(name=f"{name}-random", model=net.cfg))
        start = time.perf_counter()
        pipe = Pipeline.from_checkpoint(ckpt, device=str(device), batch_invariant=False)
        pipe.warmup(max(batches))
        _sync(device)
        startup = time.perf_counter() - start
        shape = pipe.info.image_shape
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        ref = to_diffusers(net).to(device, dtype) if not args.no_diffusers else None
        compiled = torch.compile(ref, mode="max-autotune") if ref is not None and args.compile else None
        for batch in batches:
            seeds = list(range(batch))
            images = torch.rand((batch, *shape)) * 2 - 1
            cases: list[tuple[str, int, int, Callable[[], object]]] = []
            for steps in step_counts:
                cases.append(
                    (
                        f"ours ddim-{steps}",
                        steps,
                        steps,
                        partial(pipe.sample, seeds, sampler="ddim", steps=steps),
                    )
                )
                if ref is not None:
                    cases.append(
                        (
                            f"diffusers-eager ddim-{steps}",
                            steps,
                            steps,
                            diffusers_ddim(ref, batch, steps, device, dtype, shape),
                        )
                    )
                if compiled is not None:
                    cases.append(
                        (
                            f"diffusers-compiled ddim-{steps}",
                            steps,
                            steps,
                            diffusers_ddim(compiled, batch, steps, device, dtype, shape),
                        )
                    )
            purify_steps = 2 if args.smoke else 10
            cases.append(
                (
                    "ours purify t*=0.1",
                    purify_steps,
                    purify_steps,
                    partial(pipe.purify, images, seeds, t_star=0.1, steps=purify_steps),
                )
            )
            cases.append(("ours one evaluation", 1, 1, partial(pipe.sample, seeds, sampler="ddim", steps=1)))
            for label, steps, evals, fn in cases:
                fn()  # warm-up (allocations, cuDNN autotune)
                sec = _median_s(fn, device, args.repeats)
                gflop = GFLOP_PER_EVAL.get(name)
                rows.append(
                    {
                        "model": name,
                        "case": label,
                        "batch": batch,
                        "steps": steps,
                        "latency_ms": sec * 1e3,
                        "images_per_s": batch / sec,
                        "tflops": (gflop * evals * batch / sec / 1e3) if gflop else None,
                        "startup_s": startup,
                    }
                )
                print(
                    f"{name:13s} {label:28s} batch {batch:4d}: {sec * 1e3:9.2f} ms  {batch / sec:10.1f} img/s",
                    flush=True,
                )
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["model"] == row["model"]
                and r["batch"] == row["batch"]
                and r["case"] == str(row["case"]).replace("ours", "diffusers-eager")
            ),
            None,
        )
        row["vs_diffusers_eager"] = (
            (float(row["images_per_s"]) / float(base["images_per_s"])) if base and base is not row else None
        )  # type: ignore[arg-type]
    return rows


CPU_VARIANTS = {
    "fp32": {},
    "fp32-pad": {"pad": True},
    "fp32-channels-last": {"channels_last": True},
    "bf16": {"dtype": "bfloat16"},
    "fp32-compile": {"compile": True, "freeze": False},
    "bf16-compile": {"dtype": "bfloat16", "compile": True, "freeze": False},
    "fp32-compile-freeze": {"compile": True, "freeze": True},
    "bf16-compile-freeze": {"dtype": "bfloat16", "compile": True, "freeze": True},
}


def network_gflop(net: UNet, shape: tuple[int, ...]) -> float:
    """GFLOP of one network evaluation of one image (2 per multiply-add, torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(torch.zeros(1, *shape), torch.zeros(1))
    return counter.get_total_flops() / 1e9


def conv_ceiling(
    net: UNet,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    batch: int = 128,
    fmt: torch.memory_format = torch.contiguous_format,
) -> float:
    """GFLOP/s of oneDNN on this network's own convolutions (each shape once, batch ``batch``, in
    ``dtype`` and layout ``fmt``): what the convolutions, ~all of the network's FLOPs, could run at
    on this machine. On one thread it is timed in CPU time, so other processes' load does not lower
    it (wall time on more threads)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    seen: list[tuple[torch.nn.Conv2d, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append((mod, tuple(inp[0].shape[1:]))))
        for m in net.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.inference_mode():
        net(torch.zeros(1, *shape), torch.zeros(1))
    for h in hooks:
        h.remove()
    flops = seconds = 0.0
    with torch.inference_mode():
        for conv, in_shape in seen:
            x = torch.randn(batch, *in_shape, dtype=dtype).contiguous(memory_format=fmt)
            w = conv.weight.to(dtype).contiguous(memory_format=fmt)
            b = None if conv.bias is None else conv.bias.to(dtype)

            def run(
                x: torch.Tensor = x, w: torch.Tensor = w, b: torch.Tensor | None = b, c: object = conv
            ) -> object:
                return torch.mkldnn_convolution(x, w, b, c.padding, c.stride, c.dilation, c.groups)  # type: ignore[attr-defined]

            out = run()
            best = float("inf")
            for _ in range(3):  # the best of three: a ceiling, on a machine others may be using
                t0 = clock()
                run()
                best = min(best, clock() - t0)
            seconds += best
            flops += 2.0 * out.numel() * w[0].numel()
    return flops / seconds / 1e9


def cpu_bench(args: argparse.Namespace) -> dict[str, object]:
    """The served CPU path vs diffusers eager fp32, interleaved, with the ceilings in the same run."""

    from models.checkpoint import load_checkpoint
    from models.pipeline import CpuOptions, cpu_bf16_support

    ckpt = Path(args.checkpoint)
    net, _ = load_checkpoint(ckpt, torch.device("cpu"))
    net.eval()
    shape = (net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size)
    gflop = network_gflop(net, shape)
    variants = [v for v in args.variants if v.startswith("fp32") or cpu_bf16_support()]
    pipes: dict[str, Pipeline] = {}
    startup: dict[str, float] = {}
    torch._dynamo.config.recompile_limit = 64  # compiled variants share UNet.forward's cache of graphs
    for v in variants:
        t0 = time.perf_counter()
        pipes[v] = Pipeline.from_checkpoint(ckpt, cpu=CpuOptions(**CPU_VARIANTS[v]))  # type: ignore[arg-type]
        pipes[v].warmup()
        startup[v] = time.perf_counter() - t0
        print(f"{v}: start-up and warm-up {startup[v]:.1f} s", flush=True)
    ref = to_diffusers(net) if not args.no_diffusers else None
    times: dict[tuple[str, int, int], list[float]] = {}
    ceilings: dict[tuple[str, int], list[float]] = {}
    layout_ceilings: dict[str, list[float]] = {}
    loads: list[float] = []  # the 1-minute load average after every timed case
    # CPU seconds of each case: on one thread, images per CPU-second compare the cases whatever share
    # of the core the machine's other work leaves this process (wall-clock images/s follow that share).
    cpu_times: dict[tuple[str, int, int], list[float]] = {}

    def summary() -> dict[str, object]:
        """The medians so far (written after every round: a long run that is stopped keeps them)."""
        rows: list[dict[str, object]] = []
        for (label, threads, batch), ts in times.items():
            sec = statistics.median(ts)
            base = times.get(("diffusers eager fp32", threads, batch))
            fp32_ceiling = statistics.median(ceilings[("fp32", threads)])
            bf16 = ceilings.get(("bf16", threads))
            rows.append(
                {
                    "case": label,
                    "threads": threads,
                    "batch": batch,
                    "steps": args.steps,
                    "images_per_s": batch / sec,
                    "latency_ms": sec * 1e3,
                    "rounds_s": ts,
                    "rounds_cpu_s": cpu_times[(label, threads, batch)],
                    "images_per_cpu_s": batch / statistics.median(cpu_times[(label, threads, batch)]),
                    "vs_diffusers_eager_fp32_cpu": statistics.median(
                        cpu_times[("diffusers eager fp32", threads, batch)]
                    )
                    / statistics.median(cpu_times[(label, threads, batch)])
                    if ("diffusers eager fp32", threads, batch) in cpu_times
                    else None,
                    "vs_diffusers_eager_fp32": statistics.median(base) / sec if base else None,
                    "gflop_per_s": gflop * args.steps * batch / sec,
                    "pct_of_fp32_ceiling": gflop * args.steps * batch / sec / fp32_ceiling,
                    # on one thread the ceiling is in CPU time too, so this one is like for like
                    "pct_of_fp32_ceiling_cpu": gflop
                    * args.steps
                    * batch
                    / statistics.median(cpu_times[(label, threads, batch)])
                    / fp32_ceiling,
                    "pct_of_bf16_ceiling": gflop * args.steps * batch / sec / statistics.median(bf16)
                    if bf16
                    else None,
                }
            )
        return {
            "gflop_per_image_per_eval": gflop,
            "ceilings_gflop_per_s": {
                f"{d} {t} thread(s)": statistics.median(v) for (d, t), v in ceilings.items()
            },
            "ceilings_by_layout_gflop_per_s": {k: statistics.median(v) for k, v in layout_ceilings.items()},
            "ceiling_images_per_s": {
                f"{d} {t} thread(s)": statistics.median(v) / (gflop * args.steps)
                for (d, t), v in ceilings.items()
            },
            "startup_s": startup,
            "loadavg_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
            "cpu_bf16": cpu_bf16_support(),
            "rows": rows,
        }

    for rnd in range(args.rounds):
        if rnd and args.out:  # the rounds so far, in case a long run is stopped
            write_cpu(args, summary())
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                if dtype_name == "fp32" or cpu_bf16_support():
                    # The ceiling is the better of the two layouts oneDNN takes (NHWC is faster here).
                    by_layout = {
                        name: conv_ceiling(net, shape, dtype, fmt=fmt)
                        for name, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last))
                    }
                    for name, val in by_layout.items():
                        layout_ceilings.setdefault(f"{dtype_name} {name} {threads} thread(s)", []).append(val)
                    ceilings.setdefault((dtype_name, threads), []).append(max(by_layout.values()))
            for batch in args.batches:
                seeds = list(range(batch))
                cases: list[tuple[str, Callable[[], object]]] = [
                    (f"robustdiff {v}", partial(pipes[v].sample, seeds, sampler="ddim", steps=args.steps))
                    for v in variants
                ]
                if ref is not None:
                    cases.append(
                        (
                            "diffusers eager fp32",
                            diffusers_ddim(ref, batch, args.steps, torch.device("cpu"), torch.float32, shape),
                        )
                    )
                for label, fn in cases:
                    if rnd == 0 and batch <= 8:  # warm-up; a larger batch's first run is warm enough
                        fn()
                    t0, cpu0 = time.perf_counter(), time.process_time()
                    fn()
                    times.setdefault((label, threads, batch), []).append(time.perf_counter() - t0)
                    cpu_times.setdefault((label, threads, batch), []).append(time.process_time() - cpu0)
                    loads.append(os.getloadavg()[0])
                    print(
                        f"round {rnd} threads {threads} batch {batch:4d} {label:28s} "
                        f"{batch / times[(label, threads, batch)][-1]:7.2f} img/s  load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )

    return summary()


def write_cpu(args: argparse.Namespace, result: dict[str, object]) -> None:
    meta = {
        "command": " ".join(sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description("cpu"),
        "torch": torch.__version__,
        "loadavg_end": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **result}, indent=1))


def print_cpu(result: dict[str, object]) -> None:
    print(f"\n{result['gflop_per_image_per_eval']:.3f} GFLOP per image per evaluation")
    for key, val in result["ceilings_gflop_per_s"].items():  # type: ignore[attr-defined]
        img = result["ceiling_images_per_s"][key]  # type: ignore[index]
        print(f"ceiling {key}: {val:.1f} GFLOP/s -> {img:.2f} img/s")
    print(
        "case                         threads batch    img/s  img/CPU-s  x diffusers (wall, CPU)  % fp32 ceiling (CPU)"
    )
    for r in result["rows"]:  # type: ignore[attr-defined]
        wall, cpu = r["vs_diffusers_eager_fp32"], r["vs_diffusers_eager_fp32_cpu"]
        ratio = f"{wall:8.2f} {cpu:6.2f}" if wall and cpu else "       -      -"
        print(
            f"{r['case']:28s} {r['threads']:7d} {r['batch']:5d} {r['images_per_s']:8.2f} "
            f"{r['images_per_cpu_s']:10.2f} {ratio}          {r['pct_of_fp32_ceiling_cpu']:13.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, CPU, two batch sizes: checks the script runs"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baseline")
    parser.add_argument(
        "--compile", action="store_true", help="also time diffusers under torch.compile (minutes to compile)"
    )
    parser.add_argument("--workdir", default="runs/bench_engine")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the CPU engine bench")
    parser.add_argument(
        "--checkpoint", default="models/weights/fmnist-dro-at.safetensors", help="--device cpu: the model"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128], help="--device cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="--device cpu: torch threads")
    parser.add_argument("--steps", type=int, default=10, help="--device cpu: DDIM steps")
    parser.add_argument("--rounds", type=int, default=3, help="--device cpu: interleaved rounds")
    parser.add_argument(
        "--variants", nargs="+", default=["fp32", "bf16", "bf16-compile"], choices=sorted(CPU_VARIANTS),
        help="--device cpu: robustdiff CPU options to time (bf16 ones only where the CPU has bf16)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device == "cpu":
        result = cpu_bench(args)
        print_cpu(result)
        if args.out:
            write_cpu(args, result)
        return
    rows = bench(args)
    print("\nmodel         case                          batch  latency ms    img/s  TFLOP/s  x diffusers")
    for r in rows:
        tf = f"{r['tflops']:8.1f}" if r["tflops"] is not None else "       -"
        ratio = f"{r['vs_diffusers_eager']:10.2f}" if r["vs_diffusers_eager"] is not None else "         -"
        print(
            f"{r['model']!s:13s} {r['case']!s:29s} {r['batch']:5d} {r['latency_ms']:11.2f} {r['images_per_s']:8.1f} {tf} {ratio}"
        )
    if args.out:
        meta = {
            "command": " ".join(sys.argv),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_description("cuda" if torch.cuda.is_available() else "cpu"),
            "torch": torch.__version__,
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
