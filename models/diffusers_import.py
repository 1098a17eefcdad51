"""Import a diffusers ``UNet2DModel`` directory of the DDPM layout into our UNet, no diffusers needed.

Accepts a model folder (config.json + diffusion_pytorch_model.safetensors) or a pipeline folder
with ``unet/`` (and ``scheduler/scheduler_config.json``, whose linear/cosine betas are kept).
Users can then serve public DDPM checkpoints: ``convert_diffusers(folder, out.safetensors)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.checkpoint import CheckpointHeader, TrainingInfo, save_checkpoint
from models.errors import UserError
from models.schedules import ScheduleConfig
from models.unet import UNet, UNetConfig

_RENAMES = [
    (r"^time_embedding\.linear_1\.", "time_mlp.0."),
    (r"^time_embedding\.linear_2\.", "time_mlp.2."),
    (r"^class_embedding\.", "class_emb."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.blocks."),
    (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.resample."),
    (r"^up_blocks\.(\d+)\.resnets\.", r"up.\1.blocks."),
    (r"^up_blocks\.(\d+)\.attentions\.", r"up.\1.attn."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.resample."),
    (r"^mid_block\.resnets\.0\.", "mid1."),
    (r"^mid_block\.resnets\.1\.", "mid2."),
    (r"^mid_block\.attentions\.0\.", "mid_attn."),
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".out."),
]


def _model_dir(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    raise UserError(
        "path", f"{folder} has no config.json (nor unet/config.json): not a diffusers model folder"
    )


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    """Map a UNet2DModel config of the DDPM layout to ours; refuse what our UNet does not implement."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError("config._class_name", f"only UNet2DModel is supported, got {cfg.get('_class_name')}")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise UserError("config.time_embedding_type", "only positional time embeddings are supported")
    if cfg.get("resnet_time_scale_shift", "default") != "default":
        # diffusers' scale-shift UNet2DModel also drops the mid-block attention's norm: not DDPM's layout.
        raise UserError(
            "config.resnet_time_scale_shift", "only DDPM's 'default' time conditioning is supported"
        )
    if cfg.get("center_input_sample", False):
        raise UserError("config.center_input_sample", "center_input_sample=True is not supported")
    down = list(cfg.get("down_block_types", []))
    chans = list(cfg.get("block_out_channels", []))
    if not down or len(down) != len(chans) or any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down):
        raise UserError(
            "config.down_block_types", f"expected DownBlock2D/AttnDownBlock2D per level, got {down}"
        )
    size = cfg.get("sample_size", 32)
    size = size[0] if isinstance(size, list | tuple) else size
    heads_dim = cfg.get("attention_head_dim")
    attn_levels = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    heads = 1
    if heads_dim is not None and attn_levels:
        heads = chans[attn_levels[0]] // int(heads_dim)
    return UNetConfig(
        image_size=int(size),
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        base_channels=int(chans[0]),
        channel_mult=tuple(int(c) // int(chans[0]) for c in chans),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attention_resolutions=tuple(int(size) // 2**i for i in attn_levels),
        num_heads=max(1, heads),
        dropout=float(cfg.get("dropout", 0.0)),
        groups=int(cfg.get("norm_num_groups", 32)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        num_classes=int(cfg.get("num_class_embeds") or 0),
        time_flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        time_freq_shift=float(cfg.get("freq_shift", 0)),
        mid_attention=bool(cfg.get("add_attention", True)),
    )


def rename_key(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def load_diffusers_unet(folder: str | Path) -> UNet:
    """Our UNet holding a diffusers UNet2DModel's weights (float32), computing the same function."""
    mdir = _model_dir(Path(folder))
    try:
        cfg = json.loads((mdir / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError("config.json", f"not valid JSON: {err}") from err
    weights = mdir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise UserError(
            "path", f"{weights} not found (only safetensors weights are read; never .bin pickles)"
        )
    net = UNet(unet_config_from_diffusers(cfg))
    state = {rename_key(k): v.float() for k, v in load_file(str(weights)).items()}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            "weights", f"layout differs from DDPM's: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    net.load_state_dict(state)
    return net.eval()


def schedule_from_diffusers(folder: str | Path) -> ScheduleConfig:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return ScheduleConfig()
    cfg = json.loads(path.read_text())
    kind = cfg.get("beta_schedule", "linear")
    if kind not in ("linear", "squaredcos_cap_v2"):
        raise UserError("scheduler.beta_schedule", f"{kind!r} is not supported (linear, squaredcos_cap_v2)")
    return ScheduleConfig(
        name="linear" if kind == "linear" else "cosine",
        timesteps=int(cfg.get("num_train_timesteps", 1000)),
        beta_start=float(cfg.get("beta_start", 1e-4)),
        beta_end=float(cfg.get("beta_end", 0.02)),
    )


def convert_diffusers(
    folder: str | Path, out: str | Path, name: str, dtype: torch.dtype = torch.float32
) -> CheckpointHeader:
    """Write a servable robustdiff checkpoint from a diffusers folder."""
    net = load_diffusers_unet(folder)
    header = CheckpointHeader(
        name=name,
        model=net.cfg,
        schedule=schedule_from_diffusers(folder),
        training=TrainingInfo(method="imported", dataset=f"diffusers:{Path(folder).name}"),
    )
    return save_checkpoint(out, net, header, dtype)
