"""``robustdiff export``: the served safetensors file (EMA weights + header) from a training checkpoint.

The trainer calls the same functions when it ends, so a file exported later from a checkpoint and
the one written at the end of the run carry the same header.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import CheckpointHeader, TrainingInfo, save_checkpoint
from models.errors import UserError
from models.paths import output_file
from models.train import state as ckpt
from models.train.config import TrainConfig, build
from models.train.methods import get_method
from models.unet import UNet


def served_header(
    cfg: TrainConfig,
    *,
    updates: int,
    command: str | None,
    hardware: str | None,
    wall_s: float | None,
    final_loss: float | None,
    class_names: list[str] | None = None,
    name: str | None = None,
) -> CheckpointHeader:
    """The foundation's header for a model trained with ``cfg``: method, every option, data, provenance."""
    corruption = cfg.data.corruption.model_dump() if cfg.data.corruption else None
    dataset = cfg.data.name if cfg.data.limit is None else f"{cfg.data.name}[:{cfg.data.limit}]"
    info = TrainingInfo(
        method=cfg.method,
        options={
            **cfg.options,
            "batch_size": cfg.batch_size,
            "lr": cfg.optim.lr,
            "warmup_updates": cfg.optim.warmup_updates,
            "grad_clip": cfg.optim.grad_clip,
            "ema_decay": cfg.ema_decay,
            "ema_warmup": cfg.ema_warmup,
            "seed": cfg.seed,
            "preset": cfg.preset,
        },
        updates=updates,
        dataset=dataset,
        corruption=corruption,
        command=command,
        hardware=hardware,
        wall_time_s=wall_s,
        final_loss=final_loss,
    )
    mc = cfg.model_config_()
    names = list(class_names or []) if mc.num_classes else []
    header = CheckpointHeader(
        name=name or cfg.name, model=mc, schedule=cfg.schedule, training=info, class_names=names
    )
    return get_method(cfg.method, cfg.options).served_header(header)


def write_served(
    path: str | Path, ema: nn.Module, header: CheckpointHeader, dtype: torch.dtype = torch.float16
) -> Path:
    save_checkpoint(path, ema, header, dtype)
    os.chmod(path, 0o644)  # served files are read by the container's own user (uid 10001), whatever the umask
    return Path(path)


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    name: str | None = None,
    dtype: str = "float16",
    field: str = "checkpoint",
) -> Path:
    """Write the served file for a training checkpoint (a run folder, or a step-*.json/.safetensors)."""
    meta, tensors = ckpt.load(source, field)
    cfg = build(meta["config"])
    ema = UNet(cfg.model_config_())
    try:
        ema.load_state_dict(ckpt.section(tensors, "ema"))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(field, f"{source}: the EMA weights do not match the config ({first})") from err
    loop = ckpt.LoopState(**meta["state"])
    recent = loop.recent_losses
    header = served_header(
        cfg,
        updates=loop.updates,
        command=meta.get("command"),
        hardware=meta.get("hardware"),
        wall_s=loop.wall_s,
        final_loss=sum(recent) / len(recent) if recent else None,
        name=name,
    )
    return write_served(out, ema, header, torch.float16 if dtype == "float16" else torch.float32)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("checkpoint", help="run folder (its latest checkpoint) or a checkpoints/step-*.json")
    parser.add_argument("--out", type=Path, required=True, help="served .safetensors file to write")
    parser.add_argument("--name", default=None, help="model name in the header (default: the run's name)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    out = output_file(args.out, "--out", [".safetensors"])  # before the checkpoint is read
    if out.exists() and not args.force:
        raise UserError("--out", f"{out} exists; add --force to replace it")
    path = export_checkpoint(args.checkpoint, out, args.name, args.dtype)
    print(f"wrote {path}")
    return 0
