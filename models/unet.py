"""A UNet of the DDPM / ADM family, with every architectural choice a named knob.

The layout follows DDPM's CIFAR-10 network (and diffusers' ``UNet2DModel`` with DDPM blocks), so
public DDPM checkpoints import one-to-one (``models.diffusers_import``). Normalisation + SiLU goes
through ``kernels.groupnorm_silu``: fused Triton on CUDA, PyTorch elsewhere, one call.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from kernels import groupnorm_silu


class UNetConfig(BaseModel):
    """Architecture of the noise-prediction network; stored verbatim in every checkpoint header."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(32, ge=4, description="height = width of the images, in pixels")
    in_channels: int = Field(3, ge=1)
    out_channels: int = Field(3, ge=1)
    base_channels: int = Field(128, ge=4, description="channels of the first level")
    channel_mult: tuple[int, ...] = Field((1, 2, 2, 2), min_length=1, description="per-level multipliers")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per level on the way down")
    attention_resolutions: tuple[int, ...] = Field((16,), description="resolutions that get self-attention")
    num_heads: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    groups: int = Field(32, ge=1, description="GroupNorm groups")
    norm_eps: float = Field(1e-6, gt=0.0)
    num_classes: int = Field(0, ge=0, description="0 = unconditional; else class-conditional")
    scale_shift_norm: bool = Field(False, description="ADM's scale/shift time conditioning (else DDPM's add)")
    time_embed_mult: int = Field(4, ge=1, description="time-embedding width = base_channels * this")
    time_flip_sin_to_cos: bool = Field(False, description="sinusoid order [cos, sin] instead of [sin, cos]")
    time_freq_shift: float = Field(1.0, description="DDPM's frequency denominator shift (half_dim - shift)")
    mid_attention: bool = True
    head_channels: int | None = Field(
        None,
        ge=1,
        description="channels per attention head, heads = channels // this at every level "
        "(diffusers' attention_head_dim, ADM's num_head_channels); None: num_heads heads everywhere",
    )
    downsample_padding: Literal[0, 1] = Field(
        1,
        description="1: the stride-2 conv pads 1 on every side; 0: pad (0, 1, 0, 1) first, then an "
        "unpadded conv (DDPM's TensorFlow 'SAME' padding, diffusers' downsample_padding=0)",
    )
    resample: Literal["conv", "resnet"] = Field(
        "conv",
        description="conv: strided conv down, nearest + conv up (DDPM); resnet: a residual block "
        "that average-pools / nearest-upsamples inside (ADM, OpenAI's consistency models)",
    )
    act: Literal["silu", "mish"] = Field(
        "silu", description="residual blocks' nonlinearity (the time MLP and the output stay SiLU)"
    )
    mid_scale: float = Field(
        1.0, gt=0.0, description="the middle blocks' outputs are divided by this (mid_block_scale_factor)"
    )
    mid_attn_norm: bool = Field(True, description="GroupNorm before the middle attention")
    mid_attn_groups: int | None = Field(None, ge=1, description="its groups; None: groups")

    @field_validator("attention_resolutions")
    @classmethod
    def _powers(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 for r in v):
            raise ValueError("attention resolutions must be positive")
        return v

    @model_validator(mode="after")
    def _divisible(self) -> UNetConfig:
        levels = len(self.channel_mult)
        for i, m in enumerate(self.channel_mult):
            ch = self.base_channels * m
            if ch % self.groups:
                raise ValueError(f"channels {ch} are not divisible by groups={self.groups}")
            attends = self.image_size // 2**i in self.attention_resolutions or (
                i == levels - 1 and self.mid_attention
            )
            per_head = self.head_channels or ch // self.num_heads
            if attends and (ch % self.num_heads if self.head_channels is None else ch % per_head):
                raise ValueError(f"attention channels {ch} do not split into heads ({per_head} per head)")
        last = self.base_channels * self.channel_mult[-1]
        if self.mid_attn_groups is not None and last % self.mid_attn_groups:
            raise ValueError(f"channels {last} are not divisible by mid_attn_groups={self.mid_attn_groups}")
        if self.image_size % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError("image_size must be divisible by 2**(levels - 1)")
        return self


PRESETS: dict[str, UNetConfig] = {
    # Fast CPU tests: ~0.2M parameters.
    "tiny": UNetConfig(
        image_size=16,
        in_channels=1,
        out_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        groups=8,
        dropout=0.0,
    ),
    # The served Fashion-MNIST default: 32x32x1, ~6M parameters.
    "fmnist": UNetConfig(
        image_size=32,
        in_channels=1,
        out_channels=1,
        base_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(8,),
        num_heads=4,
        groups=32,
        dropout=0.1,
        num_classes=0,
    ),
    # Fashion-MNIST at 16x16 (data.downsample = 2) for many-seed experiments on one CPU core (~0.3M parameters).
    "fmnist16-cpu": UNetConfig(
        image_size=16,
        in_channels=1,
        out_channels=1,
        base_channels=24,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        groups=8,
        dropout=0.0,
    ),
    # A smaller network of the same shape that trains on a CPU in reasonable time (~1.3M parameters).
    "fmnist-cpu": UNetConfig(
        image_size=32,
        in_channels=1,
        out_channels=1,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(8,),
        num_heads=4,
        groups=16,
        dropout=0.0,
    ),
    # Exactly DDPM's CIFAR-10 network (35.7M parameters).
    "ddpm-cifar10": UNetConfig(
        image_size=32,
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
        groups=32,
        dropout=0.1,
    ),
}


def preset(name: str, **overrides: object) -> UNetConfig:
    """A named configuration, optionally with some fields replaced (validated again)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return UNetConfig.model_validate({**PRESETS[name].model_dump(), **overrides})


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """DDPM's sinusoidal embedding of (possibly fractional) timestep indices."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat(
        [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], 1
    )
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, once ``batch_invariant`` is set, runs every CPU call through oneDNN.

    PyTorch picks its CPU convolution by shape: a 1x1 kernel below batch 16 on one thread, and a
    small input at batch 1, go to its im2col + GEMM path, everything else to oneDNN, and the two
    round differently, so an image's result changed in its last bits with the batch it was in.
    oneDNN computes each image in the same order at every batch size (tests/models/test_pipeline.py
    checks this bitwise on the served models), and is faster at batch 1 besides.
    """

    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pinned = self.batch_invariant and x.device.type == "cpu" and self.padding_mode == "zeros"
        # Under torch.compile the shape is fixed (the pipeline pads every micro-batch) and Inductor
        # lowers the convolution to oneDNN itself; mkldnn_convolution has no meta kernel to trace.
        if not pinned or torch.compiler.is_compiling():
            return super().forward(x)
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):  # mkldnn_convolution is not on autocast's list
            dtype = torch.get_autocast_dtype("cpu")
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        assert isinstance(self.padding, tuple)
        return torch.mkldnn_convolution(x, w, b, self.padding, self.stride, self.dilation, self.groups)


class Linear(nn.Linear):
    """nn.Linear that, once ``batch_invariant`` is set, maps a [B, K] input one row at a time.

    The BLAS picks its GEMM kernel (and so its reduction order) by the number of rows, so the time
    and class embeddings of an image differed with its batch. One matrix-vector product per row is
    the same call at every batch size; these layers are a negligible share of the network's work.
    Token inputs [B, L, K] (attention) keep one GEMM: their rows are B x L and tested invariant.
    """

    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and x.dim() == 2 and x.shape[0] > 1 and x.device.type == "cpu":
            return torch.cat([super(Linear, self).forward(row) for row in x.split(1)])
        return super().forward(x)


class Norm(nn.GroupNorm):
    """GroupNorm whose forward is the fused norm(+scale/shift)+SiLU op."""

    def forward(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        silu: bool = True,
    ) -> torch.Tensor:
        return groupnorm_silu(
            x, self.num_groups, self.weight, self.bias, eps=self.eps, scale=scale, shift=shift, silu=silu
        )


class ResBlock(nn.Module):
    """Pre-norm residual block; ``updown`` makes it ADM's resampling block (pool / upsample inside)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_dim: int,
        cfg: UNetConfig,
        updown: Literal["up", "down"] | None = None,
        out_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.scale_shift = cfg.scale_shift_norm
        self.mish = cfg.act == "mish"
        self.updown = updown
        self.out_scale = out_scale
        self.norm1 = Norm(cfg.groups, cin, eps=cfg.norm_eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = Linear(emb_dim, 2 * cout if cfg.scale_shift_norm else cout)
        self.norm2 = Norm(cfg.groups, cout, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.skip: nn.Module = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x) if self.mish else F.silu(x)

    def _norm_act(
        self,
        norm: Norm,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.mish:
            return F.mish(norm(x, scale=scale, shift=shift, silu=False))
        return norm(x, scale=scale, shift=shift)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.updown == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._norm_act(self.norm1, x)
        if self.updown is not None:
            x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        e = self.emb_proj(self._act(emb))
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self._norm_act(self.norm2, h, scale, shift)
        else:
            h = self._norm_act(self.norm2, h + e[:, :, None, None])
        out = self.skip(x) + self.conv2(self.dropout(h))
        return out if self.out_scale == 1.0 else out / self.out_scale


class Attention(nn.Module):
    """Spatial self-attention through torch's scaled_dot_product_attention (flash/cuDNN on GPU)."""

    def __init__(
        self,
        ch: int,
        cfg: UNetConfig,
        norm: bool = True,
        groups: int | None = None,
        out_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.heads = cfg.num_heads if cfg.head_channels is None else ch // cfg.head_channels
        self.norm = Norm(groups or cfg.groups, ch, eps=cfg.norm_eps) if norm else None
        self.out_scale = out_scale
        self.q = Linear(ch, ch)
        self.k = Linear(ch, ch)
        self.v = Linear(ch, ch)
        self.out = Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = (x if self.norm is None else self.norm(x, silu=False)).flatten(2).transpose(1, 2)  # [B, HW, C]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        a = self.out(a.transpose(1, 2).reshape(b, -1, c))
        out = x + a.transpose(1, 2).reshape(b, c, hgt, wid)
        return out if self.out_scale == 1.0 else out / self.out_scale


class Downsample(nn.Module):
    def __init__(self, ch: int, padding: int = 1) -> None:
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the UNet: residual blocks, optional attention after each, optional resampler."""

    def __init__(
        self, blocks: list[ResBlock], attn: list[Attention] | None, resample: nn.Module | None
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn) if attn else None
        self.resample = resample


class UNet(nn.Module):
    """eps_theta(x, timestep[, class]): predicts the noise in x at the DDPM timestep index (float)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch0 = cfg.base_channels
        emb_dim = ch0 * cfg.time_embed_mult
        self.time_mlp = nn.Sequential(Linear(ch0, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.conv_in = Conv2d(cfg.in_channels, ch0, 3, padding=1)

        chans = [ch0 * m for m in cfg.channel_mult]
        levels = len(chans)
        self.down = nn.ModuleList()
        skips, cin, res = [ch0], ch0, cfg.image_size
        for i, cout in enumerate(chans):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, cout, emb_dim, cfg))
                attn.append(Attention(cout, cfg))  # built even where unused: keeps seeded inits unchanged
                cin = cout
                skips.append(cout)
            last = i == levels - 1
            self.down.append(
                Level(
                    blocks,
                    attn if res in cfg.attention_resolutions else None,
                    None if last else self._resampler(cout, emb_dim, "down"),
                )
            )
            if not last:
                skips.append(cout)
                res //= 2

        self.mid1 = ResBlock(cin, cin, emb_dim, cfg, out_scale=cfg.mid_scale)
        self.mid_attn = (
            Attention(cin, cfg, cfg.mid_attn_norm, cfg.mid_attn_groups, cfg.mid_scale)
            if cfg.mid_attention
            else None
        )
        self.mid2 = ResBlock(cin, cin, emb_dim, cfg, out_scale=cfg.mid_scale)

        self.up = nn.ModuleList()
        for i, cout in reversed(list(enumerate(chans))):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cin + skips.pop(), cout, emb_dim, cfg))
                attn.append(Attention(cout, cfg))
                cin = cout
            self.up.append(
                Level(
                    blocks,
                    attn if res in cfg.attention_resolutions else None,
                    self._resampler(cout, emb_dim, "up") if i else None,
                )
            )
            if i:
                res *= 2

        self.norm_out = Norm(cfg.groups, cin, eps=cfg.norm_eps)
        self.conv_out = Conv2d(cin, cfg.out_channels, 3, padding=1)

    def _resampler(self, ch: int, emb_dim: int, direction: Literal["up", "down"]) -> nn.Module:
        cfg = self.cfg
        if cfg.resample == "resnet":
            return ResBlock(ch, ch, emb_dim, cfg, updown=direction)
        return Downsample(ch, cfg.downsample_padding) if direction == "down" else Upsample(ch)

    @staticmethod
    def _resample(level: Level, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if level.resample is None:
            return h
        return level.resample(h, emb) if isinstance(level.resample, ResBlock) else level.resample(h)

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.cfg
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        # Sinusoids in float32 (timesteps up to 999 need its precision), then the weights' dtype: a
        # network cast to bf16 for serving takes the same float32 timesteps as in training.
        freqs = timestep_embedding(timestep, cfg.base_channels, cfg.time_flip_sin_to_cos, cfg.time_freq_shift)
        emb = self.time_mlp(freqs.to(next(self.time_mlp.parameters()).dtype))
        if self.class_emb is not None:
            if labels is None:
                raise ValueError("this model is class-conditional: labels are required")
            emb = emb + self.class_emb(labels)
        emb = emb.to(x.dtype)

        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            assert isinstance(level, Level)
            for j, block in enumerate(level.blocks):
                h = block(h, emb)
                if level.attn is not None:
                    h = level.attn[j](h)
                hs.append(h)
            if level.resample is not None:
                h = self._resample(level, h, emb)
                hs.append(h)

        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)

        for level in self.up:
            assert isinstance(level, Level)
            for j, block in enumerate(level.blocks):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
                if level.attn is not None:
                    h = level.attn[j](h)
            h = self._resample(level, h, emb)
        return self.conv_out(self.norm_out(h))


def set_batch_invariant(net: nn.Module, on: bool = True) -> None:
    """Switch every ``Conv2d`` / ``Linear`` of ``net`` to (or from) its batch-invariant CPU path."""
    for module in net.modules():
        if isinstance(module, Conv2d | Linear):
            module.batch_invariant = on


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
