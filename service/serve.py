"""`robustdiff serve`: the API, and by default a private Redis and one worker beside it.

With ROBUSTDIFF_REDIS_URL empty this is the one-command local setup: it starts a private Redis
server (with an append-only file, restarted on the same port with its jobs if it dies) and a worker
child (restarted if it dies), serves the API in this process, and on Ctrl-C or SIGTERM stops the API
first, then the worker (which finishes its batch), then Redis. With a Redis
URL set it runs only the API unless --workers asks for local workers: that is the scale-out shape,
where workers run as their own processes or machines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

import uvicorn

from models.errors import UserError
from service.redis_server import RedisServer
from service.settings import load_settings

log = logging.getLogger("robustdiff.serve")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes to start beside the API (default: 1 with the private Redis, 0 with "
        "ROBUSTDIFF_REDIS_URL set)",
    )


class Supervisor:
    """Keeps N `robustdiff worker` children, and the private Redis if there is one, running until
    stopped; restarts one that dies (Redis first: the workers and the API reconnect by themselves)."""

    def __init__(self, count: int, env: dict[str, str], redis_server: RedisServer | None = None) -> None:
        self.count = count
        self.env = env
        self.redis_server = redis_server
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._given_up: set[int] = set()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Own process group: Ctrl-C reaches only serve, which then stops children in order.
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"], env=self.env, start_new_session=True
        )

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self._keep_redis()
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is not None and not self._stop.is_set() and i not in self._given_up:
                    if code == 2:  # a configuration error: restarting would fail the same way
                        log.error("worker exited with a configuration error; not restarting it")
                        self._given_up.add(i)
                        continue
                    log.warning("worker %d exited with code %s; restarting it", proc.pid, code)
                    time.sleep(1.0)
                    self.procs[i] = self._spawn()

    def _keep_redis(self) -> None:
        code = self.redis_server.exit_code if self.redis_server is not None else None
        if code is None or self.redis_server is None or self._stop.is_set():
            return
        log.warning("the private Redis exited with code %s; restarting it with its jobs", code)
        try:
            self.redis_server.start()
        except RuntimeError as err:  # e.g. the port was taken meanwhile: try again next round
            log.error("could not restart the private Redis: %s", err)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.port < 65536:
        raise UserError("--port", f"{args.port} is not a TCP port")
    redis_server: RedisServer | None = None
    url = settings.redis_url
    if not url:
        redis_server = RedisServer(persistent=True).start()
        url = redis_server.url
        log.info("started a private Redis at %s", url)
    workers = args.workers if args.workers is not None else (0 if settings.redis_url else 1)
    if workers < 0:
        raise UserError("--workers", "must be >= 0")
    supervisor = Supervisor(workers, dict(os.environ, ROBUSTDIFF_REDIS_URL=url), redis_server)
    try:
        from service.api import create_app

        app = create_app(settings.model_copy(update={"redis_url": url}))
        supervisor.start()
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=settings.log_level.lower())
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the handler
        # that was in place before it ran. SIGTERM's default handler would end this process at once
        # and leak the worker and the private Redis, so SIGTERM ends up as Ctrl-C does, here.
        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run()
    finally:
        supervisor.stop()
        if redis_server is not None:
            redis_server.close()
    return 0
