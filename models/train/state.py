"""Training checkpoints: tensors in safetensors, scalars and RNG states in JSON. Never pickled.

A checkpoint is the pair ``step-<updates>.safetensors`` + ``step-<updates>.json`` under
``<out_dir>/checkpoints``; ``<out_dir>/latest.json`` names the newest. Together they hold everything a
resumed run needs to continue the same trajectory bit for bit: model, EMA, optimizer moments and
step counts, the update counter (which also drives the LR schedule), the data order position and
every RNG state (each DDP rank's).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.errors import UserError


@dataclass
class LoopState:
    """The loop's scalars; RNG states are per rank, as lists of bytes."""

    updates: int = 0
    epoch: int = 0
    position: int = 0  # minibatches of this epoch already used
    images: int = 0
    wall_s: float = 0.0
    recent_losses: list[float] = field(default_factory=list)
    rng: list[dict[str, Any]] = field(default_factory=list)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer's state dict into named tensors and JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of ``optimizer_tensors``; ``tensors`` are named ``<index>.<key>`` (the ``optim`` section)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": groups}


def save(
    out_dir: str | Path,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    state: LoopState,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    method: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one checkpoint (atomically: tensors, then JSON, then the ``latest`` pointer)."""
    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"step-{state.updates:08d}"
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in (method or {}).items()})
    opt_tensors, groups = optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tmp = stem.with_suffix(".safetensors.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, stem.with_suffix(".safetensors"))
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    meta = {"config": config, "state": asdict(state), "optimizer_param_groups": groups, **(extra or {})}
    _write_json(stem.with_suffix(".json"), meta)
    _write_json(Path(out_dir) / "latest.json", {"checkpoint": str(stem.with_suffix(".json").resolve())})
    return stem.with_suffix(".json")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _pointer(folder: Path, field: str) -> Path:
    """The checkpoint ``<folder>/latest.json`` names; a malformed pointer is an error naming the file."""
    pointer = folder / "latest.json"
    if not pointer.is_file():
        raise UserError(field, f"{folder} holds no training checkpoint (no latest.json)")
    try:
        data = json.loads(pointer.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(field, f"{pointer} is not readable JSON ({err})") from None
    name = data.get("checkpoint") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name.endswith(".json"):
        raise UserError(field, f'{pointer} is malformed: expected {{"checkpoint": "<path>/step-N.json"}}')
    target = Path(name)
    moved = folder / "checkpoints" / target.name  # the run folder was moved or copied since
    return moved if not target.is_file() and moved.is_file() else target


def resolve(path: str | Path, field: str = "resume") -> Path:
    """A run folder (its latest checkpoint), a checkpoint's .json or its .safetensors -> the .json."""
    given = Path(path)
    if not given.exists():
        raise UserError(field, f"no run folder or training checkpoint at {given}")
    path = _pointer(given, field) if given.is_dir() else given
    if path.suffix not in (".json", ".safetensors"):
        raise UserError(
            field, f"{given} is not a run folder or a training checkpoint (checkpoints/step-*.json)"
        )
    meta, tensors = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not meta.is_file():
        raise UserError(
            field,
            f"{given} is not a run folder or a training checkpoint (no {meta.name} beside it; "
            "a served model cannot be resumed or exported)"
            if path == given
            else f"{given} names {meta}, which does not exist",
        )
    if not tensors.is_file():
        raise UserError(field, f"{tensors} is missing (the tensors of the training checkpoint {meta})")
    return meta


def load(path: str | Path, field: str = "resume") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON meta, all tensors) of a training checkpoint; anything unreadable is an error naming ``field``."""
    path = resolve(path, field)
    try:
        meta = json.loads(path.read_text())
        with safe_open(str(path.with_suffix(".safetensors")), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except Exception as err:  # OSError, JSON and safetensors' own error types
        raise UserError(field, f"{path}: unreadable training checkpoint ({err})") from err
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict) for k in ("config", "state")):
        raise UserError(field, f"{path} is not a training checkpoint (no config and state objects)")
    try:
        LoopState(**meta["state"])
    except TypeError as err:
        raise UserError(field, f"{path}: malformed state ({err})") from err
    return meta, tensors


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """This process's RNG states as plain lists (JSON)."""
    out: dict[str, Any] = {
        "generator": generator.get_state().tolist(),
        "torch": torch.get_rng_state().tolist(),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return out


def set_rng_state(generator: torch.Generator, device: torch.device, saved: dict[str, Any]) -> None:
    generator.set_state(torch.tensor(saved["generator"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(torch.tensor(saved["cuda"], dtype=torch.uint8), device)
