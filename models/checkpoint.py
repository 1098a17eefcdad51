"""The one checkpoint format: a safetensors file of EMA weights with its JSON config in the header.

The header key ``robustdiff`` holds the model config, schedule, kind, training method and options,
data set, image shape, class names, update count and a content hash of the tensors. The loader
validates all of it and refuses a bad file with a message that says what is wrong. Nothing is
ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.errors import CheckpointError
from models.schedules import ScheduleConfig
from models.unet import UNet, UNetConfig

FORMAT_VERSION = 1
HEADER_KEY = "robustdiff"
H = TypeVar("H", bound=BaseModel)


class ConsistencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    sigma_data: float = Field(0.5, gt=0.0)
    parameterization: Literal["edm", "eps"] = "edm"
    teacher_hash: str | None = None
    c_in: bool = Field(
        False, description="the network sees EDM's c_in(sigma) x_ve (OpenAI's CMs; needs the edm schedule)"
    )
    renoise_subtract_sigma_min: bool = Field(
        False, description="multistep re-noising to sqrt(sigma^2 - sigma_min^2) (Song et al.'s Algorithm 1)"
    )


class TrainingInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "standard"
    options: dict[str, Any] = Field(default_factory=dict)
    updates: int = Field(0, ge=0)
    dataset: str = "unknown"
    corruption: dict[str, Any] | None = None
    command: str | None = None
    hardware: str | None = None
    wall_time_s: float | None = None
    final_loss: float | None = None

    @property
    def seed(self) -> int | None:
        """The training seed, which the trainer's export records among the options; None where none
        was (an imported or randomly initialised model)."""
        seed = self.options.get("seed")
        return seed if type(seed) is int else None


class CheckpointHeader(BaseModel):
    """Everything a server needs to know about a checkpoint, without reading its tensors."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["diffusion", "consistency"] = "diffusion"
    model: UNetConfig
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    consistency: ConsistencyConfig | None = None
    prediction: Literal["epsilon", "v_prediction", "sample"] = Field(
        "epsilon", description="what a diffusion model's output is (diffusers' prediction_type names)"
    )
    training: TrainingInfo = Field(default_factory=TrainingInfo)
    class_names: list[str] = Field(default_factory=list)
    content_hash: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.model.in_channels, self.model.image_size, self.model.image_size)


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    path: str | Path, net: nn.Module, header: CheckpointHeader, dtype: torch.dtype = torch.float32
) -> CheckpointHeader:
    """Write ``net``'s weights (cast to ``dtype``) and the header; returns the header with its hash."""
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in net.state_dict().items()
    }
    header = header.model_copy(
        update={"content_hash": content_hash(tensors), "format_version": FORMAT_VERSION}
    )
    write_safetensors(path, tensors, header)
    return header


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], header: BaseModel) -> None:
    """Atomically write tensors with ``header`` as JSON under the header key (every robustdiff file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: header.model_dump_json()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed: no stray .tmp beside the target


def read_header_json(path: str | Path, field: str, what: str = "checkpoint") -> dict[str, Any]:
    """The raw JSON header of a robustdiff safetensors file; errors name ``field``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(field, f"no {what} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(field, f"{path} is not a readable safetensors file ({err})") from err
    if HEADER_KEY not in meta:
        raise CheckpointError(field, f"{path} has no '{HEADER_KEY}' header: not a robustdiff {what}")
    try:
        raw = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(field, f"{path}: header is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(field, f"{path}: header is not a JSON object")
    return raw


def validate_header(cls: type[H], raw: dict[str, Any], prefix: str) -> H:
    """``cls.model_validate(raw)`` with the first error as a CheckpointError naming its field."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "header"
        raise CheckpointError(f"{prefix}.{field}", first["msg"]) from err


def read_tensors(path: str | Path, field: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except Exception as err:
        raise CheckpointError(field, f"{path}: tensor data is unreadable or truncated ({err})") from err


def read_header(path: str | Path) -> CheckpointHeader:
    """Parse and validate the header only (cheap: no tensor is read)."""
    raw = read_header_json(path, "header")
    if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(
            "format_version", f"{path} was written by a newer robustdiff (format {raw['format_version']})"
        )
    if raw.get("kind") == "classifier":  # the same file format, told apart by its header kind
        raise CheckpointError(
            "header.kind", f"{path} is a classifier checkpoint, not a diffusion or consistency model"
        )
    header = validate_header(CheckpointHeader, raw, "header")
    if header.kind == "consistency" and header.consistency is None:
        raise CheckpointError("header.consistency", "a consistency checkpoint needs its consistency settings")
    if header.consistency is not None and header.consistency.c_in and header.schedule.name != "edm":
        raise CheckpointError(
            "header.consistency.c_in", "c_in needs the edm schedule (time input 250 ln sigma)"
        )
    return header


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", verify_hash: bool = True
) -> tuple[UNet, CheckpointHeader]:
    """Build the network from the header and load the weights (as float32), validating both."""
    header = read_header(path)
    net = UNet(header.model)
    expected = net.state_dict()
    tensors = read_tensors(path, "file")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "tensors", f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(
                "tensors", f"{path}: {k} has shape {tuple(tensors[k].shape)}, config says {tuple(v.shape)}"
            )
    if verify_hash and header.content_hash and content_hash(tensors) != header.content_hash:
        raise CheckpointError(
            "content_hash", f"{path}: tensors do not match the header's content hash (file corrupted?)"
        )
    net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()})
    return net.to(device).eval(), header
