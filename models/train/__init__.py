"""Offline training of the served diffusion models: config, methods registry, loop, export."""

from __future__ import annotations

from models.train.config import TrainConfig, load_config
from models.train.methods import METHODS, Method, MethodOptions, register
from models.train.trainer import Trainer, TrainResult, train

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_config",
    "register",
    "train",
]
