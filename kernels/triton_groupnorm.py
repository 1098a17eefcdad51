"""Triton GroupNorm fused with the per-channel affine, (1 + scale) / shift modulation and SiLU.

One program per (image, group): statistics in float32 over chunks of the group (each chunk's exact
mean and M2, merged with Chan's formula), then a second sweep writes the output. A group of a
CIFAR-size UNet fits one chunk, so the second sweep reads x from L2. NCHW and channels_last are
both addressed through (channel, pixel) strides, so neither layout is copied.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_TILE = 4096


@triton.jit
def _groupnorm_silu_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    channels,
    hw,
    cpg,
    num_groups,
    stride_b,
    stride_c,
    stride_hw,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_groups
    g = pid % num_groups
    cs = tl.arange(0, BLOCK_C)
    c_mask = cs < cpg
    chan = g * cpg + cs
    x_img = x_ptr + b.to(tl.int64) * stride_b
    out_img = out_ptr + b.to(tl.int64) * stride_b
    c_off = (chan * stride_c)[None, :]
    pix = tl.arange(0, BLOCK_HW)

    count = tl.sum(tl.zeros([BLOCK_C], dtype=tl.float32), axis=0)
    mean = count
    m2 = count
    for start in range(0, hw, BLOCK_HW):
        p = start + pix
        mask = (p < hw)[:, None] & c_mask[None, :]
        v = tl.load(x_img + (p * stride_hw)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        n_chunk = (tl.minimum(hw - start, BLOCK_HW) * cpg).to(tl.float32)
        mean_chunk = tl.sum(tl.sum(v, axis=1), axis=0) / n_chunk
        d = tl.where(mask, v - mean_chunk, 0.0)
        m2_chunk = tl.sum(tl.sum(d * d, axis=1), axis=0)
        total = count + n_chunk
        delta = mean_chunk - mean
        mean += delta * (n_chunk / total)
        m2 += m2_chunk + delta * delta * (count * (n_chunk / total))
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    # y = (x - mean) * a[c] + d[c], with the affine and the modulation folded into a and d.
    if HAS_WEIGHT:
        a = rstd * tl.load(weight_ptr + chan, mask=c_mask, other=1.0).to(tl.float32)
    else:
        a = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    if HAS_BIAS:
        d_c = tl.load(bias_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)
    else:
        d_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(scale_ptr + b * channels + chan, mask=c_mask, other=0.0).to(tl.float32)
        a = a * s1
        d_c = d_c * s1
    if HAS_SHIFT:
        d_c += tl.load(shift_ptr + b * channels + chan, mask=c_mask, other=0.0).to(tl.float32)

    for start in range(0, hw, BLOCK_HW):
        p = start + pix
        mask = (p < hw)[:, None] & c_mask[None, :]
        offs = (p * stride_hw)[:, None] + c_off
        v = tl.load(x_img + offs, mask=mask, other=0.0).to(tl.float32)
        y = (v - mean) * a[None, :] + d_c[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_img + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _dense_nchw_or_nhwc(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is plain or channels_last contiguous, else a plain contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _per_image(t: torch.Tensor | None, batch: int, channels: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(batch, channels).contiguous()


@triton_op("robustdiff::groupnorm_silu", mutates_args=())
def _groupnorm_silu_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
) -> torch.Tensor:
    x = _dense_nchw_or_nhwc(x)
    batch, channels, height, width = x.shape
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    hw = height * width
    cpg = channels // num_groups
    # With W == 1 (or H == W == 1) the pixel stride is the row stride; it is unused when hw == 1.
    stride_hw = x.stride(3) if width > 1 else x.stride(2)
    block_c = triton.next_power_of_2(cpg)
    block_hw = min(triton.next_power_of_2(hw), max(1, _TILE // block_c))
    warps = max(1, min(8, block_c * block_hw // 256))
    scale = _per_image(scale, batch, channels)
    shift = _per_image(shift, batch, channels)
    wrap_triton(_groupnorm_silu_kernel)[(batch * num_groups,)](
        x,
        out,
        x if weight is None else weight.contiguous(),
        x if bias is None else bias.contiguous(),
        x if scale is None else scale,
        x if shift is None else shift,
        channels,
        hw,
        cpg,
        num_groups,
        x.stride(0),
        x.stride(1),
        stride_hw,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        SILU=silu,
        BLOCK_C=block_c,
        BLOCK_HW=block_hw,
        num_warps=warps,
    )
    return out


def groupnorm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """Fused ``kernels.reference.groupnorm_silu`` for [B, C, H, W] x; keeps x's memory format."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {list(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide C={channels}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise ValueError(f"{name} must hold C={channels} values")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.numel() != x.shape[0] * channels:
            raise ValueError(f"{name} must hold B*C={x.shape[0] * channels} values")
    return _groupnorm_silu_op(x, num_groups, weight, bias, float(eps), scale, shift, silu)
