"""CUDA graphs for the network call: at batch 1 a UNet evaluation is launch-bound (~10x slower eager).

``GraphedForward`` captures one graph per batch-size bucket and pads a batch up to its bucket, so
a handful of graphs serve every batch size. Padding rows cost compute but never change the real
rows, because the network treats every image independently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Forward = Callable[..., torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None
    out: torch.Tensor


class GraphedForward:
    """Replay ``fn(x, t, y=None)`` from CUDA graphs, one per (bucket, shape, dtype) seen.

    ``x`` is [B, ...], ``t`` is [B] (a single value is broadcast), ``y`` is [B] labels or None.
    Batches above the largest bucket, and any input not on CUDA, run ``fn`` directly. All graphs
    share one memory pool, which is safe because they never run concurrently and each result is
    cloned out of the pool before the next replay. A replay records no autograd graph, so a call that
    needs gradients (an attack through the purifier) runs ``fn`` directly too.
    """

    def __init__(self, fn: Forward, buckets: Sequence[int] = DEFAULT_BUCKETS, warmup: int = 2) -> None:
        self.fn = fn
        self.buckets = tuple(sorted(set(buckets)))
        self.warmup = warmup
        self._graphs: dict[tuple[object, ...], _Graph] = {}
        self._pool: Any = None  # torch.cuda.graph_pool_handle(), opaque

    def bucket(self, n: int) -> int | None:
        """The smallest bucket holding n rows, or None when n is above every bucket."""
        return next((b for b in self.buckets if b >= n), None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        size = self.bucket(n)
        if x.device.type != "cuda" or size is None or (torch.is_grad_enabled() and x.requires_grad):
            return self.fn(x, t, y)
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t
        fmt = _memory_format(x)
        key = (size, x.device, tuple(x.shape[1:]), x.dtype, fmt, t.dtype, None if y is None else y.dtype)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(size, x, t, y, fmt)
        g.x[:n].copy_(x)
        g.t[:n].copy_(t)
        if y is not None:
            assert g.y is not None
            g.y[:n].copy_(y)
        g.graph.replay()
        return g.out[:n].clone()

    def _capture(
        self, size: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, fmt: torch.memory_format
    ) -> _Graph:
        """Static inputs (zeros, x's memory format), warm-up on a side stream, then capture."""
        static_x = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(
            memory_format=fmt
        )
        static_t = torch.zeros(size, dtype=t.dtype, device=x.device)
        static_y = None if y is None else torch.zeros(size, dtype=y.dtype, device=x.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_x, static_t, static_y)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.fn(static_x, static_t, static_y)
        return _Graph(graph, static_x, static_t, static_y, out)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for NHWC-stored images, so the static buffer keeps the layout the network expects."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
