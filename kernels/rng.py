"""Counter-based Gaussian noise: the value for (seed, stream, element) never depends on the batch.

Philox4x32-10 keyed by the image's 64-bit seed, counter (element, stream, 0, 0), then Box-Muller.
The Triton kernels draw the same numbers in-kernel (``tl.philox`` with the same key and counter),
so the reference path on the CPU and the fused path on the GPU agree to float32 rounding.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
SEED_MAX = 2**63 - 1


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a*b, with int64 tensors holding uint32."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    x = b * a_hi
    y = b * a_lo
    z = x + (y >> 16)
    return z >> 16, ((z & 0xFFFF) << 16) | (y & 0xFFFF)


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, rounds: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors holding uint32 values (c2 = c3 = 0), as ``tl.philox`` computes it."""
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """Map uint32 bits to float64 in (0, 1): the top 24 bits, centred, so it is exact in float32 too."""
    return ((r >> 8).to(torch.float64) + 0.5) * (2.0**-24)


# Elements drawn per chunk on the CPU: the int64 Philox rounds hold ~30 temporaries per element, so
# one chunk peaks near 250 bytes per element (64 MiB here) whatever the batch and image size; a
# 16-image 256x256 batch drawn at once held 0.8 GiB. Chunking never changes a value.
CHUNK_ELEMENTS = 2**18


def randn_rows(
    seeds: torch.Tensor, stream: int | torch.Tensor, numel: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise of shape [len(seeds), numel] in float32.

    Row b depends only on (seeds[b], stream[b]); ``stream`` numbers the draws of one image
    (0 = the initial noise, i + 1 = the noise of sampler step i): one for every row, or one per row
    ([B]) when the rows of a running batch are at different steps. Drawn in chunks of at most
    ``CHUNK_ELEMENTS`` (whole rows, or part of one row), so its memory does not grow with the batch.
    """
    seeds = seeds.to(device="cpu", dtype=torch.int64).reshape(-1, 1)
    if seeds.numel() and int(seeds.min()) < 0:
        raise ValueError("seeds must be in [0, 2**63 - 1]")
    if isinstance(stream, torch.Tensor):
        streams = stream.to(device="cpu", dtype=torch.int64).reshape(-1, 1)
        if streams.shape[0] != seeds.shape[0]:
            raise ValueError("stream must be one number or one per seed")
    else:
        streams = torch.full_like(seeds, stream)
    out = torch.empty(seeds.shape[0], numel, dtype=torch.float32)
    rows = max(1, CHUNK_ELEMENTS // max(numel, 1))
    cols = min(numel, CHUNK_ELEMENTS)
    for r in range(0, seeds.shape[0], rows):
        for c in range(0, numel, max(cols, 1)):
            width = min(cols, numel - c)
            out[r : r + rows, c : c + width] = _randn_block(
                seeds[r : r + rows], streams[r : r + rows], c, width
            )
    return out.to(device)


def _randn_block(seeds: torch.Tensor, streams: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Elements [start, start + width) of the rows of ``seeds`` [n, 1] / ``streams`` [n, 1]."""
    c0 = torch.arange(start, start + width, dtype=torch.int64).reshape(1, -1).expand(seeds.shape[0], width)
    c1 = (streams & _MASK32).expand_as(c0)
    k0 = (seeds & _MASK32).expand_as(c0)
    k1 = ((seeds >> 32) & _MASK32).expand_as(c0)
    r0, r1, _, _ = philox4x32(c0, c1, k0, k1)
    u1, u2 = uniform_from_bits(r0), uniform_from_bits(r1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
    return z.to(torch.float32)
