"""Shared helpers: tiny-preset configs on scikit-learn's digits, fast enough for CPU CI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from models.train.config import TrainConfig, build


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_config(tmp_path: Path, **fields: Any) -> TrainConfig:
    """A tiny-preset, digits, CPU config; keyword arguments replace fields (dicts as whole sections)."""
    data: dict[str, Any] = {
        "name": "tiny",
        "preset": "tiny",
        "data": {"name": "digits"},
        "batch_size": 8,
        "updates": 4,
        "device": "cpu",
        "out_dir": str(tmp_path / "run"),
        "checkpoint_every": 1000,
        "sample_count": 0,
        "progress": False,
        "optim": {"lr": 1e-3, "warmup_updates": 2},
    }
    data.update(fields)
    return build(data)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., TrainConfig]:
    return lambda **fields: tiny_config(tmp_path, **fields)
