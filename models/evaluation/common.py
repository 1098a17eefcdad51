"""Shared pieces of the eval commands: where and when a number was measured, plots, intervals."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    fallback = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: no /proc
        return fallback
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else fallback


def machine_description(device: str = "cpu") -> str:
    """A one-line description of the hardware and torch, stored next to every number (the one
    every benchmark and eval report uses, so reports compare)."""
    host = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores"
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        host += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)}; host {host}; torch {torch.__version__}"
    return f"{host}, no GPU; torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"


def report_header(command: str, device: str, model_path: str, info: Any) -> dict[str, Any]:
    """What every eval report starts with: the command, when, where, and which model exactly."""
    return {
        "command": command,
        "date": now_utc(),
        "machine": machine_description(device),
        "model": {"path": model_path, "name": info.name, "method": info.method, "hash": info.hash},
    }


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1], sane at 0% and 100%)."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def save_plot(path: Path, draw: Callable[[Any], None]) -> Path:
    """Render one matplotlib axes with the headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
