"""`robustdiff worker`: executes queued jobs, batching compatible ones, one process per device.

The event loop owns all Redis traffic (reading, heartbeats, progress, results); the network runs
in a thread so heartbeats and cancellation checks continue during long batches. Jobs with the same
model, kind, sampler, steps, times, eta and t* share a batch (a job reclaimed from a dead worker runs alone);
each image keeps its own seed, so batching never changes an image.

Fault-injection hooks, for the test suite only (never set them in production):
``ROBUSTDIFF_FAULT_CRASH_SEED=<int>`` hard-exits the process when a batch holds that seed (a job that
always kills its worker), ``ROBUSTDIFF_FAULT_STEP_DELAY_S=<float>`` sleeps after every sampler step
(so a test can kill a worker while it holds jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
import time
from typing import Any

import numpy as np
import torch
from prometheus_client import start_http_server

from models.errors import UserError
from models.pipeline import Cancelled, CpuOptions, Pipeline
from service import images as imgs
from service import metrics as m
from service.queue import REDIS_ERRORS, Delivery, JobQueue, connect
from service.settings import Settings, load_settings

FAULT_CRASH_SEED_ENV = "ROBUSTDIFF_FAULT_CRASH_SEED"
FAULT_STEP_DELAY_ENV = "ROBUSTDIFF_FAULT_STEP_DELAY_S"
CRASH_EXIT_CODE = 70

log = logging.getLogger("robustdiff.worker")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--device", help="override ROBUSTDIFF_DEVICE (e.g. cuda:1 for a second GPU's worker)")


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {"device": args.device} if args.device else {}
    settings = load_settings(**overrides)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        raise UserError(
            "ROBUSTDIFF_REDIS_URL", "required by the worker (`robustdiff serve` sets it for its own)"
        )
    fault_hooks()  # before loading models: a typo must not cost their load time
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    pipelines = load_pipelines(settings)
    if settings.worker_metrics_port:
        try:
            start_http_server(settings.worker_metrics_port, registry=m.WORKER_REGISTRY)
        except OSError as err:
            raise UserError(
                "ROBUSTDIFF_WORKER_METRICS_PORT", f"{settings.worker_metrics_port}: {err}"
            ) from None
    return asyncio.run(Worker(settings, pipelines).run())


def fault_hooks() -> tuple[int | None, float]:
    """The fault-injection variables (crash seed, step delay), a bad value refused as a UserError."""
    crash = os.environ.get(FAULT_CRASH_SEED_ENV, "").strip()
    delay = os.environ.get(FAULT_STEP_DELAY_ENV, "").strip()
    try:
        crash_seed = int(crash) if crash else None
    except ValueError:
        raise UserError(FAULT_CRASH_SEED_ENV, f"{crash[:80]!r} is not an integer") from None
    try:
        step_delay = float(delay) if delay else 0.0
    except ValueError:
        raise UserError(FAULT_STEP_DELAY_ENV, f"{delay[:80]!r} is not a number of seconds") from None
    if not (math.isfinite(step_delay) and step_delay >= 0):
        raise UserError(FAULT_STEP_DELAY_ENV, f"{delay[:80]!r} must be a finite number >= 0")
    return crash_seed, step_delay


def load_pipelines(settings: Settings) -> dict[str, Pipeline]:
    """Load every checkpoint once; entries are ``path`` or ``name=path``."""
    out: dict[str, Pipeline] = {}
    for name, path in settings.model_files():
        try:
            pipe = Pipeline.from_checkpoint(
                path,
                device=settings.device,
                name=name or None,
                gpu_dtype=settings.gpu_dtype,
                cpu=CpuOptions(
                    micro_batch=settings.cpu_micro_batch,
                    pad=settings.cpu_pad_micro_batch,
                    dtype=settings.cpu_dtype,
                    compile=settings.cpu_compile,
                    channels_last=settings.cpu_channels_last,
                ),
            )
        except ValueError as err:  # UserError/CheckpointError and device errors
            raise UserError("ROBUSTDIFF_MODELS", f"{path}: {err}") from None
        model = pipe.info.name
        if not model or not all(c.isalnum() or c in "._-" for c in model):
            raise UserError(
                "ROBUSTDIFF_MODELS", f"{path}: model name {model!r} must be letters, digits, . _ -"
            )
        if model in out:
            raise UserError("ROBUSTDIFF_MODELS", f"two checkpoints named {model!r}; use name=path for one")
        # Before the first heartbeat, so no request ever pays a CUDA-graph capture, a CPU compile or a
        # cold start, and /readyz stays 503 until then.
        started = time.perf_counter()
        warmed = pipe.warmup(settings.max_batch_images)
        out[model] = pipe
        log.info(
            "loaded %s (%s, %s) from %s on %s, warmed batch sizes %s in %.1f s",
            model,
            pipe.info.kind,
            pipe.info.hash[:12],
            path,
            pipe.device,
            warmed,
            time.perf_counter() - started,
        )
    return out


def info_dict(pipe: Pipeline) -> dict[str, Any]:
    info = dataclasses.asdict(pipe.info)
    info["image_shape"] = list(info["image_shape"])
    return info


def batch_key(d: Delivery) -> tuple[Any, ...]:
    """Jobs with equal keys may share a batch. A reclaimed job (its worker died while holding it)
    gets a key of its own: if it is what killed the worker, it must not take healthy jobs down with it
    again, so only it reaches the dead-letter stream."""
    r = d.request
    alone = d.entry_id if d.reclaimed else None
    times = tuple(r["times"]) if r.get("times") is not None else None
    return (d.model, d.kind, r["sampler"], r["steps"], times, r["eta"], r.get("t_star"), alone)


def n_outputs(d: Delivery) -> int:
    return len(d.request["seeds"])


class Worker:
    """One consumer in the ``workers`` group, serving every loaded model."""

    def __init__(self, settings: Settings, pipelines: dict[str, Pipeline]) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.models = sorted(pipelines)
        self.infos = {name: info_dict(p) for name, p in pipelines.items()}
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.redis = connect(settings.redis_url)
        self.queue = JobQueue(self.redis, job_ttl_s=settings.job_ttl_s)
        self.cap = settings.max_batch_images
        self.backlog: list[Delivery] = []
        self.current: list[Delivery] = []
        self.cancelled: set[str] = set()
        self.stopping = False
        self.abort = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress = (0, 0)
        self._progress_event = asyncio.Event()
        self._crash_seed, self._step_delay = fault_hooks()
        devices = {p.device for p in pipelines.values()}
        self._cuda = next((d for d in devices if d.type == "cuda"), None)
        self.meta = {"pid": os.getpid(), "host": socket.gethostname(), "device": ",".join(map(str, devices))}

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        if not (
            await self._until_redis(lambda: self.queue.ensure_groups(self.models))
            and await self._until_redis(lambda: self.queue.register(self.id, self.infos, self.meta))
        ):
            log.info("worker %s stopped before Redis at %s was reachable", self.id, self.settings.redis_url)
            await self.redis.aclose()
            return 0
        log.info("worker %s serving %s", self.id, ", ".join(self.models))
        tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._progress_loop())]
        try:
            while not self.stopping:
                try:
                    batch = await self._next_batch()
                    if batch and self.stopping:
                        self.backlog = batch + self.backlog
                    elif batch:
                        await self._run_batch(batch)
                except REDIS_ERRORS as err:
                    log.warning("redis unavailable (%s); retrying", err)
                    await asyncio.sleep(1.0)
                except Exception:  # a bug must not kill the worker: its jobs get reclaimed after idling
                    log.exception("unexpected error in the worker loop")
                    await asyncio.sleep(1.0)
        finally:
            for task in tasks:
                task.cancel()
            await self._hand_back()
        log.info("worker %s stopped", self.id)
        return 0

    def _on_signal(self) -> None:
        if self.stopping:
            log.warning("second signal: abandoning the running batch and handing its jobs back")
            self.abort = True
        else:
            log.info("stopping: finishing the running batch, handing back the rest (signal again to abort)")
        self.stopping = True

    async def _until_redis(self, op: Any) -> bool:
        """Retry ``op`` until Redis answers (True), or until a signal asks to stop (False): a worker
        stopped while Redis is down has nothing to hand back, so it just exits."""
        while not self.stopping:
            try:
                await op()
                return True
            except REDIS_ERRORS as err:
                if self.stopping:
                    break
                log.warning("redis unavailable at start (%s); retrying", err)
                await asyncio.sleep(1.0)
        return False

    async def _hand_back(self) -> None:
        try:
            for d in self.backlog:
                await self.queue.requeue(d)
            self.backlog = []
            await self.queue.deregister(self.id)
        except REDIS_ERRORS as err:
            log.warning("could not hand back jobs (%s); they will be reclaimed", err)
        await self.redis.aclose()

    # ---- batching ----------------------------------------------------------------------------------
    async def _next_batch(self) -> list[Delivery]:
        """Jobs sharing the oldest job's batch key, waiting at most MAX_WAIT_MS for more to arrive."""
        if not self.backlog:
            # extend, never reassign: the heartbeat task may append reclaimed jobs during the read
            self.backlog.extend(await self.queue.read(self.id, self.models, count=self.cap, block_ms=1000))
            if not self.backlog:
                return []
        key = batch_key(self.backlog[0])
        batch: list[Delivery] = []
        images = 0
        rest: list[Delivery] = []
        for d in self.backlog:
            if batch_key(d) == key and (not batch or images + n_outputs(d) <= self.cap):
                batch.append(d)
                images += n_outputs(d)
            else:
                rest.append(d)
        self.backlog = rest
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while images < self.cap and not self.stopping:
            remaining_ms = (deadline - loop.time()) * 1000
            block = int(remaining_ms) if remaining_ms >= 1 else None
            new = await self.queue.read(self.id, self.models, count=self.cap - images, block_ms=block)
            for d in new:
                if batch_key(d) == key and images + n_outputs(d) <= self.cap:
                    batch.append(d)
                    images += n_outputs(d)
                else:
                    self.backlog.append(d)
            if block is None or not new:
                break
        return batch

    async def _run_batch(self, batch: list[Delivery]) -> None:
        statuses = await self.queue.start(self.id, batch)
        run = []
        for d, status in zip(batch, statuses, strict=True):
            if status == "running":
                run.append(d)
                continue
            await self.queue.finish(d.stream, d.entry_id, d.job_id, "")  # already final: just ack
            if status == "cancelled":
                m.JOBS.labels(kind=d.kind, status="cancelled").inc()
        if not run:
            return
        started = time.time()
        for d in run:
            m.QUEUE_WAIT.labels(model=d.model, kind=d.kind).observe(max(0.0, started - d.created))
        if self._crash_seed is not None and any(self._crash_seed in d.request["seeds"] for d in run):
            log.error("fault injection: %s=%s, exiting hard", FAULT_CRASH_SEED_ENV, self._crash_seed)
            os._exit(CRASH_EXIT_CODE)
        self.current, self.cancelled = run, set()
        first = run[0]
        sampler = first.request["sampler"]
        try:
            t0 = time.perf_counter()
            out = await asyncio.to_thread(self._compute, run)
            compute_s = time.perf_counter() - t0
        except Cancelled:
            await self._after_cancel(run)
            return
        except UserError as err:  # a request the model cannot run (e.g. more DDIM steps than fit below t*)
            log.info("batch of %d jobs refused: %s", len(run), err)
            await self._fail(run, {"field": err.field, "reason": err.reason, "code": "invalid"}, "validation")
            return
        except Exception as err:
            log.exception("batch of %d jobs failed", len(run))
            reason = f"worker_error: {type(err).__name__}: {err}"
            await self._fail(run, {"field": "job", "reason": reason}, "worker_error")
            return
        finally:
            self.current = []
        total = sum(n_outputs(d) for d in run)
        m.INFERENCE_DURATION.labels(model=first.model, sampler=sampler, kind=first.kind).observe(compute_s)
        m.BATCH_SIZE.labels(model=first.model).observe(total)
        results = await asyncio.to_thread(self._encode, run, out, compute_s, started, total)
        for d, result in zip(run, results, strict=True):
            if d.job_id in self.cancelled:
                continue
            steps = self._progress[1] or d.request["steps"]
            if await self.queue.finish(d.stream, d.entry_id, d.job_id, "done", result=result, steps=steps):
                m.JOBS.labels(kind=d.kind, status="done").inc()
                counter = m.IMAGES_GENERATED if d.kind == "sample" else m.IMAGES_PURIFIED
                counter.labels(model=d.model).inc(n_outputs(d))

    async def _after_cancel(self, run: list[Delivery]) -> None:
        for d in run:
            if self.abort and d.job_id not in self.cancelled:
                await self.queue.requeue(d)
            elif d.job_id not in self.cancelled:
                await self._finish_cancelled(d)

    async def _finish_cancelled(self, d: Delivery) -> None:
        self.cancelled.add(d.job_id)
        error = {"field": "job", "reason": "cancelled by DELETE /jobs/{id}"}
        if await self.queue.finish(d.stream, d.entry_id, d.job_id, "cancelled", error=error):
            m.JOBS.labels(kind=d.kind, status="cancelled").inc()

    async def _fail(self, run: list[Delivery], error: dict[str, str], metric_reason: str) -> None:
        for d in run:
            if d.job_id in self.cancelled:
                continue
            if await self.queue.finish(d.stream, d.entry_id, d.job_id, "failed", error=error):
                m.JOBS.labels(kind=d.kind, status="failed").inc()
                m.WORKER_FAILURES.labels(reason=metric_reason).inc()

    # ---- compute (runs in a thread) -----------------------------------------------------------------
    def _compute(self, run: list[Delivery]) -> np.ndarray:
        first = run[0]
        req = first.request
        pipe = self.pipelines[first.model]
        seeds = [s for d in run for s in d.request["seeds"]]
        has_labels = any(d.request.get("labels") for d in run)
        loop_time = time.perf_counter
        last = loop_time()
        sampler = req["sampler"]
        step_hist = m.STEP_DURATION.labels(model=first.model, sampler=sampler)
        loop = self._loop
        assert loop is not None

        def callback(i: int, n: int) -> None:
            nonlocal last
            now = loop_time()
            step_hist.observe(now - last)
            last = now
            self._progress = (i, n)
            loop.call_soon_threadsafe(self._progress_event.set)
            if self._step_delay:
                time.sleep(self._step_delay)

        def cancel() -> bool:
            return self.abort or all(d.job_id in self.cancelled for d in run)

        common: dict[str, Any] = {
            "sampler": sampler,
            "steps": req["steps"],
            "times": req.get("times"),
            "eta": req["eta"],
            "callback": callback,
            "cancel": cancel,
        }
        if first.kind == "sample":
            labels = [c for d in run for c in d.request["labels"]] if has_labels else None
            out = pipe.sample(seeds, labels=labels, **common)
        else:
            arrays, labels_list = [], []
            for d in run:
                x = imgs.load_npy_b64(d.request["images"])
                arrays.append(np.repeat(x, d.request["draws"], axis=0))
                if has_labels:
                    labels_list += [c for c in d.request["labels"] for _ in range(d.request["draws"])]
            images = torch.from_numpy(np.concatenate(arrays).astype(np.float32))
            out = pipe.purify(
                images, seeds, t_star=req["t_star"], labels=labels_list if has_labels else None, **common
            )
        return np.asarray(out.numpy(), dtype=np.float32)

    def _encode(
        self, run: list[Delivery], out: np.ndarray, compute_s: float, started: float, total: int
    ) -> list[dict[str, Any]]:
        results = []
        offset = 0
        for d in run:
            r = d.request
            n = n_outputs(d)
            arr = out[offset : offset + n]
            offset += n
            seeds: list[Any] = list(r["seeds"])
            if d.kind == "purify":
                draws = int(r["draws"])
                arr = arr.reshape(n // draws, draws, *arr.shape[1:])
                seeds = [seeds[i : i + draws] for i in range(0, n, draws)]
            result: dict[str, Any] = {
                "job_id": d.job_id,
                "kind": d.kind,
                "model": d.model,
                "model_hash": self.infos[d.model]["hash"],
                "sampler": r["sampler"],
                "steps": r["steps"],
                "times": r.get("times"),
                "format": r["format"],
                "seeds": seeds,
                "labels": r.get("labels"),
                "timings": {
                    "queue_s": round(max(0.0, started - d.created), 6),
                    "compute_s": round(compute_s, 6),
                    "batch_images": total,
                },
            }
            if d.kind == "purify":
                result["t_star"] = r["t_star"]
            if r["format"] == "npy":
                result["array"] = imgs.npy_b64(arr)
            elif d.kind == "purify":
                result["images"] = [[imgs.png_b64(x) for x in row] for row in arr]
            else:
                result["images"] = [imgs.png_b64(x) for x in arr]
            results.append(result)
        return results

    # ---- background tasks ---------------------------------------------------------------------------
    async def _progress_loop(self) -> None:
        """Publish the latest step of the running batch and pick up cancel flags (coalesced per step)."""
        while True:
            await self._progress_event.wait()
            self._progress_event.clear()
            jobs = [d for d in self.current if d.job_id not in self.cancelled]
            if not jobs:
                continue
            step, steps = self._progress
            try:
                flags = await self.queue.progress(jobs, step, steps)
                for d, flag in zip(jobs, flags, strict=True):
                    if flag and d.job_id not in self.cancelled:
                        await self._finish_cancelled(d)
            except REDIS_ERRORS as err:
                log.warning("progress not published (%s)", err)

    async def _heartbeat_loop(self) -> None:
        """Heartbeat, keep held jobs from looking abandoned, and reclaim those of dead workers."""
        while True:
            try:
                await self.queue.register(self.id, self.infos, self.meta)
                held = self.backlog + self.current
                if held:
                    await self.queue.touch(self.id, held)
                if not self.stopping:
                    await self._reclaim()
                used = torch.cuda.memory_allocated(self._cuda) if self._cuda is not None else 0
                m.GPU_MEMORY.labels(worker=self.id).set(used)
            except REDIS_ERRORS as err:
                log.warning("heartbeat failed (%s)", err)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _reclaim(self) -> None:
        """Take over the jobs of workers whose heartbeat stopped at once (a user polling such a job
        would otherwise see it 'running' for RECLAIM_IDLE_MS), and of any that died unseen later."""
        now = time.time()
        liveness = self.settings.liveness_s
        beats = await self.queue.heartbeats()
        dead = [w for w, b in beats.items() if w != self.id and now - float(b.get("ts", 0)) > liveness]
        for model in self.models:
            claimed, lost = await self.queue.reclaim(
                self.id,
                model,
                self.settings.reclaim_idle_ms,
                self.settings.max_deliveries,
                dead_workers=dead,
                dead_idle_ms=int(liveness * 1000),
            )
            for d in claimed:
                log.warning("reclaimed job %s of model %s from a dead worker", d.job_id, model)
                m.JOBS_RECLAIMED.labels(model=model).inc()
                self.backlog.append(d)
            for dl in lost:
                log.error("job %s dead-lettered after %d runs", dl.job_id, dl.runs)
                m.WORKER_FAILURES.labels(reason="dead_letter").inc()
                m.JOBS.labels(kind=dl.kind, status="failed").inc()
