"""Small helpers for tests and examples: tiny checkpoints, IDX files and the exact Gaussian denoiser."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import CheckpointHeader, ConsistencyConfig, TrainingInfo, save_checkpoint
from models.denoisers import EpsDenoiser
from models.schedules import Schedule, ScheduleConfig
from models.unet import UNet, preset


def tiny_checkpoint(
    path: str | Path, kind: str = "diffusion", name: str | None = None, seed: int = 0, **overrides: object
) -> Path:
    """Write a randomly initialised ``tiny`` checkpoint (diffusion or consistency) and return its path."""
    torch.manual_seed(seed)
    cfg = preset("tiny", **overrides)
    net = UNet(cfg)
    header = CheckpointHeader(
        name=name or f"tiny-{kind}",
        kind=kind,
        model=cfg,
        schedule=ScheduleConfig(),
        consistency=ConsistencyConfig() if kind == "consistency" else None,
        training=TrainingInfo(method="random-init", dataset="none"),
        class_names=[str(i) for i in range(cfg.num_classes)],
    )
    save_checkpoint(path, net, header)
    return Path(path)


class GaussianEps(torch.nn.Module):
    """The optimal eps-predictor for x0 ~ N(mu, v I): eps* = s_t (x - a_t mu) / (a_t^2 v + s_t^2).

    Takes the DDPM timestep index like the UNet; element-wise, so its output is batch-invariant bitwise.
    """

    def __init__(self, schedule: Schedule, mu: float, v: float) -> None:
        super().__init__()
        self.schedule = schedule
        self.mu = mu
        self.v = v

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = (timestep.to(torch.float64) + 1.0) / self.schedule.T
        ab = self.schedule.alphabar(t).reshape(-1, *([1] * (x.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return (s * (x.to(torch.float64) - a * self.mu) / (ab * self.v + s * s)).to(x.dtype)


def gaussian_denoiser(
    mu: float = 0.5, v: float = 0.25, schedule: ScheduleConfig | None = None
) -> EpsDenoiser:
    sch = Schedule(schedule)
    return EpsDenoiser(GaussianEps(sch, mu, v), sch)


def write_idx(path: str | Path, arr: np.ndarray, gz: bool = True) -> None:
    """Write ``arr`` as an IDX file of unsigned bytes (the MNIST format), gzipped or not."""
    raw = (
        bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    )
    Path(path).write_bytes(gzip.compress(raw) if gz else raw)
