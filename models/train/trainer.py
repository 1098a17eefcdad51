"""The training loop: data order, optimizer, EMA, DDP, checkpoints, logging; methods do the rest.

The loop only counts parameter updates: a method's ``step`` may spend several (dro-at's replay), and
the budget, LR warm-up, logging and checkpoint cadence are all in updates. Every random draw comes
from one CPU generator per rank plus torch's global RNG (dropout), both checkpointed, and the data
order is a pure function of (seed, epoch), so a resumed run retraces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models.checkpoint import load_checkpoint
from models.data import (
    Dataset,
    downsample,
    gaussian_noise,
    load_dataset,
    salt_and_pepper,
    uniform_outliers,
)
from models.devices import resolve_device
from models.errors import CheckpointError, UserError
from models.generate import generate
from models.grid import save_grid
from models.noise import NoiseSource
from models.schedules import Schedule
from models.train import state as ckpt
from models.train.config import TrainConfig
from models.train.export import served_header, write_served
from models.train.methods import Method, get_method
from models.unet import UNet

RECENT = 100  # updates averaged into the reported final loss


@dataclass
class TrainResult:
    updates: int
    wall_s: float
    final_loss: float | None
    checkpoint: Path | None
    export: Path | None
    stopped_early: bool


def load_data(cfg: TrainConfig) -> Dataset:
    """The training set at the model's resolution, corrupted as configured (once, with its own seed)."""
    mc = cfg.model_config_()
    k = cfg.data.downsample
    ds = load_dataset(cfg.data.name, cfg.data.path, cfg.data.split, mc.image_size * k, mc.in_channels)
    ds = Dataset(downsample(ds.images, k), ds.labels, ds.class_names, ds.name)
    if tuple(ds.images.shape[1:]) != (mc.in_channels, mc.image_size, mc.image_size):
        raise UserError(
            "preset",
            f"the model takes {mc.in_channels}x{mc.image_size}x{mc.image_size}, data is {tuple(ds.images.shape[1:])}",
        )
    if cfg.data.limit is not None:
        ds = Dataset(ds.images[: cfg.data.limit], ds.labels[: cfg.data.limit], ds.class_names, ds.name)
    c = cfg.data.corruption
    if c is not None:
        g = torch.Generator().manual_seed(c.seed)
        if c.kind == "gaussian":
            images, _ = gaussian_noise(ds.images, c.sigma, c.fraction, g, clamp=c.clamp)
        elif c.kind == "outliers":
            images, _ = uniform_outliers(ds.images, c.fraction, g)
        else:
            images, _ = salt_and_pepper(ds.images, c.amount, c.fraction, g)
        ds = Dataset(images, ds.labels, ds.class_names, ds.name)
    if len(ds) < cfg.batch_size:
        raise UserError("batch_size", f"{cfg.batch_size} is larger than the data set ({len(ds)} images)")
    return ds


def load_init(net: nn.Module, cfg: TrainConfig, path: str | Path) -> None:
    """Copy a served checkpoint's weights into ``net`` (float16 files widen exactly to float32).

    Refused, naming ``--init``, when the file is missing or unreadable, or when its network
    (architecture; dropout may differ), schedule or kind (diffusion / consistency) is not the config's.
    """
    try:
        source, header = load_checkpoint(path)
    except CheckpointError as err:
        hint = " (a training checkpoint continues with --resume)" if Path(path).is_dir() else ""
        raise UserError("--init", f"{err.reason}{hint}") from None
    ours = served_header(cfg, updates=0, command=None, hardware=None, wall_s=None, final_loss=None)
    arch, theirs = ours.model.model_dump(exclude={"dropout"}), header.model.model_dump(exclude={"dropout"})
    if arch != theirs:
        diff = ", ".join(f"{k} {theirs[k]!r} vs {arch[k]!r}" for k in arch if arch[k] != theirs[k])
        raise UserError("--init", f"{path}: its network does not match the config's ({diff})")
    if header.schedule != ours.schedule:
        raise UserError("--init", f"{path}: its noise schedule does not match the config's")
    if header.prediction != ours.prediction:  # e.g. an imported v-prediction model: we train eps
        raise UserError(
            "--init", f"{path} predicts {header.prediction}; training fits epsilon-prediction models"
        )
    if header.consistency is not None and header.consistency.c_in:
        raise UserError(
            "--init", f"{path}: fine-tuning an imported EDM (c_in) consistency model is not supported"
        )
    if header.kind != ours.kind:
        raise UserError(
            "--init",
            f"{path} is a {header.kind} checkpoint; method {cfg.method!r} trains a {ours.kind} model",
        )
    net.load_state_dict(source.state_dict())


def hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible, no GPU"


class Trainer:
    """Owns the model, EMA, optimizer and data order; implements the methods' ``StepContext``."""

    def __init__(
        self,
        cfg: TrainConfig,
        command: str | None = None,
        resume: str | Path | None = None,
        init: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.command = command
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = self._setup_device()
        self.schedule = Schedule(cfg.schedule)
        self.method: Method = get_method(cfg.method, cfg.options)
        self.data = load_data(cfg)
        if cfg.batch_size % self.world:
            raise UserError("batch_size", f"{cfg.batch_size} does not split over {self.world} ranks")
        self.local_batch = cfg.batch_size // self.world
        torch.manual_seed(cfg.seed)
        self.net = UNet(cfg.model_config_())
        if init is not None and resume is None:  # a resumed run's weights come from its checkpoint
            load_init(self.net, cfg, init)
        self.net = self.net.to(self.device)
        # With --init the method keeps those weights (no teacher copy); EMA and optimizer start fresh.
        self.method.setup(self.net, self.schedule, cfg.updates, fresh=resume is None and init is None)
        self.ema = UNet(cfg.model_config_()).to(self.device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.net.state_dict())
        self.model: nn.Module = self.net
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.ema_params: list[torch.Tensor] = list(self.ema.parameters())
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
        )
        self.generator = torch.Generator().manual_seed(cfg.seed + 7919 * self.rank)
        self.state = ckpt.LoopState()
        self.out = Path(cfg.out_dir)
        self.stop_reason: str | None = None
        if resume is not None:
            self._resume(resume)

    # StepContext -------------------------------------------------------------------------------

    def eps(self, x: torch.Tensor, t: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        net = self.model if sync else self.net
        timestep = self.schedule.net_time(t).to(self.device)
        mode = self.cfg.autocast
        if mode == "bf16" or (mode == "auto" and self.device.type == "cuda"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return net(x, timestep).float()
        return net(x, timestep)

    def update(self, loss: torch.Tensor) -> None:
        o = self.cfg.optim
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, o.grad_clip)
        lr = o.lr * min(1.0, (self.state.updates + 1) / o.warmup_updates) if o.warmup_updates else o.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        u = self.state.updates
        decay = min(self.cfg.ema_decay, (1 + u) / (10 + u)) if self.cfg.ema_warmup else self.cfg.ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.net.parameters()], 1.0 - decay)
        self.state.updates += 1

    def remaining(self) -> int:
        return self.cfg.updates - self.state.updates

    # Setup ---------------------------------------------------------------------------------------

    def _setup_device(self) -> torch.device:
        dev = resolve_device(self.cfg.device)
        if self.world > 1:
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)
            self.rank = dist.get_rank()
            if dev.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                return torch.device("cuda", local)
        return dev

    def _resume(self, path: str | Path) -> None:
        meta, tensors = ckpt.load(path)
        self.net.load_state_dict(ckpt.section(tensors, "model"))
        self.ema.load_state_dict(ckpt.section(tensors, "ema"))
        opt_sd = ckpt.optimizer_state(ckpt.section(tensors, "optim"), meta["optimizer_param_groups"])
        self.opt.load_state_dict(opt_sd)
        self.method.load_state_dict(ckpt.section(tensors, "method"))
        saved = meta["state"]
        self.state = ckpt.LoopState(**saved)
        if meta.get("command"):  # provenance: every command that contributed updates, in order
            self.command = f"{meta['command']} && {self.command}" if self.command else meta["command"]
        if len(self.state.rng) != self.world:
            raise UserError(
                "resume", f"checkpoint was written by {len(self.state.rng)} ranks, this run has {self.world}"
            )
        ckpt.set_rng_state(self.generator, self.device, self.state.rng[self.rank])

    # Data ----------------------------------------------------------------------------------------

    def batches(self) -> Iterator[torch.Tensor]:
        """This rank's minibatches, forever, resuming at (epoch, position); a permutation per epoch."""
        n = len(self.data)
        per_epoch = n // self.cfg.batch_size
        while True:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.state.epoch)
            perm = torch.randperm(n, generator=g)
            while self.state.position < per_epoch:
                start = self.state.position * self.cfg.batch_size + self.rank * self.local_batch
                idx = perm[start : start + self.local_batch]
                self.state.position += 1
                yield self.data.images[idx].to(self.device)
            self.state.epoch += 1
            self.state.position = 0

    # Checkpoints, samples, logs ------------------------------------------------------------------

    def checkpoint(self) -> Path | None:
        rngs = [ckpt.rng_state(self.generator, self.device)]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.rank != 0:
            return None
        self.state.rng = rngs
        extra = {"command": self.command, "hardware": hardware(self.device, self.world)}
        path = ckpt.save(
            self.out,
            self.net.state_dict(),
            self.ema.state_dict(),
            self.opt,
            self.state,
            self.cfg.model_dump(),
            extra,
            self.method.state_dict(),
        )
        if self.cfg.sample_count:
            self.sample_grid(self.out / "samples" / f"step-{self.state.updates:08d}.png")
        return path

    @torch.no_grad()
    def sample_grid(self, path: Path) -> Path:
        """EMA samples with the method's sampler (DDIM, ``sample_steps``), fixed seeds: same images every checkpoint."""
        noise = NoiseSource(range(self.cfg.sample_count), self.data.images.shape[1:], self.device)
        denoiser, sampler, steps = self.method.sampling(self.ema, self.schedule, self.cfg.sample_steps)
        images = generate(denoiser, noise, sampler=sampler, steps=steps)
        return save_grid(images, path)

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def final_loss(self) -> float | None:
        recent = self.state.recent_losses
        return sum(recent) / len(recent) if recent else None

    @torch.no_grad()
    def eval_loss(self, n: int = 512, seed: int = 12345) -> float:
        """Clean eps-MSE of the EMA weights on n fixed training images, times and noises (comparable across methods)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.data), generator=g)[:n]
        total, count = 0.0, 0
        for chunk in idx.split(128):
            x0 = self.data.images[chunk].to(self.device)
            t = self.schedule.sample_train_t(x0.shape[0], generator=g)
            eps = torch.randn(x0.shape, generator=g).to(self.device)
            x_t = self.schedule.diffuse(x0, t, eps)
            out = self.ema(x_t, self.schedule.net_time(t).to(self.device))
            total += float((out.float() - eps).pow(2).sum())
            count += eps.numel()
        return total / count

    def export(self) -> Path:
        path = (
            Path(self.cfg.export_path) if self.cfg.export_path else self.out / f"{self.cfg.name}.safetensors"
        )
        header = served_header(
            self.cfg,
            updates=self.state.updates,
            command=self.command,
            hardware=hardware(self.device, self.world),
            wall_s=self.state.wall_s,
            final_loss=self.final_loss(),
            class_names=self.data.class_names,
        )
        dtype = torch.float16 if self.cfg.export_dtype == "float16" else torch.float32
        return write_served(path, self.ema, header, dtype)

    # The loop ------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_reason = signal.Signals(signum).name

    def run(self) -> TrainResult:
        cfg = self.cfg
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.net.train()
        start_wall = self.state.wall_s
        t0 = time.perf_counter()
        start_updates, start_images = self.state.updates, self.state.images
        last_ckpt: Path | None = None
        last_ckpt_at = -1
        bar = tqdm(
            total=cfg.updates,
            initial=self.state.updates,
            disable=not cfg.progress or self.rank != 0,
            unit="upd",
            mininterval=2.0,
            dynamic_ncols=True,
        )
        batches = self.batches()
        try:
            while self.state.updates < cfg.updates and self.stop_reason is None:
                before = self.state.updates
                losses = self.method.step(self, next(batches))
                if self.state.updates == before:
                    raise RuntimeError(f"method {cfg.method!r} made no parameter update")
                self.state.images += cfg.batch_size
                self.state.recent_losses = (self.state.recent_losses + losses)[-RECENT:]
                elapsed = time.perf_counter() - t0
                self.state.wall_s = start_wall + elapsed
                ups = (self.state.updates - start_updates) / max(elapsed, 1e-9)
                ips = (self.state.images - start_images) / max(elapsed, 1e-9)
                if not all(math.isfinite(x) for x in losses):
                    raise RuntimeError(f"loss became {losses} at update {self.state.updates}")
                bar.update(self.state.updates - before)
                bar.set_postfix(
                    loss=f"{losses[-1]:.4f}", upd_s=f"{ups:.2f}", img_s=f"{ips:.1f}", refresh=False
                )
                crossed = self.state.updates // cfg.log_every > before // cfg.log_every
                if crossed or self.state.updates >= cfg.updates:
                    self.log(
                        {
                            "update": self.state.updates,
                            "loss": losses[-1],
                            "loss_avg": self.final_loss(),
                            "lr": self.opt.param_groups[0]["lr"],
                            "epoch": self.state.epoch,
                            "updates_per_s": ups,
                            "images_per_s": ips,
                            "wall_s": self.state.wall_s,
                        }
                    )
                if self.state.updates // cfg.checkpoint_every > before // cfg.checkpoint_every:
                    last_ckpt, last_ckpt_at = self.checkpoint(), self.state.updates
                if cfg.max_minutes is not None and self.state.wall_s - start_wall > 60 * cfg.max_minutes:
                    self.stop_reason = "max_minutes"
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if last_ckpt_at != self.state.updates:  # every rank decides alike: checkpoint() is collective
            last_ckpt = self.checkpoint()
        exported = None
        if self.rank == 0:
            exported = self.export()
            self.log(
                {
                    "event": "end",
                    "update": self.state.updates,
                    "final_loss": self.final_loss(),
                    "eval_loss_ema": self.eval_loss(),
                    "wall_s": self.state.wall_s,
                    "stopped": self.stop_reason,
                    "export": str(exported),
                }
            )
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return TrainResult(
            self.state.updates,
            self.state.wall_s,
            self.final_loss(),
            last_ckpt,
            exported,
            self.stop_reason is not None,
        )


def train(
    cfg: TrainConfig,
    command: str | None = None,
    resume: str | Path | None = None,
    init: str | Path | None = None,
) -> TrainResult:
    """Build a trainer for ``cfg`` (continuing a checkpoint, or starting from a served model's
    weights with ``init``) and run it to the end."""
    return Trainer(cfg, command, resume, init).run()
