"""Helper of the service benchmarks (load, faults, fuzzing): a private Redis, the API and workers as
separate processes on loopback, a tiny checkpoint, and RSS sampling. Not a benchmark itself."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.redis_server import RedisServer, free_port  # noqa: E402

BASE_ENV = {
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ROBUSTDIFF_DEVICE": "cpu",
    "ROBUSTDIFF_MAX_IMAGES": "8",
    "ROBUSTDIFF_MAX_BATCH_IMAGES": "64",
    "ROBUSTDIFF_HEARTBEAT_S": "0.5",
    "ROBUSTDIFF_RECLAIM_IDLE_MS": "1500",
    "ROBUSTDIFF_LOG_LEVEL": "WARNING",
}


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "torch_threads_per_process": 1,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def tiny_model(folder: Path) -> Path:
    from models.testing import tiny_checkpoint

    return tiny_checkpoint(folder / "tiny.safetensors", name="tiny")


class Stack:
    """Redis, API (``robustdiff serve --workers 0``) and N workers, each its own process."""

    def __init__(self, model: Path, logs: Path, persistent: bool = True, **env: str) -> None:
        self.model = model
        self.logs = logs
        self.redis = RedisServer(persistent=persistent).start()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")},
            **BASE_ENV,
            "ROBUSTDIFF_REDIS_URL": self.redis.url,
            "ROBUSTDIFF_MODELS": str(model),
            "ROBUSTDIFF_DEFAULT_MODEL": "tiny",
            "ROBUSTDIFF_WORKER_METRICS_PORT": "0",
            **env,
        }
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], name: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}-{time.monotonic_ns()}.log").open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def start_api(self, **env: str) -> None:
        self.port = free_port()
        self.api = self._spawn(["serve", "--workers", "0", "--port", str(self.port)], "api", **env)
        self.wait(lambda: httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200, 60)

    def stop_api(self) -> None:
        if self.api is not None:
            self.api.send_signal(signal.SIGTERM)
            self.api.wait(30)
            self.api = None

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        proc = self._spawn(["worker"], "worker", **env)
        self.workers.append(proc)
        return proc

    def wait_ready(self, timeout: float = 120) -> None:
        wait_until_ready(self.base, timeout)

    @staticmethod
    def wait(predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"condition not met within {timeout} s")

    def pids(self) -> dict[str, int]:
        out = {}
        if self.api is not None:
            out["api"] = self.api.pid
        live = [w for w in self.workers if w.poll() is None]
        if live:
            out["worker"] = live[-1].pid
        if self.redis._proc is not None:
            out["redis"] = self.redis._proc.pid
        return out

    def close(self) -> None:
        self.stop_api()
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGKILL)
                w.wait()
        self.redis.close()


def wait_until_ready(
    base: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    """Poll ``base``/readyz until it answers 200; a ``proc`` that exits meanwhile ends the wait with the
    tail of its ``log``, and one still not ready at ``timeout`` is killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise SystemExit(f"serve exited before it was ready:\n{tail}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    if proc is not None:
        proc.kill()
    raise SystemExit(f"{base} not ready within {timeout} s")


class RssSampler:
    """Peak resident memory (MB) of named processes, sampled every 0.2 s in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = round(proc.memory_info().rss / 2**20, 1)
            except psutil.Error:
                out[name] = float("nan")
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, value in self.now().items():
                if value == value:
                    self.peak[name] = max(self.peak[name], value)

    def __enter__(self) -> RssSampler:
        self.before = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
