"""Triton sampler update and noise: one fused pass per step, noise drawn in-kernel, never on the host.

The noise is the counter-based stream of ``kernels.rng`` (Philox4x32-10 keyed by the row's seed,
counter (element, stream, 0, 0), Box-Muller), so it matches the CPU reference to float32 rounding.
The launchers are ``torch.library.triton_op``s, so ``torch.compile`` can trace through them.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_MAX_BLOCK = 1024
_STREAM_LIMIT = 2**31


@triton.jit
def _normal_from_bits(r0, r1):
    """Box-Muller on two uint32 blocks with the uniform map of ``kernels.rng.uniform_from_bits``.

    The uniforms are formed from integers so they are exact, and ln(u1) near u1 = 1 comes from the
    atanh series of 1 - u1 rather than from log(u1): a float32 log there would lose the few
    significant bits that decide the (small) radius.
    """
    k1 = (r0 >> 8).to(tl.int32)
    k2 = (r1 >> 8).to(tl.int32)
    u1 = (k1.to(tl.float32) + 0.5) * 5.9604644775390625e-08
    v1 = ((16777215 - k1).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    s = v1 / (2.0 - v1)
    s2 = s * s
    log_near_one = -2.0 * s * (1.0 + s2 * (0.3333333333333333 + s2 * 0.2))
    log_u1 = tl.where(v1 < 0.0625, log_near_one, tl.log(u1))
    radius = tl.sqrt(-2.0 * log_u1)
    # cos(2*pi*u2) = -cos(2*pi*(u2 - 1/2)); the shifted angle is exact and stays in (-pi, pi).
    centred = ((k2 - 8388608).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    return -radius * tl.cos(6.283185307179586 * centred)


@triton.jit
def _standard_normal(seed, idx, noise_stream):
    """Normal draws for element indices ``idx`` of (seed, stream), as ``kernels.rng.randn_rows``."""
    zero = idx * 0
    r0, r1, _, _ = tl.philox(seed, idx, zero + noise_stream, zero, zero)
    return _normal_from_bits(r0, r1)


# Kernel arguments are never called ``stream``: Inductor's launcher has a parameter of that name.
@triton.jit
def _randn_rows_kernel(seed_ptr, out_ptr, numel, noise_stream, blocks_per_row, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    idx = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    seed = tl.load(seed_ptr + row)
    z = _standard_normal(seed, idx, noise_stream)
    tl.store(out_ptr + row.to(tl.int64) * numel + idx, z, mask=mask)


@triton.jit
def _sampler_update_kernel(
    x_ptr,
    model_ptr,
    prev_ptr,
    seed_ptr,
    coef_ptr,
    next_ptr,
    x0_ptr,
    stream_ptr,
    numel,
    blocks_per_row,
    HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    idx = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    offs = row.to(tl.int64) * numel + idx
    c = coef_ptr + row * 6
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(model_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(c) * x + tl.load(c + 1) * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    x_next = tl.load(c + 2) * x + tl.load(c + 3) * x0
    if HAS_PREV:  # a row whose r is 0 skips the term (its x0_prev may be another row's leftover)
        r = tl.load(c + 4)
        prev = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_next = tl.where(r != 0.0, x_next + r * prev, x_next)
    if HAS_NOISE:
        n = tl.load(c + 5)
        z = _standard_normal(tl.load(seed_ptr + row), idx, tl.load(stream_ptr + row))
        x_next = tl.where(n != 0.0, x_next + n * z, x_next)
    tl.store(next_ptr + offs, x_next.to(next_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _row_blocks(numel: int) -> tuple[int, int]:
    """(BLOCK, blocks per row): one row never shares a program with another, so rows stay independent."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(numel, 1)))
    return block, triton.cdiv(numel, block)


def _check_stream(stream: int) -> None:
    if not 0 <= stream < _STREAM_LIMIT:
        raise ValueError(f"stream must be in [0, 2**31), got {stream}")


@triton_op("robustdiff::randn_rows", mutates_args=())
def _randn_rows_op(seeds: torch.Tensor, stream: int, numel: int) -> torch.Tensor:
    out = torch.empty((seeds.shape[0], numel), dtype=torch.float32, device=seeds.device)
    if out.numel() == 0:
        return out
    block, per_row = _row_blocks(numel)
    grid = (seeds.shape[0] * per_row,)
    wrap_triton(_randn_rows_kernel)[grid](seeds, out, numel, stream, per_row, BLOCK=block, num_warps=4)
    return out


@triton_op("robustdiff::sampler_update", mutates_args=())
def _sampler_update_op(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    x0_prev: torch.Tensor | None,
    seeds: torch.Tensor | None,
    streams: torch.Tensor,
    clip_x0: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    x_next = torch.empty_like(x)
    x0 = torch.empty_like(x)
    if x.numel() == 0:
        return x_next, x0
    numel = x.numel() // x.shape[0]
    block, per_row = _row_blocks(numel)
    grid = (x.shape[0] * per_row,)
    wrap_triton(_sampler_update_kernel)[grid](
        x,
        model_out.contiguous(),
        x if x0_prev is None else x0_prev.contiguous(),
        coef if seeds is None else seeds,
        coef,
        x_next,
        x0,
        streams,
        numel,
        per_row,
        HAS_PREV=x0_prev is not None,
        HAS_NOISE=seeds is not None,
        CLIP=clip_x0,
        BLOCK=block,
        num_warps=4,
    )
    return x_next, x0


def randn_rows(seeds: torch.Tensor, stream: int, numel: int, device: torch.device | str) -> torch.Tensor:
    """``kernels.rng.randn_rows`` drawn on the device: [len(seeds), numel] float32."""
    _check_stream(stream)
    seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    return _randn_rows_op(seeds, stream, numel)


def sampler_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    *,
    x0_prev: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stream: int | torch.Tensor = 0,
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``kernels.reference.sampler_update``: x and model_out read once, both outputs written once.

    ``stream`` is one number or one per row (int32 on the device, so a running batch's streams are a
    tensor the step reads, not a constant baked into a launch).
    """
    if model_out.shape != x.shape or (x0_prev is not None and x0_prev.shape != x.shape):
        raise ValueError("x, model_out and x0_prev must have the same shape")
    if coef.shape != (x.shape[0], 6):
        raise ValueError(f"coef must have shape [{x.shape[0]}, 6], got {list(coef.shape)}")
    coef = coef.to(device=x.device, dtype=torch.float32).contiguous()
    if isinstance(stream, torch.Tensor):
        streams = stream.to(device=x.device, dtype=torch.int32).reshape(-1).contiguous()
        if streams.shape[0] != x.shape[0]:
            raise ValueError("stream must be one number or one per row")
    else:
        _check_stream(stream)
        streams = torch.full((x.shape[0],), stream, dtype=torch.int32, device=x.device)
    if seeds is not None:
        seeds = seeds.to(device=x.device, dtype=torch.int64).reshape(-1).contiguous()
        if seeds.shape[0] != x.shape[0]:
            raise ValueError("seeds must hold one seed per row")
    return _sampler_update_op(x, model_out, coef, x0_prev, seeds, streams, clip_x0)
