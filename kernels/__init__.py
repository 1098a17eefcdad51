"""The one dispatch point for robustdiff's kernels: Triton on CUDA, the PyTorch reference elsewhere.

Every op takes ``impl``: ``"auto"`` (Triton when the tensors are on CUDA and triton is installed,
else the reference), ``"reference"`` or ``"triton"`` (Triton on any device; on a CPU that needs
``TRITON_INTERPRET=1`` set before ``kernels`` is imported, which is how the tests run it).
Setting the environment variable ``ROBUSTDIFF_KERNELS=reference`` forces the PyTorch reference
everywhere, whatever ``impl`` says: the switch to rule the kernels out when debugging a result.

The Triton ops have no backward: under autograd (training) ``"auto"`` takes the reference.
Triton is imported only when a Triton path runs, so ``import kernels`` works without it (macOS).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch

from kernels import reference, rng

__all__ = ["TRITON_AVAILABLE", "Impl", "groupnorm_silu", "randn_rows", "sampler_update"]

Impl = Literal["auto", "reference", "triton"]


def _triton_installed() -> bool:
    """Whether triton can be imported, without importing it (that costs a second at start-up)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


TRITON_AVAILABLE = _triton_installed()
_ENV = "ROBUSTDIFF_KERNELS"


def _use_triton(impl: str, device: torch.device, *tensors: torch.Tensor | None) -> bool:
    """Resolve ``impl`` (and the environment override) for ``tensors`` on ``device``.

    The Triton ops have no backward, so ``"auto"`` keeps the reference whenever autograd is
    recording through one of ``tensors`` (training); ``"triton"`` refuses instead.
    """
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    if impl == "reference" or os.environ.get(_ENV, "").strip().lower() == "reference":
        return False
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if impl == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("impl='triton' needs the triton package, which is not installed")
        if needs_grad:
            raise RuntimeError("impl='triton' has no backward; use impl='auto' or 'reference' under autograd")
        return True
    return device.type == "cuda" and TRITON_AVAILABLE and not needs_grad


def _triton_sampler() -> ModuleType:
    """``kernels.triton_sampler``, imported on first use (an import statement, which dynamo traces)."""
    from kernels import triton_sampler

    return triton_sampler


def _triton_groupnorm() -> ModuleType:
    """``kernels.triton_groupnorm``, imported on first use."""
    from kernels import triton_groupnorm

    return triton_groupnorm


def randn_rows(
    seeds: torch.Tensor, stream: int, numel: int, device: torch.device | str = "cpu", *, impl: Impl = "auto"
) -> torch.Tensor:
    """Standard normal noise [len(seeds), numel] float32 on ``device``; row b depends on (seeds[b], stream).

    See ``kernels.rng.randn_rows`` for the generator; on CUDA it is drawn in-kernel, not on the host.
    """
    device = torch.device(device)
    if _use_triton(impl, device):
        out: torch.Tensor = _triton_sampler().randn_rows(seeds, stream, numel, device)
        return out
    return rng.randn_rows(seeds, stream, numel, device)


def sampler_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    *,
    x0_prev: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stream: int | torch.Tensor = 0,
    clip_x0: bool = False,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step for every sampler (DDPM, DDIM, DPM-Solver++ 2M, consistency multistep).

    ``coef`` is float32 [B, 6] = (kx, km, p, q, r, n) per row, so rows may sit at different times:
    ``x0 = kx*x + km*model_out`` (clamped to [-1, 1] if ``clip_x0``),
    ``x_next = p*x + q*x0 + r*x0_prev + n*randn_rows(seeds, stream)``; the ``r`` term needs
    ``x0_prev``, the ``n`` term needs ``seeds`` (int64 [B]); ``stream`` is one number or one per row
    (rows of a running batch sit at different steps), and a row whose r (n) is 0 skips that term.
    Returns ``(x_next, x0)`` in x's dtype, computed in float32.
    """
    backend = _triton_sampler() if _use_triton(impl, x.device, x, model_out, x0_prev) else reference
    result: tuple[torch.Tensor, torch.Tensor] = backend.sampler_update(
        x, model_out, coef, x0_prev=x0_prev, seeds=seeds, stream=stream, clip_x0=clip_x0
    )
    return result


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
    impl: Impl = "auto",
) -> torch.Tensor:
    """``silu(GroupNorm(x) * weight + bias) * (1 + scale) + shift``, each part optional, stats in float32.

    x is [B, C, H, W], NCHW or channels_last (the output keeps its memory format); weight and bias
    are [C] or None (1 and 0); scale and shift hold one value per (image, channel), e.g. [B, C].
    """
    backend = _triton_groupnorm() if _use_triton(impl, x.device, x, weight, bias, scale, shift) else reference
    out: torch.Tensor = backend.groupnorm_silu(
        x, num_groups, weight, bias, eps=eps, scale=scale, shift=shift, silu=silu
    )
    return out
