"""Which torch device a command runs on: checked up front, so a typo or a missing GPU is one line.

Every ``--device`` option and the trainer's ``device`` setting go through ``resolve_device``; a
device this machine lacks is a ``UserError`` before any checkpoint is read or any work starts.
"""

from __future__ import annotations

import argparse
import re

import torch

from models.errors import UserError

_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(device: str) -> torch.device:
    """'auto' (cuda if present), 'cpu', 'cuda' or 'cuda:N' -> a device that exists here."""
    if not _DEVICE_RE.fullmatch(device):
        raise UserError("device", f"{device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device", f"{device} requested but CUDA is not available here (use cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError("device", f"{device} requested but this machine has {count} CUDA device(s)")
    return dev


def device_option(text: str) -> str:
    """argparse ``type=`` for ``--device``: the resolved device's name, or a usage error (exit 2)."""
    try:
        return str(resolve_device(text))
    except UserError as err:
        raise argparse.ArgumentTypeError(err.reason) from err
