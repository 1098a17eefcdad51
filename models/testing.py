"""Small helpers for tests and examples: tiny checkpoints, IDX files and the exact Gaussian denoiser."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path
from typing import cast

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


# The public diffusers configurations users bring (config.json as published), and reduced-width
# versions of the large ones: same block types, padding, heads per level and classes, small channels.
DDPM_CIFAR10_32: dict[str, object] = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_256_REDUCED: dict[str, object] = {  # google/ddpm-celebahq-256, ddpm-ema-church/bedroom/cat-256
    **DDPM_CIFAR10_32,
    "block_out_channels": [16, 16, 32, 32, 64, 64],
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "sample_size": 256,
}
SMALL_DDPM: dict[str, object] = {  # ddpm-cifar10-32's blocks and padding at reduced widths, 16x16
    **DDPM_CIFAR10_32,
    "block_out_channels": [32, 64, 64],
    "norm_num_groups": 16,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "sample_size": 16,
}
CD_IMAGENET64_REDUCED: dict[str, object] = {  # openai/diffusers-cd_imagenet64_l2 (and _lpips, ct_imagenet64)
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 3,
    "num_class_embeds": 1000,
    "block_out_channels": [32, 64, 96, 128],
    "norm_num_groups": 16,
    "attn_norm_num_groups": 16,
    "attention_head_dim": 16,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift",
    "upsample_type": "resnet",
    "downsample_type": "resnet",
}
DDPM_SCHEDULER: dict[str, object] = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
CD_SCHEDULER: dict[str, object] = {
    "_class_name": "CMStochasticIterativeScheduler",
    "num_train_timesteps": 40,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
}


def diffusers_unet(config: dict[str, object], seed: int = 0, sharpen: float = 4.0) -> torch.nn.Module:
    """A diffusers UNet2DModel in ``config`` with random weights that leave nothing trivial: every
    norm and bias jittered and attention queries and keys scaled by ``sharpen``
    so the softmax is peaked and a wrong head count or scale changes the output."""
    import diffusers

    torch.manual_seed(seed)
    model = cast(torch.nn.Module, diffusers.UNet2DModel(**config))
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales and shifts, biases: off their 1 / 0 initialisation
                p.add_(0.1 * torch.randn_like(p))
            if re.search(r"\.(to_q|to_k)\.", name):
                p.mul_(sharpen)
    return model


def write_diffusers_folder(
    folder: Path, model: object, scheduler: dict[str, object] | None, layout: str = "pipeline"
) -> Path:
    """Save ``model`` as a diffusers folder: ``pipeline`` (unet/ + scheduler/ + model_index.json),
    ``bare`` (config.json + weights at the root, no scheduler) or ``root`` (a root scheduler_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    unet_dir = folder / "unet" if layout == "pipeline" else folder
    model.save_pretrained(unet_dir)  # type: ignore[attr-defined]
    if scheduler is not None and layout == "pipeline":
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        pipe = "ConsistencyModelPipeline" if "sigma_max" in scheduler else "DDPMPipeline"
        index = {"_class_name": pipe, "scheduler": ["diffusers", scheduler["_class_name"]],
                 "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
        (folder / "model_index.json").write_text(json.dumps(index))
    elif scheduler is not None:
        (folder / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder
