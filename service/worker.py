"""`robustdiff worker`: executes queued jobs with step-level batching, one process per device.

Each model has one running batch. At every step boundary the worker admits waiting jobs (oldest
first by first-submitted time, within MAX_BATCH_IMAGES; ``service.scheduler`` decides), evaluates
the network once on all rows at their own times, applies each row's own sampler update, and retires
the rows that reached t = 0: a job completes as soon as its last image does, so a short request
never waits for a long one. Jobs of any sampler, steps, eta, t* and kind share the batch; each image
keeps its own seed and noise stream, so batching never changes an image. A job reclaimed from a dead
worker runs alone. Which running jobs' rows each evaluation takes is the scheduler's step policy
(``ROBUSTDIFF_SCHEDULER_POLICY``: on the CPU, short jobs first, the others wait a step). The event
loop owns all Redis traffic (reading, heartbeats, progress, results); each step runs in a thread so
heartbeats and cancellation checks continue meanwhile.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prometheus_client import start_http_server

from models.errors import UserError
from models.pipeline import CpuOptions, Pipeline, RunningBatch
from service import images as imgs
from service import metrics as m
from service.jobs import JobError, JobResult, Timings
from service.queue import REDIS_ERRORS, WORKER_CLIENT_PREFIX, Delivery, JobQueue, connect
from service.scheduler import Scheduler, Ticket
from service.schemas import ModelEntry
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
    metrics_url = start_metrics(settings)  # before the models load: a taken port must not cost their load
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    pipelines = load_pipelines(settings)
    worker = Worker(settings, pipelines)
    if metrics_url:
        worker.meta["metrics"] = metrics_url  # in the heartbeat, so /readyz lists where to scrape
    return asyncio.run(worker.run())


def start_metrics(settings: Settings) -> str | None:
    """Serve the worker's /metrics; 'auto' takes a free port. Returns its URL (None: disabled)."""
    port = settings.worker_metrics_port
    if port == 0:
        return None
    host = settings.worker_metrics_host
    try:
        server, _ = start_http_server(0 if port == "auto" else port, addr=host, registry=m.WORKER_REGISTRY)
    except OSError as err:
        raise UserError("ROBUSTDIFF_WORKER_METRICS_PORT", f"{host}:{port}: {err.strerror or err}") from None
    url = f"http://{host}:{server.server_port}/metrics"
    log.info("worker metrics at %s", url)
    return url


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
                    micro_batch_pixels=settings.cpu_micro_batch_pixels,
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


def scheduler_policy(settings: Settings, pipelines: dict[str, Pipeline]) -> str:
    """SCHEDULER_POLICY, with auto resolved: srpt on the CPU (a step costs about the rows it holds),
    fifo on a GPU (a bigger batch is nearly free there; srpt is not measured on a GPU yet)."""
    if settings.scheduler_policy != "auto":
        return settings.scheduler_policy
    return "fifo" if any(p.device.type == "cuda" for p in pipelines.values()) else "srpt"


def model_entry(pipe: Pipeline) -> ModelEntry:
    """The registry entry the API reads to check and resolve requests for this model."""
    return ModelEntry.model_validate(dataclasses.asdict(pipe.info))


@dataclass
class Held:
    """A job this worker holds: waiting in the scheduler, or running with its timing so far."""

    d: Delivery
    ticket: Ticket
    started: float = 0.0  # wall time it joined the running batch
    compute_s: float = 0.0  # time of the steps it was part of
    batch_rows: int = 0  # rows of those steps, summed (mean batch size = batch_rows / steps)


class Worker:
    """One consumer in the ``workers`` group, serving every loaded model."""

    def __init__(self, settings: Settings, pipelines: dict[str, Pipeline]) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.models = sorted(pipelines)
        self.infos = {name: model_entry(p) for name, p in pipelines.items()}
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.redis = connect(
            settings.redis_url,
            settings.redis_max_connections,
            settings.redis_pool_timeout_s,
            client_name=WORKER_CLIENT_PREFIX + self.id,  # /readyz sees a killed worker's connections go
        )
        self.queue = JobQueue(self.redis, job_ttl_s=settings.job_ttl_s)
        self.cap = settings.max_batch_images
        self.policy = scheduler_policy(settings, pipelines)
        self.scheduler = Scheduler(
            self.cap,
            policy=self.policy,
            srpt_fill=settings.scheduler_srpt_fill,
            max_defer_steps=settings.scheduler_max_defer_steps,
        )
        self.held: dict[str, Held] = {}  # every job this worker holds, waiting or running
        self.batches: dict[str, RunningBatch] = {p: pipe.running_batch() for p, pipe in pipelines.items()}
        self.cancelled: set[str] = set()
        self.stopping = False
        self.abort = False
        self._progress: list[tuple[Delivery, int, int]] = []
        self._progress_event = asyncio.Event()
        self._arrived = asyncio.Event()  # new jobs reached the scheduler
        self._room = asyncio.Event()  # fewer than a batch's worth of images wait here: read more
        self._completing: set[asyncio.Task[None]] = set()
        self._crash_seed, self._step_delay = fault_hooks()
        devices = {p.device for p in pipelines.values()}
        self._cuda = next((d for d in devices if d.type == "cuda"), None)
        self.meta = {"pid": os.getpid(), "host": socket.gethostname(), "device": ",".join(map(str, devices))}

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        if not (
            await self._until_redis(lambda: self.queue.ensure_groups(self.models))
            and await self._until_redis(lambda: self.queue.register(self.id, self.infos, self.meta))
        ):
            log.info("worker %s stopped before Redis at %s was reachable", self.id, self.settings.redis_url)
            await self.redis.aclose()
            return 0
        log.info("worker %s serving %s (scheduler policy %s)", self.id, ", ".join(self.models), self.policy)
        tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._progress_loop())]
        reader = asyncio.create_task(self._reader_loop())
        try:
            while not self.abort and not (self.stopping and not self._running()):
                try:
                    if not self._running():
                        await self._until_work()
                    await self._boundary()
                except REDIS_ERRORS as err:
                    log.warning("redis unavailable (%s); retrying", err)
                    await asyncio.sleep(1.0)
                except Exception:  # a bug must not kill the worker: its jobs get reclaimed after idling
                    log.exception("unexpected error in the worker loop")
                    await asyncio.sleep(1.0)
        finally:
            self.stopping = True
            self._room.set()
            # The reader's last blocking read (at most 1 s) may still deliver jobs: they are handed back.
            await asyncio.gather(reader, *self._completing, return_exceptions=True)
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
            log.info("stopping: finishing the running jobs, handing back the rest (signal again to abort)")
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
        """Requeue every job not finished here (all of them after an abort, else the waiting ones)."""
        try:
            for job_id, h in list(self.held.items()):
                if job_id not in self.cancelled:
                    await self.queue.requeue(h.d)
                self.held.pop(job_id)
                self.scheduler.drop(job_id)
            await self.queue.deregister(self.id)
        except REDIS_ERRORS as err:
            log.warning("could not hand back jobs (%s); they will be reclaimed", err)
        await self.redis.aclose()

    # ---- the step-level engine ----------------------------------------------------------------------
    def _running(self) -> bool:
        return any(self.scheduler.running.values())

    async def _reader_loop(self) -> None:
        """Read new jobs while fewer than a batch's worth of images wait here, concurrently with the
        steps, so no step waits on a Redis round trip to learn that nothing new arrived."""
        while not self.stopping:
            try:
                if sum(t.rows for t in self.scheduler.waiting) >= self.cap:
                    self._room.clear()
                    await self._room.wait()
                    continue
                await self._accept(await self.queue.read(self.id, self.models, count=self.cap, block_ms=1000))
            except REDIS_ERRORS as err:
                log.warning("redis unavailable (%s); retrying", err)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("unexpected error reading jobs")
                await asyncio.sleep(1.0)

    async def _until_work(self) -> None:
        """Nothing runs: wait (at most 1 s) for jobs if none waits, then MAX_WAIT_MS for more to
        start the running batch with."""
        if self.scheduler.idle():
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), 1.0)
            except TimeoutError:
                return
        if self.settings.max_wait_ms > 0:
            await asyncio.sleep(self.settings.max_wait_ms / 1000)

    async def _accept(self, deliveries: list[Delivery]) -> None:
        """Hand new (or reclaimed) jobs to the scheduler; a job the model cannot run fails at once."""
        for d in deliveries:
            if d.job_id in self.held:
                continue
            job = d.job
            try:
                grid = self.pipelines[d.model].grid(
                    job.sampler,
                    steps=job.steps,
                    times=job.times,
                    eta=job.eta,
                    t_star=job.t_star,
                    spacing=job.spacing,
                    ddim_eps=job.ddim_eps,
                )
                ticket = Ticket(d.job_id, d.model, job.outputs, len(grid) - 1, d.created, d.reclaimed, d.kind)
                self.scheduler.submit(ticket)
            except ValueError as err:  # UserError, or more images than MAX_BATCH_IMAGES
                await self._refuse(d, err)
                continue
            self.held[d.job_id] = Held(d, ticket)
            self._arrived.set()

    async def _refuse(self, d: Delivery, err: ValueError) -> None:
        """A request the model cannot run (e.g. more DDIM steps than fit below t*)."""
        log.info("job %s refused: %s", d.job_id, err)
        field, reason = (err.field, err.reason) if isinstance(err, UserError) else ("job", str(err))
        error = JobError(field=field, reason=reason, code="invalid")
        if await self.queue.finish(d.stream, d.entry_id, d.job_id, "failed", error=error):
            m.JOBS.labels(kind=d.kind, status="failed").inc()
            m.WORKER_FAILURES.labels(reason="validation").inc()

    async def _boundary(self) -> None:
        """One step boundary: evict cancelled rows, admit waiting jobs, evaluate every running batch
        once, retire the jobs whose rows reached t = 0."""
        plan = self.scheduler.plan(admit=not self.stopping)
        for job_id in plan.evicted:
            h = self.held.pop(job_id, None)
            if h is not None:
                self.batches[h.d.model].remove(job_id)
        if plan.admitted:
            await self._admit([self.held[t.job_id] for t in plan.admitted])
            if sum(t.rows for t in self.scheduler.waiting) < self.cap:
                self._room.set()
        # The jobs the step policy chose, less any that admission just refused or found final.
        stepping = {
            model: [job_id for job_id in jobs if job_id in self.held] for model, jobs in plan.running.items()
        }
        stepping = {model: jobs for model, jobs in stepping.items() if jobs}
        models = list(stepping)
        if not models:
            return
        samplers = {model: {self.held[j].d.job.sampler for j in jobs} for model, jobs in stepping.items()}
        labels = {model: s.pop() if len(s) == 1 else "mixed" for model, s in samplers.items()}
        t0 = time.perf_counter()
        try:
            sizes = await asyncio.to_thread(self._step, stepping, labels)
        except Exception as err:  # a bug or a device error: fail what ran, keep serving
            log.exception("step failed")
            await self._fail_running(models, err)
            return
        elapsed = time.perf_counter() - t0
        finished: list[tuple[Held, torch.Tensor]] = []
        for model in models:
            m.BATCH_SIZE.labels(model=model).observe(sizes[model])
            for job_id in stepping[model]:
                h = self.held[job_id]
                h.compute_s += elapsed
                h.batch_rows += sizes[model]
            for t in self.scheduler.advance(model):
                h = self.held.pop(t.job_id)
                finished.append((h, self.batches[model].remove(t.job_id)))
        self._progress = [
            (self.held[r.ticket.job_id].d, r.step, r.ticket.steps)
            for rows in self.scheduler.running.values()
            for r in rows
            if r.ticket.job_id not in self.cancelled
        ]
        self._progress_event.set()
        if finished:  # encoded and stored while the next step runs
            task = asyncio.create_task(self._complete(finished))
            self._completing.add(task)
            task.add_done_callback(self._completing.discard)

    async def _admit(self, admitted: list[Held]) -> None:
        """Mark admitted jobs running in Redis and add their rows to their model's batch."""
        if any(h.ticket.isolated for h in admitted) and self._completing:
            # It may be what killed a worker: store the results already computed before it runs.
            await asyncio.gather(*self._completing, return_exceptions=True)
        try:
            statuses = await self.queue.start(self.id, [h.d for h in admitted])
        except REDIS_ERRORS:  # not running yet (no rows in the batch): admit them again once Redis answers
            self.scheduler.unadmit([h.ticket for h in admitted])
            raise
        run = []
        for h, status in zip(admitted, statuses, strict=True):
            if status == "running":
                run.append(h)
                continue
            self._forget(h.d.job_id)
            await self.queue.finish(h.d.stream, h.d.entry_id, h.d.job_id, "")  # already final: just ack
            if status == "cancelled":
                m.JOBS.labels(kind=h.d.kind, status="cancelled").inc()
        if not run:
            return
        now = time.time()
        for h in run:
            h.started = now
            m.QUEUE_WAIT.labels(model=h.d.model, kind=h.d.kind).observe(max(0.0, now - h.d.created))
        if self._crash_seed is not None and any(self._crash_seed in h.d.job.seeds for h in run):
            log.error("fault injection: %s=%s, exiting hard", FAULT_CRASH_SEED_ENV, self._crash_seed)
            os._exit(CRASH_EXIT_CODE)
        refused = await asyncio.to_thread(self._add_rows, run)
        for h in run:
            if h.d.job_id in refused:
                self._forget(h.d.job_id)
                await self._refuse(h.d, refused[h.d.job_id])

    def _forget(self, job_id: str) -> None:
        self.held.pop(job_id, None)
        self.scheduler.drop(job_id)

    async def _fail_running(self, models: list[str], err: Exception) -> None:
        reason = f"worker_error: {type(err).__name__}: {err}"
        for model in models:
            for r in list(self.scheduler.running[model]):
                h = self.held[r.ticket.job_id]
                self._forget(h.d.job_id)
                if h.d.job_id in self.cancelled:
                    continue
                error = JobError(reason=reason)
                if await self.queue.finish(h.d.stream, h.d.entry_id, h.d.job_id, "failed", error=error):
                    m.JOBS.labels(kind=h.d.kind, status="failed").inc()
                    m.WORKER_FAILURES.labels(reason="worker_error").inc()
            self.batches[model] = self.pipelines[model].running_batch()

    async def _complete(self, finished: list[tuple[Held, torch.Tensor]]) -> None:
        """Store computed results. A Redis outage is waited out for up to RECLAIM_IDLE_MS (storing late
        beats running the jobs again); past that, or once the worker stops, the jobs are left
        unacknowledged, to be reclaimed and run again. A second store is harmless: a job's final
        status is written once."""
        deadline = time.monotonic() + self.settings.reclaim_idle_ms / 1000
        while True:
            try:
                await self._store(finished)
                return
            except REDIS_ERRORS as err:
                if self.stopping or time.monotonic() > deadline:
                    log.warning("results not stored (%s); the jobs will be reclaimed", err)
                    return
                log.warning("results not stored (%s); retrying", err)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("results not stored; the jobs will be reclaimed")
                return

    async def _store(self, finished: list[tuple[Held, torch.Tensor]]) -> None:
        results = await asyncio.to_thread(self._encode, finished)
        for (h, _), result in zip(finished, results, strict=True):
            d = h.d
            if d.job_id in self.cancelled:
                continue
            m.INFERENCE_DURATION.labels(model=d.model, sampler=d.job.sampler, kind=d.kind).observe(
                h.compute_s
            )
            if await self.queue.finish(
                d.stream, d.entry_id, d.job_id, "done", result=result, steps=h.ticket.steps
            ):
                m.JOBS.labels(kind=d.kind, status="done").inc()
                counter = m.IMAGES_GENERATED if d.kind == "sample" else m.IMAGES_PURIFIED
                counter.labels(model=d.model).inc(d.job.outputs)

    async def _finish_cancelled(self, d: Delivery) -> None:
        self.cancelled.add(d.job_id)
        self.scheduler.cancel(d.job_id)  # its rows leave at the next boundary
        error = JobError(reason="cancelled by DELETE /jobs/{id}")
        if await self.queue.finish(d.stream, d.entry_id, d.job_id, "cancelled", error=error):
            m.JOBS.labels(kind=d.kind, status="cancelled").inc()

    # ---- compute (runs in a thread, never while another step or admission does) ---------------------
    def _add_rows(self, run: list[Held]) -> dict[str, ValueError]:
        """Each admitted job's start state joins its model's batch; returns the jobs refused."""
        refused: dict[str, ValueError] = {}
        for h in run:
            job = h.d.job
            pipe = self.pipelines[job.model]
            images = None
            if job.images is not None:
                x = imgs.load_npy_b64(job.images)
                images = torch.from_numpy(np.repeat(x, job.draws, axis=0).astype(np.float32))
            try:
                group, start = pipe.request(
                    h.d.job_id,
                    job.seeds,
                    sampler=job.sampler,
                    steps=job.steps,
                    times=job.times,
                    eta=job.eta,
                    labels=job.output_labels(),
                    images=images,
                    t_star=job.t_star,
                    spacing=job.spacing,
                    ddim_eps=job.ddim_eps,
                )
            except ValueError as err:
                refused[h.d.job_id] = err
                continue
            self.batches[job.model].add(group, start)
        return refused

    def _step(self, stepping: dict[str, list[str]], samplers: dict[str, str]) -> dict[str, int]:
        """One network evaluation and update of the chosen jobs' rows in every model's running batch
        (the others wait a step); returns the rows evaluated per model."""
        sizes = {}
        for model, jobs in stepping.items():
            batch = self.batches[model]
            sizes[model] = sum(self.held[j].ticket.rows for j in jobs)
            t0 = time.perf_counter()
            with torch.inference_mode():
                batch.step(jobs)
            m.STEP_DURATION.labels(model=model, sampler=samplers[model]).observe(time.perf_counter() - t0)
        if self._step_delay:
            time.sleep(self._step_delay)
        return sizes

    def _encode(self, finished: list[tuple[Held, torch.Tensor]]) -> list[JobResult]:
        results = []
        for h, out in finished:
            d, job = h.d, h.d.job
            arr = np.asarray(out.float().cpu().numpy(), dtype=np.float32)
            seeds: list[int] | list[list[int]] = list(job.seeds)
            if d.kind == "purify":
                arr = arr.reshape(job.outputs // job.draws, job.draws, *arr.shape[1:])
                seeds = [job.seeds[i : i + job.draws] for i in range(0, job.outputs, job.draws)]
            images: list[str] | list[list[str]] | None = None
            array = None
            if job.format == "npy":
                array = imgs.npy_b64(arr)
            elif d.kind == "purify":
                images = [[imgs.png_b64(x) for x in row] for row in arr]
            else:
                images = [imgs.png_b64(x) for x in arr]
            results.append(
                JobResult(
                    job_id=d.job_id,
                    kind=job.kind,
                    model=d.model,
                    model_hash=self.infos[d.model].hash,
                    sampler=job.sampler,
                    steps=job.steps,
                    times=job.times,
                    spacing=job.spacing,
                    ddim_eps=job.ddim_eps,
                    format=job.format,
                    seeds=seeds,
                    images=images,
                    array=array,
                    labels=job.labels,
                    t_star=job.t_star,
                    timings=Timings(
                        queue_s=round(max(0.0, h.started - d.created), 6),
                        compute_s=round(h.compute_s, 6),
                        batch_images=round(h.batch_rows / h.ticket.steps),
                    ),
                )
            )
        return results

    # ---- background tasks ---------------------------------------------------------------------------
    async def _progress_loop(self) -> None:
        """Publish each running job's latest step and pick up cancel flags (coalesced per step)."""
        while True:
            await self._progress_event.wait()
            self._progress_event.clear()
            jobs = [(d, step, steps) for d, step, steps in self._progress if d.job_id not in self.cancelled]
            if not jobs:
                continue
            try:
                flags = await self.queue.progress(jobs)
                for (d, _, _), flag in zip(jobs, flags, strict=True):
                    if flag and d.job_id not in self.cancelled:
                        await self._finish_cancelled(d)
            except REDIS_ERRORS as err:
                log.warning("progress not published (%s)", err)

    async def _heartbeat_loop(self) -> None:
        """Heartbeat, keep held jobs from looking abandoned, and reclaim those of dead workers."""
        while True:
            try:
                await self.queue.register(self.id, self.infos, self.meta)
                if self.held:
                    await self.queue.touch(self.id, [h.d for h in self.held.values()])
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
        dead = [w for w, b in beats.items() if w != self.id and b.age(now) > liveness]
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
            await self._accept(claimed)
            for dl in lost:
                log.error("job %s dead-lettered after %d runs", dl.job_id, dl.runs)
                m.WORKER_FAILURES.labels(reason="dead_letter").inc()
                m.JOBS.labels(kind=dl.kind, status="failed").inc()
