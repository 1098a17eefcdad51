"""Pure-PyTorch references for every kernel: the CPU path, and the oracle the Triton tests compare to.

They compute in float32 whatever the input dtype and return the input's dtype, like the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.rng import randn_rows


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
    """One sampler step from per-row coefficients ``coef[b] = (kx, km, p, q, r, n)``.

    ``x0 = kx*x + km*model_out`` (clamped to [-1, 1] if ``clip_x0``) and
    ``x_next = p*x + q*x0 + r*x0_prev + n*z`` with ``z = randn_rows(seeds, stream, ...)``; the
    ``r`` term needs ``x0_prev`` and the ``n`` term needs ``seeds``; ``stream`` is one number or
    one per row. A row whose ``r`` (or ``n``) is 0 skips that term, so its bits are those of a call
    without ``x0_prev`` (or ``seeds``): rows at different steps share one call exactly.
    Returns ``(x_next, x0)``.
    """
    batch = x.shape[0]
    view = (batch,) + (1,) * (x.dim() - 1)
    c = coef.to(device=x.device, dtype=torch.float32).reshape(batch, 6)
    kx, km, p, q, r, n = (c[:, i].reshape(view) for i in range(6))
    xf = x.float()
    x0 = kx * xf + km * model_out.float()
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    x_next = p * xf + q * x0
    if x0_prev is not None:
        x_next = torch.where(r != 0, x_next + r * x0_prev.float(), x_next)
    if seeds is not None:
        z = randn_rows(seeds, stream, x[0].numel(), x.device).reshape(x.shape)
        x_next = torch.where(n != 0, x_next + n * z, x_next)
    return x_next.to(x.dtype), x0.to(x.dtype)


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
    """GroupNorm, per-channel affine, optional ``(1 + scale)`` / ``shift`` modulation, optional SiLU.

    ``scale`` and ``shift`` hold one value per (image, channel). The output keeps x's memory format.
    """
    if memory_format_of(x) == torch.channels_last:
        return _groupnorm_silu_nhwc(x, num_groups, weight, bias, eps, scale, shift, silu)
    batch, channels = x.shape[:2]
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.group_norm(x.float().contiguous(), num_groups, w, b, eps)
    view = (batch, channels) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1.0 + scale.float().reshape(view))
    if shift is not None:
        y = y + shift.float().reshape(view)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def _groupnorm_silu_nhwc(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
) -> torch.Tensor:
    """``groupnorm_silu`` for a channels_last x, computed in that layout (no NCHW round trip).

    PyTorch's own channels_last CPU group_norm loses ~1e-2 on data far from zero mean, and converting
    to NCHW and back cost more than the convolutions gain from NHWC. Here the statistics are two
    passes over the [B, HW, C] view (per-channel means, then squared deviations from the group
    mean: exact for any offset), and the normalisation, affine and modulation fold into one
    per-(image, channel) multiply-add on the centred values, in place, then an in-place SiLU. Each
    image's reductions run over its own rows in a fixed order, so the result does not depend on the
    batch (tests/models/test_cpu_engine.py).
    """
    batch, channels, height, width = x.shape
    groups = (batch, 1, num_groups, channels // num_groups)
    rows = x.float().permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view: x is NHWC

    def group_mean(t: torch.Tensor) -> torch.Tensor:  # [B, HW, C] -> [B, 1, G, 1]: per channel, then group
        return t.mean(1, keepdim=True).view(groups).mean(3, keepdim=True)

    mean = group_mean(rows)
    centred = (rows.view(batch, -1, *groups[2:]) - mean).view(rows.shape)
    rstd = torch.rsqrt(group_mean(centred * centred).add_(eps))
    a = rstd.expand(groups).reshape(batch, 1, channels)
    if weight is not None:
        a = a * weight.float()
    b = torch.zeros(channels, device=x.device) if bias is None else bias.float()
    if scale is not None:
        gain = 1.0 + scale.float().reshape(batch, 1, channels)
        a, b = a * gain, b * gain
    if shift is not None:
        b = b + shift.float().reshape(batch, 1, channels)
    in_place = not torch.is_grad_enabled()  # serving; under autograd keep every tensor
    y = torch.addcmul(b, centred, a, out=centred) if in_place else torch.addcmul(b, centred, a)
    if silu:
        y = F.silu(y, inplace=in_place)
    return y.view(batch, height, width, channels).permute(0, 3, 1, 2).to(x.dtype)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored NHWC (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
