"""Service test harness: a real redis-server on a free port, real worker processes, the real API.

The whole test run shares one Redis and one worker (serving a tiny diffusion, a tiny class-conditional and a
tiny consistency model); fault tests start their own Redis and workers so that killing or stopping
them cannot disturb other tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from models.testing import tiny_checkpoint
from service.api import create_app
from service.queue import HEARTBEATS_KEY
from service.redis_server import RedisServer, free_port
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# API limits used by the tests: small enough that fuzzed valid requests stay cheap.
API_LIMITS: dict[str, Any] = {
    "max_images": 8,
    "max_steps": 20,
    "max_body_bytes": 256 * 1024,
    "request_timeout_s": 30.0,
}
WORKER_ENV = {
    "ROBUSTDIFF_MAX_IMAGES": "8",
    "ROBUSTDIFF_MAX_BATCH_IMAGES": "32",
    "ROBUSTDIFF_MAX_WAIT_MS": "150",
    "ROBUSTDIFF_HEARTBEAT_S": "0.5",
    "ROBUSTDIFF_RECLAIM_IDLE_MS": "1500",
    "ROBUSTDIFF_WORKER_METRICS_PORT": "0",
    "ROBUSTDIFF_DEVICE": "cpu",
    "OMP_NUM_THREADS": "1",
}


class WorkerProc:
    """A `robustdiff worker` child process; ``start`` returns once its heartbeat is in Redis."""

    def __init__(self, redis_url: str, models: list[Path], log_dir: Path, **env: str) -> None:
        self.redis_url = redis_url
        base = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
        self.env = {
            **base, **WORKER_ENV, "PYTHONPATH": str(ROOT), "ROBUSTDIFF_REDIS_URL": redis_url,
            "ROBUSTDIFF_MODELS": ",".join(str(p) for p in models), **env,
        }  # fmt: skip
        self.log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 90.0) -> WorkerProc:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        if wait:
            self.wait_registered(timeout)
        return self

    def wait_registered(self, timeout: float = 90.0) -> None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
                beats = client.hgetall(HEARTBEATS_KEY)
                if any(json.loads(b).get("pid") == self.pid for b in beats.values()):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError(f"worker did not register within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)


def api_settings(redis_url: str, **overrides: Any) -> Settings:
    return Settings(redis_url=redis_url, models=[], **{**API_LIMITS, **overrides})


@contextmanager
def api_client(redis_url: str, **overrides: Any) -> Iterator[TestClient]:
    """The API app in this process (lifespan included), talking to ``redis_url``."""
    with TestClient(create_app(api_settings(redis_url, **overrides))) as client:
        yield client


@contextmanager
def serve_api(redis_url: str, **overrides: Any) -> Iterator[str]:
    """The API on a loopback port, served by uvicorn in a thread, for clients that need a real socket;
    yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(api_settings(redis_url, **overrides)), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("checkpoints")
    return {
        "tiny": tiny_checkpoint(d / "tiny.safetensors", name="tiny"),
        "tiny-cond": tiny_checkpoint(d / "tiny-cond.safetensors", name="tiny-cond", seed=1, num_classes=3),
        "tiny-cm": tiny_checkpoint(d / "tiny-cm.safetensors", kind="consistency", name="tiny-cm", seed=2),
    }


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that kill, stop or fill things."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def worker(redis_server: RedisServer, checkpoints: dict[str, Path], logs: Path) -> Iterator[WorkerProc]:
    proc = WorkerProc(redis_server.url, list(checkpoints.values()), logs).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(redis_server: RedisServer, worker: WorkerProc) -> Iterator[TestClient]:
    with api_client(redis_server.url, default_model="tiny") as c:
        yield c


@pytest.fixture
def spawn_worker(checkpoints: dict[str, Path], logs: Path) -> Iterator[Callable[..., WorkerProc]]:
    """Factory for extra workers (all checkpoints unless told); none outlives the test."""
    started: list[WorkerProc] = []

    def spawn(
        redis_url: str, *, wait: bool = True, models: list[Path] | None = None, **env: str
    ) -> WorkerProc:
        proc = WorkerProc(redis_url, models or list(checkpoints.values()), logs, **env)
        started.append(proc)
        return proc.start(wait=wait)

    yield spawn
    for proc in started:
        proc.kill()


@pytest.fixture
def make_client() -> Callable[..., AbstractContextManager[TestClient]]:
    return api_client


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    return wait_for


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll a condition in a test (test-side only; the service itself never polls like this)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
