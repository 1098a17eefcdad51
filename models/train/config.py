"""Training configuration: one pydantic model, read from TOML or YAML plus ``key=value`` overrides.

Everything is validated before any data is read or any network is built, and every error is a
``UserError`` naming the offending field (``method``, ``options.eta``, ``data.path``, ...).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.data import FASHION_MNIST_DIR
from models.errors import UserError
from models.schedules import ScheduleConfig
from models.train.methods import METHODS
from models.unet import PRESETS, UNetConfig, preset

DATASETS_WITH_PATH = ("mnist", "idx", "cifar10", "folder")
DATASETS = ("fashion-mnist", "digits", *DATASETS_WITH_PATH)
# Fields a resumed run may change; everything else must match the checkpoint it continues.
RESUMABLE = {
    "updates",
    "max_minutes",
    "checkpoint_every",
    "log_every",
    "export_path",
    "export_dtype",
    "sample_count",
    "sample_steps",
    "progress",
    "num_threads",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorruptionConfig(_Strict):
    """A corruption of the training set (models.data), applied once, with its own seed."""

    kind: Literal["gaussian", "outliers", "salt-and-pepper"]
    fraction: float = Field(ge=0.0, le=1.0, description="share of training images corrupted")
    sigma: float = Field(0.1, ge=0.0, description="gaussian: noise std on the [0, 1] scale")
    amount: float = Field(0.05, ge=0.0, le=1.0, description="salt-and-pepper: share of pixels hit")
    clamp: bool = Field(
        True,
        description="gaussian: clamp to [-1, 1] (biased on dark backgrounds); false keeps the noise zero-mean",
    )
    seed: int = Field(0, ge=0)


class DataConfig(_Strict):
    name: str = "fashion-mnist"
    path: str | None = Field(
        None, description="folder of the data set (fashion-mnist defaults to the Debian package)"
    )
    split: Literal["train", "test"] = "train"
    limit: int | None = Field(None, ge=1, description="use only the first N images")
    downsample: int = Field(
        1, ge=1, description="read at image_size * downsample, then average-pool (fashion-mnist 16x16: 2)"
    )
    corruption: CorruptionConfig | None = None

    @model_validator(mode="after")
    def _path(self) -> DataConfig:
        if self.name not in DATASETS:
            raise ValueError(f"name: unknown data set {self.name!r}; known: {', '.join(DATASETS)}")
        if self.name in DATASETS_WITH_PATH and not self.path:
            raise ValueError(f"path: data set {self.name!r} needs a path")
        folder = (
            Path(self.path) if self.path else (FASHION_MNIST_DIR if self.name == "fashion-mnist" else None)
        )
        if folder is not None and not folder.exists():
            raise ValueError(f"path: {folder} does not exist")
        return self


class OptimConfig(_Strict):
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    warmup_updates: int = Field(100, ge=0, description="linear LR warm-up from 0 over this many updates")
    grad_clip: float | None = Field(1.0, gt=0.0, description="global grad-norm clip; null disables")


class TrainConfig(_Strict):
    """A whole training run. ``options`` are the method's own (see models.train.methods)."""

    name: str = Field("model", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="checkpoint name")
    preset: str = "fmnist-cpu"
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the preset's fields")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    method: str = "standard"
    options: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch_size: int = Field(64, ge=1, description="global batch size (split over DDP ranks)")
    updates: int = Field(1000, ge=1, description="budget of parameter updates (not minibatches)")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(
        True, description="EMA decay min(decay, (1+u)/(10+u)) so short runs forget the init"
    )
    seed: int = Field(0, ge=0)
    device: str = "auto"
    autocast: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="network precision: bf16 autocast (auto: on CUDA only) or fp32 (no autocast)"
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads")
    out_dir: str = "runs/model"
    checkpoint_every: int = Field(
        500, ge=1, description="training checkpoint (+ sample grid) every N updates"
    )
    log_every: int = Field(10, ge=1)
    sample_count: int = Field(16, ge=0, description="images in the grid written at each checkpoint")
    sample_steps: int = Field(20, ge=1, description="DDIM steps for that grid")
    export_path: str | None = Field(None, description="served safetensors file written at the end")
    export_dtype: Literal["float32", "float16"] = "float16"
    max_minutes: float | None = Field(
        None, gt=0.0, description="stop (checkpoint + export) after this wall time"
    )
    progress: bool = True

    @model_validator(mode="after")
    def _method(self) -> TrainConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; known: {', '.join(METHODS)}")
        try:
            opts = METHODS[self.method].Options.model_validate(self.options)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"options.{loc}: {first['msg']}") from err
        self.options = opts.model_dump(by_alias=True)
        try:
            self.model_config_()
        except (ValidationError, KeyError) as err:
            raise ValueError(f"model: {err}") from err
        return self

    def model_config_(self) -> UNetConfig:
        """The network's architecture: the preset with ``model`` overrides."""
        return preset(self.preset, **self.model)


def _error(err: ValidationError) -> UserError:
    """The first validation error as a UserError whose field is the full dotted path."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = str(first["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # Validators report "field: reason" for fields they check across the model; fold it into the path.
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head:
        loc.append(head)
        msg = rest
    return UserError(".".join(loc) or "config", msg)


def _parse_error(err: Exception) -> str:
    """A parser's error as one line: PyYAML's spans several (with a source excerpt), tomllib's is one."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem or err.context or 'syntax error'} (at line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict: .toml through tomllib, .yaml/.yml/.json through PyYAML."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config", f"no config file at {path}")
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        text = path.read_text()
        data = tomllib.loads(text) if kind == "TOML" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise UserError("config", f"{path} is not a text file (expected {kind})") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise UserError("config", f"{path} is not valid {kind}: {_parse_error(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("config", f"{path} must hold a mapping of fields")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> str:
    """Apply ``a.b.c=value`` (value parsed as YAML: numbers, booleans, null, lists) in place; returns the key."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError("--set", f"expected key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise UserError(key, f"{p} is not a section")
        node = child
    node[parts[-1]] = value
    return key


def build(data: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise _error(err) from err


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """File (optional) + overrides -> validated config; raises UserError naming the field."""
    data = read_file(path) if path else {}
    for o in overrides:
        apply_override(data, o)
    return build(data)
