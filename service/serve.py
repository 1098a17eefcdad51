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
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import IO, Literal

import redis
import uvicorn
from uvicorn.lifespan.on import LifespanOn

from models.errors import UserError
from service.redis_server import RedisServer
from service.settings import load_settings
from service.threads import default_workers, set_thread_env

WORKER_ERROR_PREFIX = "robustdiff worker: error: "
LIFESPAN_SHUTDOWN_TIMEOUT_S = 10.0

log = logging.getLogger("robustdiff.serve")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes to start beside the API (default ROBUSTDIFF_WORKERS, else: with the "
        "private Redis one per CPU core / ROBUSTDIFF_TORCH_THREADS on a CPU-only machine and 1 with a "
        "GPU; 0 with ROBUSTDIFF_REDIS_URL set)",
    )


class Supervisor:
    """Keeps N `robustdiff worker` children, and the private Redis if there is one, running until
    stopped; restarts one that dies (Redis first: the workers and the API reconnect by themselves)."""

    def __init__(
        self,
        count: int,
        env: dict[str, str],
        redis_server: RedisServer | None = None,
        metrics_port: int | Literal["auto"] = "auto",
    ) -> None:
        self.count = count
        self.env = env
        self.metrics_port = metrics_port
        self.redis_server = redis_server
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._given_up: set[int] = set()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._readers: dict[int, threading.Thread] = {}
        self.last_error: str | None = None  # the last one-line error a worker printed
        self.all_given_up = threading.Event()  # every worker exited with a configuration error

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        # Own process group: Ctrl-C reaches only serve, which then stops children in order.
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=self._worker_env(index),
            start_new_session=True,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        reader = threading.Thread(target=self._relay, args=(proc.stderr,), name="worker-stderr", daemon=True)
        reader.start()
        self._readers[proc.pid] = reader
        return proc

    def _worker_env(self, index: int) -> dict[str, str]:
        """The i-th worker's environment: its torch threads and OpenMP policy, and its own metrics port
        (a fixed port plus i; "auto" lets each pick a free one), so N workers on one host do not collide."""
        env = dict(self.env)
        set_thread_env(env)
        if isinstance(self.metrics_port, int) and self.metrics_port:
            env["ROBUSTDIFF_WORKER_METRICS_PORT"] = str(self.metrics_port + index)
        return env

    def _relay(self, stream: IO[bytes]) -> None:
        """Pass a worker's stderr through, remembering its one-line error so serve can report it."""
        for raw in stream:
            line = raw.decode(errors="replace")
            if line.startswith(WORKER_ERROR_PREFIX):
                self.last_error = line[len(WORKER_ERROR_PREFIX) :].strip()
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line)
                sys.stderr.flush()
        stream.close()

    def start(self) -> None:
        self.procs = [self._spawn(i) for i in range(self.count)]
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self._keep_redis()
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is not None and not self._stop.is_set() and i not in self._given_up:
                    if code == 2:  # a configuration error: restarting would fail the same way
                        reader = self._readers.pop(proc.pid, None)
                        if reader is not None:
                            reader.join(2.0)  # its error line, read to the end
                        log.error(
                            "worker exited with a configuration error (%s); not restarting it",
                            self.last_error or "see its log",
                        )
                        self._given_up.add(i)
                        if len(self._given_up) == len(self.procs):
                            self.all_given_up.set()
                        continue
                    log.warning("worker %d exited with code %s; restarting it", proc.pid, code)
                    time.sleep(1.0)
                    self.procs[i] = self._spawn(i)

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


class _BoundedLifespan(LifespanOn):
    """uvicorn waits for the app's shutdown without a limit; when it fails to start listening that
    wait once hung for good (and ignored SIGTERM), leaking the worker and the private Redis."""

    async def shutdown(self) -> None:
        try:
            await asyncio.wait_for(super().shutdown(), LIFESPAN_SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.error("the API did not shut down within %.0f s; going on", LIFESPAN_SHUTDOWN_TIMEOUT_S)


class _Server(uvicorn.Server):
    """Also stops when every worker has given up with a configuration error."""

    def __init__(self, config: uvicorn.Config, supervisor: Supervisor) -> None:
        super().__init__(config)
        self.supervisor = supervisor

    async def on_tick(self, counter: int) -> bool:
        if self.supervisor.all_given_up.is_set():
            return True
        return await super().on_tick(counter)


def check_listen(host: str, port: int) -> None:
    """Resolve ``host`` and bind (host, port) as uvicorn will, then close: a bad host or a taken port
    is refused in one line before Redis and workers start, not by uvicorn after."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as err:
        raise UserError(
            "--host", f"{host!r} does not resolve ({getattr(err, 'strerror', None) or err})"
        ) from None
    for family, kind, proto, _, addr in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks; uvicorn (asyncio) skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise UserError("--port", f"{port} is already in use on {host}") from None
                if err.errno == errno.EACCES:
                    raise UserError("--port", f"{port}: permission denied") from None
                raise UserError("--host", f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def warn_if_unreachable(url: str) -> None:
    """One warning line when the external Redis does not answer at start (the API answers 503 until
    it does); before this, serve said nothing at all."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as err:
        log.warning("Redis at %s is unreachable (%s); the API answers 503 until it is", url, err)
    finally:
        client.close()


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every argument and file is checked before Redis or a worker starts, so a refusal leaks nothing.
    if not 0 < args.port < 65536:
        raise UserError("--port", f"{args.port} is not a TCP port")
    workers = args.workers if args.workers is not None else settings.workers
    if workers is None:
        workers = 0 if settings.redis_url else default_workers(settings.device, settings.torch_threads)
    if workers < 0:
        raise UserError("--workers", "must be >= 0")
    check_listen(args.host, args.port)
    if workers:
        settings.model_files()  # a missing checkpoint would leave an API that answers only 503
    redis_server: RedisServer | None = None
    url = settings.redis_url
    if url:
        warn_if_unreachable(url)
    supervisor: Supervisor | None = None
    server: _Server | None = None
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the handler
    # that was in place before it ran. SIGTERM's default handler would end this process at once
    # and leak the worker and the private Redis, so SIGTERM ends up as Ctrl-C does, from here on
    # (also while Redis starts or the API loads, before uvicorn runs).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if not url:
            redis_server = RedisServer(persistent=True)
            url = redis_server.start().url
            log.info("started a private Redis at %s", url)
        supervisor = Supervisor(
            workers, dict(os.environ, ROBUSTDIFF_REDIS_URL=url), redis_server, settings.worker_metrics_port
        )
        from service.api import create_app

        app = create_app(settings.model_copy(update={"redis_url": url}))
        supervisor.start()
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=settings.log_level.lower())
        config.load()
        config.lifespan_class = _BoundedLifespan
        server = _Server(config, supervisor)
        with contextlib.suppress(KeyboardInterrupt, SystemExit):  # SystemExit: uvicorn failed to start
            server.run()
    finally:
        if supervisor is not None:
            supervisor.stop()
        if redis_server is not None:
            redis_server.close()
    if supervisor.all_given_up.is_set():
        raise UserError("worker", supervisor.last_error or "every worker exited with a configuration error")
    if not server.started:
        log.error("the API did not start listening on %s:%s", args.host, args.port)
        return 1
    return 0
