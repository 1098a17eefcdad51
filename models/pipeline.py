"""A loaded checkpoint ready to sample and purify: what the worker (and the CLI) calls.

On CUDA the network runs in half precision (float16 by default, bfloat16 on request) with CUDA
graphs per batch-size bucket and the fused Triton kernels; elsewhere it runs the PyTorch reference
path in float32. Both sit behind the same calls. float16, not bfloat16, is the default because its
three extra mantissa bits keep a 10-step DDIM run of the served models within ~0.1% of float32
where bfloat16 drifts by ~4% (docs/BENCHMARKS.md); the tensor cores run both at the same rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.checkpoint import CheckpointHeader, load_checkpoint
from models.denoisers import DIFFUSION_DENOISERS, ConsistencyDenoiser, Denoiser
from models.devices import resolve_device
from models.errors import UserError
from models.generate import generate, purify, sampler_grid, start_state
from models.noise import NoiseSource
from models.samplers import (
    PLANS,
    Callback,
    Cancel,
    Cancelled,
    DdimEps,
    Group,
    RunningBatch,
    rule_for,
)
from models.sampling_spec import check_ddim_eps, check_sampler, default_sampler, default_steps, samplers_for
from models.schedules import Schedule, strength_times
from models.unet import UNet, set_batch_invariant

__all__ = [
    "CPU_DTYPES",
    "GPU_DTYPES",
    "Cancelled",
    "CpuOptions",
    "Group",
    "ModelInfo",
    "Pipeline",
    "RunningBatch",
    "cpu_bf16_support",
]

GPU_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_DTYPES = ("float32", "bfloat16")
# Rows per network call on the batch-invariant (CPU) path: where the served fmnist network's CPU time
# per image stops falling on one thread (16 and 32 within 1%, 8 is 11% slower; docs/BENCHMARKS.md).
DEFAULT_MICRO_BATCH = 16
# Pixels per network call on that path: 16 rows up to 64x64, 4 at 128x128, 1 at 256x256. A call's
# activations grow with rows x pixels, so this bounds a worker's memory whatever the running batch
# holds (docs/IMPORTING.md has the measured peaks).
DEFAULT_MICRO_BATCH_PIXELS = 16 * 64 * 64


def rows_per_call(micro_batch: int, micro_batch_pixels: int, height: int, width: int) -> int:
    """Rows of ``height`` x ``width`` images per CPU network call: ``micro_batch``, fewer when they
    would exceed ``micro_batch_pixels`` pixels, never fewer than one."""
    return max(1, min(micro_batch, micro_batch_pixels // (height * width)))


def cpu_bf16_support() -> str | None:
    """The CPU feature that makes bfloat16 worth running ("amx_bf16" or "avx512_bf16"), or None;
    without one of them oneDNN emulates bf16 and it is slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


@dataclass(frozen=True)
class CpuOptions:
    """How the CPU runs the network (the service's ROBUSTDIFF_CPU_* settings).

    ``micro_batch`` rows per network call, fewer for images so large that the call would exceed
    ``micro_batch_pixels`` pixels (``rows_for``); ``pad`` fills the last micro-batch up to that shape;
    ``dtype`` bfloat16 is autocast (needs avx512_bf16 or AMX); ``compile`` runs torch.compile at
    the micro-batch shape (and so pads: one shape, one compiled graph), with Inductor's freezing
    unless ``freeze`` is off (the weights become constants it folds and prepacks for oneDNN once,
    not every call; measured no slower, docs/BENCHMARKS.md); ``channels_last`` stores activations NHWC.
    """

    micro_batch: int = DEFAULT_MICRO_BATCH
    micro_batch_pixels: int = DEFAULT_MICRO_BATCH_PIXELS
    pad: bool = False
    dtype: str = "float32"
    compile: bool = False
    freeze: bool = True
    channels_last: bool = False

    @property
    def padded(self) -> bool:
        return self.pad or self.compile

    def rows_for(self, height: int, width: int) -> int:
        """Rows per network call for images of this size."""
        return rows_per_call(self.micro_batch, self.micro_batch_pixels, height, width)

    def check(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch: {self.micro_batch} must be >= 1")
        if self.micro_batch_pixels < 1:
            raise ValueError(f"micro_batch_pixels: {self.micro_batch_pixels} must be >= 1")
        if self.dtype not in CPU_DTYPES:
            raise ValueError(f"cpu dtype: {self.dtype!r} is not one of {', '.join(CPU_DTYPES)}")
        if self.dtype == "bfloat16" and cpu_bf16_support() is None:
            raise ValueError("cpu dtype: bfloat16 needs a CPU with avx512_bf16 or AMX; this one has neither")


def _freezing(on: bool) -> contextlib.AbstractContextManager[object]:
    """Inductor's freezing (weights folded as constants and prepacked for oneDNN) while ``on``."""
    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


# Dynamo keeps at most ``recompile_limit`` graphs of one function and past it runs the function
# eagerly, with one log line. A frozen network is guarded on its own weights, so each compiled
# model is a new graph of the same UNet.forward: without room, a worker serving more models than
# the limit would quietly run the later ones uncompiled.
GRAPHS_PER_COMPILED_NETWORK = 8


def _make_room_for_compiled_network() -> None:
    """Raise Dynamo's graph limits by one compiled network's share (see above)."""
    import torch._dynamo.config

    cfg = torch._dynamo.config
    cfg.recompile_limit += GRAPHS_PER_COMPILED_NETWORK
    cfg.accumulated_recompile_limit += GRAPHS_PER_COMPILED_NETWORK


def _fill(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``rows`` extended to ``size`` rows with copies of its last one (padding that is a real input,
    so no norm sees an all-zero image)."""
    return torch.cat([rows, rows[-1:].expand(size - rows.shape[0], *rows.shape[1:])])


@dataclass(frozen=True)
class ModelInfo:
    """What the API shows of a served model (plain JSON types only)."""

    name: str
    kind: str
    method: str
    image_shape: tuple[int, int, int]
    num_classes: int
    timesteps: int  # the schedule's T: t* and every time must be >= 1/T; ddpm/ddim fit round(t* T) steps
    class_names: list[str] = field(default_factory=list)
    hash: str = ""
    samplers: list[str] = field(default_factory=list)
    default_steps: int = 10
    dataset: str = "unknown"
    eval_s: float = 0.0  # measured at warm-up: seconds per image per network evaluation (0: not measured)
    strengths: dict[str, float] = field(default_factory=dict)  # name -> t* with that noise level here
    seed: int | None = None  # the training seed (None: not recorded, e.g. an imported model)


class Pipeline:
    def __init__(
        self,
        net: UNet,
        header: CheckpointHeader,
        device: torch.device,
        name: str | None = None,
        batch_invariant: bool | None = None,
        gpu_dtype: str = "float16",
        cpu: CpuOptions | None = None,
    ) -> None:
        self.net = net
        # On the CPU, PyTorch picks convolution and GEMM kernels (and so reduction orders) by batch
        # size, so an image would differ in its last bits with its batch. Batch-invariant mode pins
        # the kernels (models.unet.Conv2d / Linear) and runs fixed-size micro-batches; CUDA batches
        # freely for speed (same to half-precision rounding).
        self.batch_invariant = device.type != "cuda" if batch_invariant is None else batch_invariant
        self.cpu = cpu or CpuOptions()
        if device.type == "cpu":
            self.cpu.check()
        self.header = header
        self.device = device
        self.schedule = Schedule(header.schedule)
        if gpu_dtype not in GPU_DTYPES:
            raise ValueError(f"gpu_dtype: {gpu_dtype!r} is not one of {', '.join(GPU_DTYPES)}")
        self.dtype = GPU_DTYPES[gpu_dtype] if device.type == "cuda" else torch.float32
        self._forward = self._build_forward()
        self.info = ModelInfo(
            name=name or header.name,
            kind=header.kind,
            method=header.training.method,
            image_shape=header.image_shape,
            num_classes=header.model.num_classes,
            timesteps=self.schedule.T,
            class_names=list(header.class_names),
            hash=header.content_hash or hashlib.sha256(header.model_dump_json().encode()).hexdigest(),
            samplers=list(samplers_for(header.kind)),
            default_steps=default_steps(header.kind),
            dataset=header.training.dataset,
            strengths=strength_times(self.schedule),
            seed=header.training.seed,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "cpu",
        name: str | None = None,
        batch_invariant: bool | None = None,
        gpu_dtype: str = "float16",
        cpu: CpuOptions | None = None,
    ) -> Pipeline:
        """A robustdiff checkpoint file, or a diffusers folder (``models.diffusers_import``)."""
        dev = resolve_device(device)
        if Path(path).is_dir():  # a diffusers folder, converted in memory (safetensors weights only)
            from models.diffusers_import import import_diffusers

            imported = import_diffusers(path, name)
            return cls(imported.net.to(dev), imported.header, dev, name, batch_invariant, gpu_dtype, cpu)
        net, header = load_checkpoint(path, dev)
        return cls(net, header, dev, name, batch_invariant, gpu_dtype, cpu)

    def _build_forward(self) -> Callable[..., torch.Tensor]:
        """The network call the samplers see: graphed half precision on CUDA, plain float32 elsewhere."""
        net: Callable[..., torch.Tensor] = self.net
        if self.device.type == "cuda":
            from kernels.graphs import GraphedForward

            self.net = self.net.to(self.dtype).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            graphed = GraphedForward(self.net)

            def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
                return graphed(x.to(self.dtype).contiguous(memory_format=torch.channels_last), t, y).float()

        if self.device.type == "cpu":
            net = self._cpu_net()
        if not self.batch_invariant:
            return net
        if self.device.type == "cpu":
            set_batch_invariant(self.net)
        size, pad = self.cpu.rows_for(*self.header.image_shape[1:]), self.cpu.padded

        def microbatched(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            """``net`` on consecutive slices of at most ``size`` rows; with ``pad`` the last slice is
            filled up with copies of its last row so every call has exactly ``size`` rows."""
            n = x.shape[0]
            if t.ndim == 0:
                t = t.expand(n)
            outs = []
            for i in range(0, n, size):
                xs, ts, ys = x[i : i + size], t[i : i + size], None if y is None else y[i : i + size]
                rows = xs.shape[0]
                if pad and rows < size:
                    xs, ts = _fill(xs, size), _fill(ts, size)
                    ys = None if ys is None else _fill(ys, size)
                outs.append(net(xs, ts, ys)[:rows])
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        return microbatched

    def _cpu_net(self) -> Callable[..., torch.Tensor]:
        """The network with the CPU options applied: memory layout, bf16 autocast, torch.compile."""
        opts = self.cpu
        fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=fmt)  # type: ignore[call-overload]
        if opts.compile:
            _make_room_for_compiled_network()
        body: Callable[..., torch.Tensor] = (
            torch.compile(self.net, dynamic=False, options={"freezing": opts.freeze})
            if opts.compile
            else self.net
        )
        autocast = opts.dtype == "bfloat16"
        freeze = opts.compile and opts.freeze

        def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            # Freezing is read while Dynamo traces (it then guards on this module's weights and
            # passes them as constants), not only by Inductor, so the compile options alone do not
            # carry it: it is set around every call, when a trace can happen. The options still
            # name it, so a frozen and an unfrozen compile (equal backends otherwise) never share
            # a compiled graph of UNet.forward.
            with (
                _freezing(freeze),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
            ):
                return body(x.contiguous(memory_format=fmt), t, y).float().contiguous()

        return net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network eps_theta(x, t[, y]) as every sampler and the worker's running batch call it.

        ``x`` [B, C, H, W] on this pipeline's device, ``t`` [B] DDPM timestep indices (float),
        ``y`` [B] class labels for a class-conditional model. Returns float32 [B, C, H, W]. With
        ``batch_invariant`` (the CPU default) each row's output is bitwise independent of the other
        rows and of B, so a caller may batch any rows together without changing an image.
        """
        return self._forward(x, t) if y is None else self._forward(x, t, y)

    def warmup(self, max_batch: int = 256) -> list[int]:
        """Run one step at every CUDA-graph bucket up to ``max_batch`` so no request pays a capture.

        On the CPU one batch-1 step pages the weights in. Returns the batch sizes warmed up.
        """
        from kernels.graphs import DEFAULT_BUCKETS

        sizes = [b for b in DEFAULT_BUCKETS if b <= max_batch] if self.device.type == "cuda" else [1]
        sampler = default_sampler(self.info.kind)
        labels_for = (lambda n: [0] * n) if self.info.num_classes else (lambda n: None)
        if not sizes:
            return sizes
        for n in sizes:
            elapsed = self._timed_step(sampler, n, labels_for(n))
        # The API turns a synchronous request it estimates past its timeout into a 202 from this figure.
        n = sizes[-1]
        if self.device.type == "cuda" or elapsed < 1.0:  # the first call paid the capture / page-in
            elapsed = self._timed_step(sampler, n, labels_for(n))
        self.info = dataclasses.replace(self.info, eval_s=elapsed / n)
        return sizes

    def _timed_step(self, sampler: str, n: int, labels: list[int] | None) -> float:
        start = time.perf_counter()
        self.sample(list(range(n)), sampler=sampler, steps=1, labels=labels)
        return time.perf_counter() - start

    def denoiser(self, labels: torch.Tensor | None = None) -> Denoiser:
        if self.header.kind == "consistency":
            cm = self.header.consistency
            assert cm is not None
            return ConsistencyDenoiser(
                self.forward,
                self.schedule,
                labels,
                cm.sigma_min,
                cm.sigma_data,
                cm.parameterization,
                cm.c_in,
                cm.renoise_subtract_sigma_min,
            )
        return DIFFUSION_DENOISERS[self.header.prediction](self.forward, self.schedule, labels)

    def _labels(self, labels: Sequence[int] | None, n: int) -> torch.Tensor | None:
        classes = self.info.num_classes
        if not classes:
            if labels is not None:
                raise UserError("labels", "this model is unconditional")
            return None
        if labels is None or len(labels) != n:
            raise UserError("labels", f"one class label per image is required ({n})")
        if any(not 0 <= int(c) < classes for c in labels):
            raise UserError("labels", f"must be in [0, {classes - 1}]")
        return torch.tensor(list(labels), dtype=torch.long, device=self.device)

    def _check_sampler(self, sampler: str) -> None:
        check_sampler(sampler, self.info.kind, self.info.name)

    def grid(
        self,
        sampler: str,
        *,
        steps: int | None = None,
        times: Sequence[float] | None = None,
        eta: float = 0.0,
        t_star: float | None = None,
        spacing: str | None = None,
        ddim_eps: DdimEps = "from-x0",
    ) -> torch.Tensor:
        """The time grid sample (``t_star=None``) or purify would run with these arguments (NFE is
        its length - 1), or their ValueError: lets a caller refuse a request before any work."""
        self._check_sampler(sampler)
        check_ddim_eps(ddim_eps, sampler)
        return sampler_grid(
            self.schedule, sampler, steps=steps, times=times, eta=eta, t_star=t_star, spacing=spacing
        )

    def _prepare(
        self, sampler: str, seeds: Sequence[int], labels: Sequence[int] | None
    ) -> tuple[NoiseSource, Denoiser]:
        """What sample and purify both check and build: the sampler, per-image noise, the denoiser."""
        self._check_sampler(sampler)
        noise = NoiseSource(seeds, self.info.image_shape, self.device)
        return noise, self.denoiser(self._labels(labels, len(noise)))

    @torch.inference_mode()
    def sample(
        self,
        seeds: Sequence[int],
        *,
        sampler: str = "ddim",
        steps: int | None = None,
        times: Sequence[float] | None = None,
        eta: float = 0.0,
        labels: Sequence[int] | None = None,
        callback: Callback | None = None,
        cancel: Cancel | None = None,
        spacing: str | None = None,
        ddim_eps: DdimEps = "from-x0",
    ) -> torch.Tensor:
        """Images [B, C, H, W] float32 in [-1, 1] on the CPU, one per seed.

        ``steps`` (default 10) on the sampler's spacing, or the grid [1, *times, 0]: ``times`` are
        where the network is evaluated again after t = 1 (see ``models.generate.generate``).
        """
        noise, den = self._prepare(sampler, seeds, labels)
        out = generate(
            den,
            noise,
            sampler=sampler,
            steps=steps,
            times=times,
            eta=eta,
            callback=callback,
            cancel=cancel,
            spacing=spacing,
            ddim_eps=ddim_eps,
        )
        return out.float().cpu()

    @torch.inference_mode()
    def purify(
        self,
        images: torch.Tensor,
        seeds: Sequence[int],
        *,
        t_star: float = 0.1,
        sampler: str = "ddim",
        steps: int | None = None,
        times: Sequence[float] | None = None,
        eta: float = 0.0,
        labels: Sequence[int] | None = None,
        callback: Callback | None = None,
        cancel: Cancel | None = None,
        ddim_eps: DdimEps = "from-x0",
    ) -> torch.Tensor:
        """Purified images [B, C, H, W] float32 in [-1, 1] on the CPU; ``images`` in [-1, 1].

        ``steps`` (default 10) on the sampler's spacing, or the grid [t*, *times, 0] (see
        ``models.generate.purify``).
        """
        self._check_images(images)
        noise, den = self._prepare(sampler, seeds, labels)
        x = images.to(self.device, torch.float32)
        out = purify(
            den,
            x,
            noise,
            t_star=t_star,
            sampler=sampler,
            steps=steps,
            times=times,
            eta=eta,
            callback=callback,
            cancel=cancel,
            ddim_eps=ddim_eps,
        )
        return out.float().cpu()

    def _check_images(self, images: torch.Tensor) -> None:
        if tuple(images.shape[1:]) != self.info.image_shape:
            raise UserError(
                "images",
                f"shape {tuple(images.shape[1:])} does not match the model's {self.info.image_shape}",
            )
        if not torch.isfinite(images).all():
            raise UserError("images", "contain NaN or infinity")

    # ---- step-level batching: what the worker's engine calls ------------------------------------------
    def running_batch(self) -> RunningBatch:
        """An empty running batch on this model (clipped x0, as ``sample`` and ``purify``)."""
        return RunningBatch(self.denoiser(), clip_x0=True)

    @torch.inference_mode()
    def request(
        self,
        key: object,
        seeds: Sequence[int],
        *,
        sampler: str = "ddim",
        steps: int | None = None,
        times: Sequence[float] | None = None,
        eta: float = 0.0,
        labels: Sequence[int] | None = None,
        images: torch.Tensor | None = None,
        t_star: float | None = None,
        spacing: str | None = None,
        ddim_eps: DdimEps = "from-x0",
    ) -> tuple[Group, torch.Tensor]:
        """A sample (``images`` None) or purify request as a running batch's rows: its group and
        start state, checked exactly as ``sample`` / ``purify`` check them. The rows' images equal
        those calls' bit for bit on the CPU, whatever else shares the batch."""
        ts = self.grid(
            sampler,
            steps=steps,
            times=times,
            eta=eta,
            t_star=None if images is None else t_star,
            spacing=spacing,
            ddim_eps=ddim_eps,
        )
        if images is not None:
            self._check_images(images)
        noise, den = self._prepare(sampler, seeds, labels)
        x = start_state(
            den,
            noise,
            images=None if images is None else images.to(self.device, torch.float32),
            t_start=float(ts[0]),
            t_star=t_star,
        )
        plan = PLANS.get(rule_for(sampler, ddim_eps), den, ts, eta, self.device)
        return Group(key, plan, noise.seeds_device, den.labels), x
