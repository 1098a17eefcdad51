"""Per-image noise: every draw is a function of (image seed, stream) only, never of the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import randn_rows
from kernels.rng import SEED_MAX


class NoiseSource:
    """The noise of a batch of images, each with its own seed.

    ``initial()`` is stream 0 (the starting noise, or the purifier's forward noise); ``step(i)`` is the
    noise of sampler step i (stream i + 1). The fused sampler kernels draw the same numbers in-kernel
    from ``seeds`` and the stream, so no path ever depends on where an image sits in a batch.
    """

    def __init__(
        self, seeds: Sequence[int] | torch.Tensor, shape: Sequence[int], device: torch.device | str = "cpu"
    ) -> None:
        self.seeds = torch.as_tensor(
            list(seeds) if not isinstance(seeds, torch.Tensor) else seeds, dtype=torch.int64
        )
        if self.seeds.ndim != 1 or self.seeds.numel() == 0:
            raise ValueError("seeds must be a non-empty 1-D sequence")
        if int(self.seeds.min()) < 0 or int(self.seeds.max()) > SEED_MAX:
            raise ValueError(f"seeds must be in [0, {SEED_MAX}]")
        self.shape = tuple(int(d) for d in shape)
        self.device = torch.device(device)
        self.seeds_device = self.seeds.to(self.device)

    def __len__(self) -> int:
        return int(self.seeds.numel())

    def draw(self, stream: int) -> torch.Tensor:
        numel = 1
        for d in self.shape:
            numel *= d
        z = randn_rows(self.seeds_device, stream, numel, device=self.device)
        return z.reshape(len(self), *self.shape)

    def initial(self) -> torch.Tensor:
        return self.draw(0)

    @staticmethod
    def step_stream(i: int) -> int:
        return i + 1
