"""GPU micro-benchmark: each Triton kernel vs the eager PyTorch reference at DDPM CIFAR-10 shapes.

Batch 256, bf16: GroupNorm+SiLU (with the time-embedding shift) at the four UNet resolutions,
and the sampler update with noise at the image shape. Median of ``triton.testing.do_bench``.
Three columns: the Triton kernel, ``kernels.reference`` (float32 math; its sampler noise is drawn
on the host, which the kernel exists to avoid), and plain eager PyTorch ops in the input dtype
(``torch.randn_like`` noise), the baseline a diffusers-style model would run.

    python bench/bench_kernels.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

GROUPNORM_SHAPES = [(256, 128, 32, 32), (256, 256, 16, 16), (256, 256, 8, 8), (256, 256, 4, 4)]
SAMPLER_SHAPE = (256, 3, 32, 32)
GROUPS = 32


def _median_us(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e3


Case = tuple[str, Callable[[], object], Callable[[], object], Callable[[], object]]


def _eager_groupnorm(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, shift: torch.Tensor
) -> Callable[[], torch.Tensor]:
    w, b = w.to(x.dtype), b.to(x.dtype)
    return lambda: F.silu(F.group_norm(x, GROUPS, w, b) + shift[:, :, None, None])


def _eager_step(
    x: torch.Tensor, m: torch.Tensor, prev: torch.Tensor, coef: torch.Tensor
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    kx, km, p, q, r, n = (c.to(x.dtype)[:, None, None, None] for c in coef.unbind(1))

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        x0 = kx * x + km * m
        return p * x + q * x0 + r * prev + n * torch.randn_like(x), x0

    return step


def _cases(dtype: torch.dtype) -> list[Case]:
    """(name, Triton call, reference call, plain eager call) for every benchmarked shape."""
    import kernels

    cuda = torch.device("cuda")
    cases: list[Case] = []
    for shape in GROUPNORM_SHAPES:
        for fmt, tag in ((torch.contiguous_format, "nchw"), (torch.channels_last, "nhwc")):
            x = torch.randn(shape, device=cuda, dtype=dtype).contiguous(memory_format=fmt)
            w, b = torch.randn(shape[1], device=cuda), torch.randn(shape[1], device=cuda)
            shift = torch.randn(shape[0], shape[1], device=cuda, dtype=dtype)
            gn = partial(kernels.groupnorm_silu, x, GROUPS, w, b, shift=shift)
            name = f"groupnorm_silu {list(shape)} {tag}"
            cases.append(
                (
                    name,
                    partial(gn, impl="triton"),
                    partial(gn, impl="reference"),
                    _eager_groupnorm(x, w, b, shift),
                )
            )
    x, m, prev = (torch.randn(SAMPLER_SHAPE, device=cuda, dtype=dtype) for _ in range(3))
    coef = torch.randn(SAMPLER_SHAPE[0], 6, device=cuda)
    seeds = torch.randint(0, 2**62, (SAMPLER_SHAPE[0],), device=cuda)
    step = partial(kernels.sampler_update, x, m, coef, x0_prev=prev, seeds=seeds, stream=1)
    name = f"sampler_update {list(SAMPLER_SHAPE)} +x0_prev +noise"
    cases.append(
        (name, partial(step, impl="triton"), partial(step, impl="reference"), _eager_step(x, m, prev, coef))
    )
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device (none found); nothing was timed.", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    header = f"{'kernel':<46} {'triton us':>10} {'ref us':>9} {'eager us':>9} {'vs ref':>7} {'vs eager':>8}"
    print(header)
    for name, fused, ref, eager in _cases(dtype):
        t_us, r_us, e_us = _median_us(fused), _median_us(ref), _median_us(eager)
        rows.append(
            {
                "kernel": name,
                "triton_us": t_us,
                "reference_us": r_us,
                "eager_us": e_us,
                "speedup_vs_reference": r_us / t_us,
                "speedup_vs_eager": e_us / t_us,
            }
        )
        print(f"{name:<46} {t_us:>10.1f} {r_us:>9.1f} {e_us:>9.1f} {r_us / t_us:>6.2f}x {e_us / t_us:>7.2f}x")
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype}
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
