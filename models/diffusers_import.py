"""Import a diffusers ``UNet2DModel`` folder (DDPM or consistency model) into our UNet, no diffusers needed.

Accepts a model folder (config.json + weights), a pipeline folder with ``unet/`` (and
``scheduler/scheduler_config.json``) or a folder with a root-level ``scheduler_config.json``.
Every config field is either implemented exactly or refused with a ``UserError`` naming it; none
is dropped. The served path reads safetensors only; ``.bin`` pickles are read by the offline
converter (``robustdiff import-diffusers``) alone, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from models.checkpoint import (
    CheckpointHeader,
    ConsistencyConfig,
    TrainingInfo,
    content_hash,
    save_checkpoint,
)
from models.errors import UserError
from models.schedules import ScheduleConfig
from models.unet import UNet, UNetConfig, count_parameters

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

_DOWN_TO_UP = {
    "DownBlock2D": "UpBlock2D",
    "AttnDownBlock2D": "AttnUpBlock2D",
    "ResnetDownsampleBlock2D": "ResnetUpsampleBlock2D",
}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
_BETA_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
_BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled-linear", "squaredcos_cap_v2": "cosine"}
_SCHEDULE_CHOICES = ("linear", "cosine", "scaled-linear")
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"


@dataclass
class Imported:
    """What one diffusers folder became: the network, its header, and what was read (for printing)."""

    net: UNet
    header: CheckpointHeader
    read: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in self.read.items()]
        lines.append(f"parameters: {count_parameters(self.net):,}")
        return "\n".join(lines)


def _model_dir(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    raise UserError(
        "path", f"{folder} has no config.json (nor unet/config.json): not a diffusers model folder"
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(what, f"{path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise UserError(what, f"{path} is not a JSON object")
    return cfg


def _field(name: str, reason: str) -> UserError:
    return UserError(f"config.{name}", reason)


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    """Map a UNet2DModel config to ours, field by field; refuse every field we cannot compute exactly."""
    known = {
        "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type",
        "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type",
        "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
        "downsample_padding", "downsample_type", "upsample_type", "dropout", "act_fn",
        "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
        "resnet_time_scale_shift", "add_attention", "class_embed_type", "num_class_embeds",
        "num_train_timesteps",
    }  # fmt: skip
    unknown = sorted(k for k in cfg if k not in known and k not in _IGNORED)
    if unknown:
        raise _field(
            unknown[0], "is not a UNet2DModel field this importer knows; refusing rather than ignoring it"
        )
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _field("_class_name", f"only UNet2DModel is supported, got {cfg.get('_class_name')}")
    if cfg.get("center_input_sample", False):
        raise _field("center_input_sample", "True (inputs in [0, 1] mapped to 2x - 1) is not supported")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise _field(
            "time_embedding_type", f"only 'positional' is supported, got {cfg['time_embedding_type']!r}"
        )
    if cfg.get("mid_block_type", "UNetMidBlock2D") != "UNetMidBlock2D":
        raise _field("mid_block_type", f"only UNetMidBlock2D is supported, got {cfg.get('mid_block_type')!r}")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise _field("resnet_time_scale_shift", f"'default' or 'scale_shift', got {shift!r}")
    act = cfg.get("act_fn", "silu")
    if act not in ("silu", "swish", "mish"):
        raise _field("act_fn", f"silu (swish) or mish are supported, got {act!r}")
    if cfg.get("class_embed_type") is not None:
        raise _field(
            "class_embed_type",
            f"{cfg['class_embed_type']!r} takes class inputs other than integer labels; only the "
            "default (None: an nn.Embedding of num_class_embeds labels) is served",
        )
    chans = [int(c) for c in cfg.get("block_out_channels", (224, 448, 672, 896))]
    down = list(
        cfg.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"))
    )
    up = list(cfg.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    if len(down) != len(chans) or any(t not in _DOWN_TO_UP for t in down):
        raise _field("down_block_types", f"one of {', '.join(_DOWN_TO_UP)} per level, got {down}")
    mirrored = [_DOWN_TO_UP[t] for t in reversed(down)]
    if up != mirrored:
        raise _field("up_block_types", f"must mirror down_block_types ({mirrored}), got {up}")
    if any(c % chans[0] for c in chans):
        raise _field("block_out_channels", f"every level must be a multiple of the first, got {chans}")
    # Which resampler each level uses (diffusers picks per block type); ours is one kind for the net.
    down_type, up_type = cfg.get("downsample_type", "conv"), cfg.get("upsample_type", "conv")
    for name, value in (("downsample_type", down_type), ("upsample_type", up_type)):
        if value not in ("conv", "resnet"):
            raise _field(name, f"'conv' or 'resnet', got {value!r}")
    kinds = {
        "conv" if t == "DownBlock2D" else "resnet" if t == "ResnetDownsampleBlock2D" else down_type
        for t in down[:-1]
    } | {
        "conv" if t == "UpBlock2D" else "resnet" if t == "ResnetUpsampleBlock2D" else up_type for t in up[:-1]
    }
    if len(kinds) > 1:
        raise _field(
            "down_block_types", "mixes conv and resnet resamplers across levels; one kind is supported"
        )
    padding = cfg.get("downsample_padding", 1)
    if padding not in (0, 1):
        raise _field("downsample_padding", f"0 or 1, got {padding!r}")
    size = cfg.get("sample_size") or 32
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise _field("sample_size", f"only square images are served, got {size}")
        size = size[0]
    size = int(size)
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise _field("norm_num_groups", "None (min(channels // 4, 32) at the output only) is not supported")
    head_dim = cfg.get("attention_head_dim", 8)
    if head_dim is not None and not isinstance(head_dim, int):
        raise _field("attention_head_dim", f"one integer (channels per head) or null, got {head_dim!r}")
    emb_dim = cfg.get("time_embedding_dim")
    if emb_dim is not None and int(emb_dim) % chans[0]:
        raise _field("time_embedding_dim", f"must be a multiple of block_out_channels[0], got {emb_dim}")
    attn_groups = cfg.get("attn_norm_num_groups")
    attn_levels = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    try:
        return UNetConfig(
            image_size=size,
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            base_channels=chans[0],
            channel_mult=tuple(c // chans[0] for c in chans),
            num_res_blocks=int(cfg.get("layers_per_block", 2)),
            attention_resolutions=tuple(size // 2**i for i in attn_levels),
            num_heads=1,
            head_channels=None if head_dim is None else int(head_dim),
            dropout=float(cfg.get("dropout", 0.0)),
            groups=int(groups),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            num_classes=int(cfg.get("num_class_embeds") or 0),
            scale_shift_norm=shift == "scale_shift",
            time_embed_mult=4 if emb_dim is None else int(emb_dim) // chans[0],
            time_flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            time_freq_shift=float(cfg.get("freq_shift", 0)),
            mid_attention=bool(cfg.get("add_attention", True)),
            downsample_padding=padding,
            resample=kinds.pop() if kinds else "conv",
            act="mish" if act == "mish" else "silu",
            mid_scale=float(cfg.get("mid_block_scale_factor", 1.0)),
            # diffusers' mid attention has no GroupNorm under scale_shift unless attn_norm_num_groups says so.
            mid_attn_norm=attn_groups is not None or shift == "default",
            mid_attn_groups=None if attn_groups is None else int(attn_groups),
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError("config", f"{'.'.join(map(str, first['loc'])) or 'layout'}: {first['msg']}") from err


_OLD_ATTENTION = re.compile(r"(^mid_attn|\.attn\.\d+)\.(query|key|value|proj_attn)\.")
"""diffusers' pre-0.14 attention names, which it still loads: query/key/value/proj_attn."""
_OLD_NAMES = {"query": "q", "key": "k", "value": "v", "proj_attn": "out"}


def rename_key(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return _OLD_ATTENTION.sub(lambda m: f"{m.group(1)}.{_OLD_NAMES[m.group(2)]}.", key)


def _read_weights(mdir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights = mdir / WEIGHTS
    if weights.is_file():
        return load_file(str(weights))
    pickled = mdir / PICKLED_WEIGHTS
    if pickled.is_file() and allow_pickle:
        try:
            state = torch.load(str(pickled), map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but tensors and plain containers
            raise UserError("weights", f"{pickled} is not a plain tensor file: {err}") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError("weights", f"{pickled} does not hold a flat dict of tensors")
        return state
    if pickled.is_file():
        raise UserError(
            "weights",
            f"{mdir} has only {PICKLED_WEIGHTS}; the server never unpickles: convert it offline with "
            f"`robustdiff import-diffusers {mdir} --out NAME.safetensors` and serve that file",
        )
    raise UserError("weights", f"{weights} not found")


def load_diffusers_unet(folder: str | Path, allow_pickle: bool = False) -> UNet:
    """Our UNet holding a diffusers UNet2DModel's weights (float32), computing the same function."""
    mdir = _model_dir(Path(folder))
    net = UNet(unet_config_from_diffusers(_read_json(mdir / "config.json", "config.json")))
    expected = net.state_dict()
    state = {rename_key(k): v.float() for k, v in _read_weights(mdir, allow_pickle).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            "weights", f"do not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in expected.items():
        got = state[k]
        if got.ndim == 4 and v.ndim == 2 and got.shape[2:] == (1, 1):  # 1x1-conv attention projections
            state[k] = got = got[:, :, 0, 0]
        if tuple(got.shape) != tuple(v.shape):
            raise UserError("weights", f"{k} has shape {tuple(got.shape)}, the config says {tuple(v.shape)}")
    net.load_state_dict(state)
    return net.eval()


def _scheduler_config(folder: Path, mdir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json",
                 mdir / "scheduler_config.json"):  # fmt: skip
        if path.is_file():
            return _read_json(path, "scheduler_config.json"), path
    return None, None


def _schedule_option(schedule: str) -> tuple[dict[str, Any], str]:
    """``--schedule``: one of our beta schedules (DDPM's T = 1000 defaults) or a scheduler_config.json."""
    if schedule in _SCHEDULE_CHOICES:
        name = {v: k for k, v in _BETA_NAMES.items()}[schedule]
        return {"_class_name": "DDPMScheduler", "beta_schedule": name}, f"--schedule {schedule}"
    path = Path(schedule)
    if not path.is_file():
        raise UserError(
            "--schedule",
            f"{schedule!r} is neither one of {', '.join(_SCHEDULE_CHOICES)} nor a scheduler_config.json",
        )
    return _read_json(path, "--schedule"), str(path)


def _beta_schedule(cfg: dict[str, Any]) -> tuple[ScheduleConfig, str]:
    for key, ok in (("trained_betas", None), ("rescale_betas_zero_snr", False)):
        if cfg.get(key, ok) not in (ok, [], False):
            raise UserError(f"scheduler.{key}", f"{cfg[key]!r} is not supported")
    kind = cfg.get("beta_schedule", "linear")
    if kind not in _BETA_NAMES:
        raise UserError("scheduler.beta_schedule", f"{kind!r} is not supported ({', '.join(_BETA_NAMES)})")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise UserError("scheduler.prediction_type", f"epsilon, v_prediction or sample, got {prediction!r}")
    try:
        sched = ScheduleConfig(
            name=_BETA_NAMES[kind],
            timesteps=int(cfg.get("num_train_timesteps", 1000)),
            beta_start=float(cfg.get("beta_start", 1e-4)),
            beta_end=float(cfg.get("beta_end", 0.02)),
        )
    except ValidationError as err:
        raise UserError("scheduler", str(err.errors()[0]["msg"])) from err
    return sched, prediction


def import_diffusers(
    folder: str | Path,
    name: str | None = None,
    schedule: str | None = None,
    allow_pickle: bool = False,
) -> Imported:
    """The network and checkpoint header of a diffusers folder (in memory), with what was read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("path", f"{folder} is not a folder")
    mdir = _model_dir(folder)
    index = folder / "model_index.json"
    if index.is_file():
        parts = sorted(k for k in _read_json(index, "model_index.json") if not k.startswith("_"))
        if any(p not in ("unet", "scheduler") for p in parts):
            raise UserError("model_index.json", f"only unet + scheduler pipelines are supported, got {parts}")
    net = load_diffusers_unet(folder, allow_pickle)
    sched_cfg, source = _scheduler_config(folder, mdir)
    if schedule is not None:
        sched_cfg, source_text = _schedule_option(schedule)
    else:
        source_text = (
            str(source) if source else "none in the folder: DDPM's linear betas (--schedule to change)"
        )
        sched_cfg = sched_cfg or {"_class_name": "DDPMScheduler"}
    cls = sched_cfg.get("_class_name", "DDPMScheduler")
    read: dict[str, Any] = {
        "folder": str(folder),
        "unet": str(mdir / "config.json"),
        "scheduler": source_text,
    }
    header_kw: dict[str, Any] = {}
    if cls == "CMStochasticIterativeScheduler":
        if float(sched_cfg.get("s_noise", 1.0)) != 1.0:
            raise UserError("scheduler.s_noise", "only s_noise = 1 is supported")
        smin, smax = float(sched_cfg.get("sigma_min", 0.002)), float(sched_cfg.get("sigma_max", 80.0))
        sched = ScheduleConfig(
            name="edm",
            timesteps=int(sched_cfg.get("num_train_timesteps", 40)),
            sigma_min=smin,
            sigma_max=smax,
            rho=float(sched_cfg.get("rho", 7.0)),
        )
        header_kw = {
            "kind": "consistency",
            "consistency": ConsistencyConfig(
                sigma_min=smin,
                sigma_max=smax,
                sigma_data=float(sched_cfg.get("sigma_data", 0.5)),
                parameterization="edm",
                c_in=True,
                renoise_subtract_sigma_min=True,
            ),
        }
        read["kind"] = "consistency (EDM: c_in, c_skip, c_out; time input 250 ln sigma)"
        read["prediction"] = "consistency function"
    elif cls in _BETA_SCHEDULERS:
        sched, prediction = _beta_schedule(sched_cfg)
        header_kw = {"prediction": prediction}
        read["kind"] = "diffusion"
        read["prediction"] = prediction
    else:
        raise UserError(
            "scheduler._class_name",
            f"{cls} is not supported ({', '.join(_BETA_SCHEDULERS)}, CMStochasticIterativeScheduler)",
        )
    read["schedule"] = sched.model_dump(
        include={"name", "timesteps"}
        | ({"sigma_min", "sigma_max", "rho"} if sched.name == "edm" else {"beta_start", "beta_end"})
    )
    read["config"] = net.cfg.model_dump(
        include={"image_size", "in_channels", "base_channels", "channel_mult", "num_res_blocks",
                 "attention_resolutions", "head_channels", "num_classes", "scale_shift_norm", "resample",
                 "downsample_padding", "act"}
    )  # fmt: skip
    label = name or re.sub(r"[^A-Za-z0-9._-]", "-", folder.resolve().name).lstrip("._-") or "imported"
    try:
        header = CheckpointHeader(
            name=label,
            model=net.cfg,
            schedule=sched,
            training=TrainingInfo(method="imported", dataset=f"diffusers:{folder.resolve().name}"),
            content_hash=content_hash(net.state_dict()),
            **header_kw,
        )
    except ValidationError as err:
        raise UserError("--name", str(err.errors()[0]["msg"])) from err
    return Imported(net, header, read)


def convert_diffusers(
    folder: str | Path,
    out: str | Path,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    schedule: str | None = None,
) -> CheckpointHeader:
    """Write a servable robustdiff checkpoint from a diffusers folder (offline: may read .bin weights)."""
    imported = import_diffusers(folder, name, schedule, allow_pickle=True)
    return save_checkpoint(out, imported.net, imported.header, dtype)
