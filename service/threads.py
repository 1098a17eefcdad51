"""How many threads a worker's torch runs, set before torch is imported (OpenMP reads it once).

On a CPU one torch thread per worker process and one worker per core is the measured best
(docs/BENCHMARKS.md, "CPU engine"): the network's small convolutions scale poorly over threads,
and with OpenMP's default active waiting an idle thread spins on a core that another process (the
API, Redis, another worker) needs, which made the served path 4-17x slower on a shared 2-core
machine. Passive waiting is the default for the same reason.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

THREADS_ENV = "ROBUSTDIFF_TORCH_THREADS"


def torch_threads(environ: MutableMapping[str, str] = os.environ) -> int:
    """ROBUSTDIFF_TORCH_THREADS as an int (1 if unset; a bad value is left to the settings' check)."""
    try:
        return max(0, int(environ.get(THREADS_ENV, "1").strip() or "1"))
    except ValueError:
        return 1


def set_thread_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put the torch thread count and passive OpenMP waiting into ``environ`` (the process's own, or
    a child's) unless the user set OMP_WAIT_POLICY; 0 threads leaves torch's default alone."""
    threads = torch_threads(environ)
    if threads:
        environ["OMP_NUM_THREADS"] = environ["MKL_NUM_THREADS"] = str(threads)
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def has_gpu() -> bool:
    """Whether an NVIDIA driver sees a GPU, without importing torch (serve's process never does)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def default_workers(device: str, threads: int) -> int:
    """Workers for `robustdiff serve`: on a CPU-only setup one per ``threads`` cores, else one."""
    cpu = device == "cpu" or (device == "auto" and not has_gpu())
    return max(1, (os.cpu_count() or 1) // max(1, threads)) if cpu else 1
