"""Service settings, read from ``ROBUSTDIFF_*`` environment variables.

Every option carries a description because the README's settings table is generated from these
fields; a bad value stops the process at start with a message naming the variable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.errors import UserError

ENV_PREFIX = "ROBUSTDIFF_"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "models" / "weights"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


SERVABLE_KINDS = ("diffusion", "consistency")


def checkpoint_field(path: Path, key: str) -> str | None:
    """A string field (``kind``, ``name``) of a robustdiff safetensors header, read as plain JSON
    (no torch in the API).

    A safetensors file starts with an 8-byte little-endian header length and the JSON header,
    whose ``__metadata__`` holds our JSON under the key ``robustdiff``.
    """
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            meta = json.loads(f.read(size)).get("__metadata__") or {}
        value = json.loads(meta.get("robustdiff", "{}")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def checkpoint_kind(path: Path) -> str | None:
    return checkpoint_field(path, "kind")


def _diffusers_folder_problem(folder: Path) -> str | None:
    """Why a folder in ROBUSTDIFF_MODELS cannot be served as a diffusers model (None: it can be tried).

    Plain file checks, so serve refuses before starting anything; the worker converts the folder in
    memory. Only safetensors weights: the server never unpickles a .bin."""
    mdir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (mdir / "config.json").is_file():
        return "a folder, but not a diffusers model (no config.json nor unet/config.json)"
    if not (mdir / "diffusion_pytorch_model.safetensors").is_file():
        if (mdir / "diffusion_pytorch_model.bin").is_file():
            return (
                "has only .bin (pickle) weights, which the server never reads: convert it once with "
                f"`robustdiff import-diffusers {folder} --out NAME.safetensors` and serve that file"
            )
        return "no diffusion_pytorch_model.safetensors in it"
    return None


def _committed_weights() -> list[str]:
    """The servable checkpoints shipped in models/weights (not the evaluation classifier), the
    default model first so it is served first."""
    paths = [p for p in sorted(WEIGHTS_DIR.glob("*.safetensors")) if checkpoint_kind(p) in SERVABLE_KINDS]
    paths.sort(key=lambda p: p.stem != "fmnist-dro-at")
    return [str(p) for p in paths]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """All service options; field names map to ``ROBUSTDIFF_<NAME>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    redis_url: str = Field(
        "",
        description="Redis URL: redis://host:port/db, rediss://... (TLS) or unix://path. Empty: "
        "`robustdiff serve` starts a private Redis.",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=_committed_weights,
        description="Comma-separated checkpoint paths the worker serves, each optionally `name=path`; a "
        "path may be a diffusers folder (converted on load, safetensors weights only). "
        "Default: the committed models/weights/*.safetensors.",
    )
    default_model: str = Field(
        "fmnist-dro-at",
        description="Model used when a request names none; if it is not served and exactly one model "
        "is, that one is used.",
    )
    device: str = Field(
        "auto", description="Worker device: auto | cpu | cuda | cuda:N (auto: cuda if present)."
    )
    gpu_dtype: Literal["float16", "bfloat16"] = Field(
        "float16",
        description="Network precision on a GPU (the CPU always runs float32). float16 keeps a DDIM-10 "
        "run within 0.1% of float32 on the served models; bfloat16 drifts by ~4%, at the same speed.",
    )
    cpu_micro_batch: int = Field(
        16,
        ge=1,
        description="Rows per network call on the CPU: a batch runs as micro-batches of this many "
        "images (kernels pinned so each image's bytes never depend on its batch).",
    )
    cpu_micro_batch_pixels: int = Field(
        16 * 64 * 64,
        ge=1,
        description="Most pixels per CPU network call: large images run fewer rows per call (16 up to "
        "64x64, 4 at 128x128, 1 at 256x256), which bounds a worker's memory whatever its batch holds.",
    )
    cpu_pad_micro_batch: bool = Field(
        False,
        description="Pad the last CPU micro-batch to CPU_MICRO_BATCH rows, so every call has one shape "
        "(a belt on top of the pinned kernels; a 1-image request then costs a full micro-batch).",
    )
    cpu_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Network precision on the CPU. bfloat16 (autocast; needs avx512_bf16 or AMX, refused "
        "at start otherwise) changes a DDIM-10 image by about 1% relative L2 (docs/BENCHMARKS.md).",
    )
    cpu_compile: bool = Field(
        False,
        description="torch.compile the network on the CPU for the micro-batch shape (pads every "
        "micro-batch), with Inductor's freezing (weights prepacked once); compiled while the worker "
        "starts (minutes), before it reports ready.",
    )
    cpu_channels_last: bool = Field(
        False, description="Store CPU activations channels-last (NHWC); measured slower on the served models."
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="Torch threads per worker process (0: torch's default, one per core). One thread per "
        "worker and one worker per core is the measured best on a CPU.",
    )
    workers: int | None = Field(
        None,
        ge=0,
        description="Workers `robustdiff serve` starts beside the API (--workers wins). Default: with the "
        "private Redis, one per CPU core / TORCH_THREADS on a CPU-only machine, else 1; with REDIS_URL, 0.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens; when set, every route but /healthz, /readyz and "
        "/metrics requires `Authorization: Bearer <key>`.",
    )
    max_images: int = Field(
        64, ge=1, description="Most output images per request (images x draws for /purify)."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body; larger -> 413.")
    max_steps: int = Field(1000, ge=1, description="Largest `steps` a request may ask for.")
    max_queue_depth: int = Field(
        1000, ge=1, description="Jobs waiting per model before new ones are refused with 429 + Retry-After."
    )
    max_batch_images: int = Field(
        256,
        ge=1,
        description="Most images in a worker's running batch of one model; jobs join and leave it at every "
        "step (must be >= MAX_IMAGES).",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="How long an idle worker waits for more jobs to start its running batch with (a busy "
        "one admits new jobs at the next step).",
    )
    scheduler_policy: Literal["auto", "fifo", "srpt"] = Field(
        "auto",
        description="Which running jobs each network evaluation takes: fifo (every running row), srpt (the job "
        "with the least work left, images x steps, and those within SCHEDULER_SRPT_FILL times it; the rest wait "
        "a step, which never changes an image) or auto (srpt on the CPU, where a step costs about its rows; "
        "fifo on a GPU, where a bigger batch is nearly free).",
    )
    scheduler_srpt_fill: float = Field(
        4.0,
        ge=1,
        description="srpt: a job steps with the least-work one while its work left is within this factor.",
    )
    scheduler_max_defer_steps: int = Field(
        8,
        ge=0,
        description="srpt: a job left out of this many evaluations in a row is taken at the next (the "
        "starvation bound; 0 never defers).",
    )
    job_ttl_s: int = Field(3600, ge=1, description="Seconds a job's status and result are kept in Redis.")
    reclaim_idle_ms: int = Field(
        30000,
        ge=100,
        description="A delivered job idle this long (its worker died) is reclaimed by another; a worker whose "
        "heartbeat stopped loses its jobs after 3 heartbeat periods.",
    )
    max_deliveries: int = Field(
        3, ge=1, description="Runs after which a job whose worker died each time is dead-lettered and fails."
    )
    heartbeat_s: float = Field(
        2.0, gt=0, description="Worker heartbeat period; a worker quiet for 3 periods counts as dead."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="How long a synchronous request waits for its job before answering 504."
    )
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] | Literal["auto"] = Field(
        "auto",
        description="Port of the worker's Prometheus /metrics: auto (a free port, logged and listed by "
        "/readyz, so several workers and `robustdiff serve` instances share a host), a number, or 0 "
        "(disabled).",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1",
        description="Address the worker's /metrics listens on; 0.0.0.0 where Prometheus scrapes it from "
        "another host or container (the compose file and Kubernetes manifests set it).",
    )
    log_level: str = Field("INFO", description="Log level: DEBUG | INFO | WARNING | ERROR | CRITICAL.")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest time to receive a request body; a slower (or shorter than announced) body "
        "is answered 408 and the connection closed.",
    )
    cancel_on_disconnect: bool = Field(
        True,
        description="A synchronous request whose client hangs up cancels the job it created (a job found "
        "by its Idempotency-Key is left running). false: the job runs on; poll /jobs/{id}.",
    )
    redis_max_connections: int = Field(
        200,
        ge=2,
        description="Redis connections per API or worker process; a request beyond them waits for a free "
        "one (up to REDIS_POOL_TIMEOUT_S) instead of failing.",
    )
    redis_pool_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a request waits for a free Redis connection before a 503 that says the "
        "service is busy (not that Redis is down).",
    )

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        """Checked here, so a typo fails at start in one line, not in redis-py after loading models."""
        value = value.strip()
        scheme, sep, rest = value.partition("://")
        if value and (not sep or scheme.lower() not in _REDIS_SCHEMES or not rest):
            raise ValueError(f"{value[:80]!r} must be redis://host:port/db, rediss://... or unix://path")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return value.upper()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_batch_images < self.max_images:
            raise ValueError(
                "ROBUSTDIFF_MAX_BATCH_IMAGES must be >= ROBUSTDIFF_MAX_IMAGES (a job is never split)"
            )
        if self.reclaim_idle_ms < 2000 * self.heartbeat_s:
            raise ValueError(
                "ROBUSTDIFF_RECLAIM_IDLE_MS must be >= 2 x ROBUSTDIFF_HEARTBEAT_S, or live workers lose jobs"
            )
        return self

    def model_files(self) -> list[tuple[str, Path]]:
        """ROBUSTDIFF_MODELS as (name or "", path) pairs, every file there: what serve checks before
        it starts anything and what each worker then loads."""
        if not self.models:
            raise UserError(
                "ROBUSTDIFF_MODELS", "no checkpoints to serve (and none committed in models/weights)"
            )
        out = []
        for entry in self.models:
            name, sep, path = entry.partition("=")
            if not sep:
                name, path = "", entry
            problem = _diffusers_folder_problem(Path(path)) if Path(path).is_dir() else None
            if problem:
                raise UserError("ROBUSTDIFF_MODELS", f"{path}: {problem}")
            if not Path(path).exists():
                raise UserError("ROBUSTDIFF_MODELS", f"{path}: no such checkpoint file or diffusers folder")
            out.append((name, Path(path)))
        return out

    def served_paths(self) -> dict[str, Path]:
        """Served model name -> checkpoint file, named as the worker names them (``name=`` or the
        checkpoint's own name), for ``robustdiff sample/purify --model NAME``."""
        out: dict[str, Path] = {}
        for name, path in self.model_files():
            out.setdefault(name or checkpoint_field(path, "name") or path.stem, path)
        return out

    @property
    def liveness_s(self) -> float:
        """A worker whose heartbeat is older than this is counted as dead."""
        return 3 * self.heartbeat_s


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus explicit overrides), turning a bad value into a UserError naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        first = err.errors()[0]
        loc = str(first["loc"][0]) if first["loc"] else "settings"  # later parts: a union member's tag
        field = f"{ENV_PREFIX}{loc.upper()}" if first["loc"] else "settings"
        raise UserError(field, first["msg"]) from None
