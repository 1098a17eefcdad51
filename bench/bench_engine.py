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

Timing: warm-up first (graph capture included in warm-up, reported separately as start-up),
then the median of ``--repeats`` timed runs, synchronising the device around each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch

from models.checkpoint import CheckpointHeader, save_checkpoint
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
    args = parser.parse_args()
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
            "machine": torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
