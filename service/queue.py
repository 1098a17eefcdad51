"""The one job queue: Redis Streams with a consumer group, job hashes, and completion events.

Layout (all keys under ``robustdiff:``):

- ``jobs:{model}``   stream of ``{id}`` entries, consumer group ``workers`` (at-least-once delivery);
  a worker acks *and deletes* an entry when the job ends, so XLEN - pending = jobs still waiting.
- ``job:{id}``       hash: status, kind, model, request (JSON), created/started/finished, step/steps,
  result (JSON), error (JSON), cancel flag, finishes (times a final status was written: always 1);
  no expiry until the job is final, then JOB_TTL_S.
- ``dead``           dead-letter stream for jobs whose worker died in each of MAX_DELIVERIES runs.
- ``idem:{key}``     Idempotency-Key -> "job_id fingerprint", kept as long as its job.
- ``models``/``heartbeats``  what the workers serve and when each last said so.
- ``events``         pub/sub channel carrying the id of each job that reached a final status.

State changes that must not race (submit, start, finish, cancel, requeue) are Lua scripts, so a
job reclaimed from a dead worker can never be answered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.jobs import Heartbeat, Job, JobError, JobResult
from service.schemas import ModelEntry

PREFIX = "robustdiff"
GROUP = "workers"
DEAD_STREAM = f"{PREFIX}:dead"
EVENTS_CHANNEL = f"{PREFIX}:events"
MODELS_KEY = f"{PREFIX}:models"
HEARTBEATS_KEY = f"{PREFIX}:heartbeats"
TERMINAL = frozenset({"done", "failed", "cancelled"})
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

log = logging.getLogger(__name__)


def stream_key(model: str) -> str:
    return f"{PREFIX}:jobs:{model}"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def idem_key(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


class PoolBusy(MaxConnectionsError):
    """Every pooled connection stayed in use for the whole wait: the service is busy, Redis is fine."""


class _QueueingPool(BlockingConnectionPool):
    """A request beyond ``max_connections`` waits for a free connection (up to ``timeout``) instead
    of failing at once; if none frees up it raises PoolBusy, never a plain connection error."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as err:
            if isinstance(err.__cause__, asyncio.TimeoutError):
                raise PoolBusy(
                    f"all {self.max_connections} Redis connections stayed busy for {self.timeout} s"
                ) from None
            raise


WORKER_CLIENT_PREFIX = "robustdiff-worker:"


def connect(
    url: str,
    max_connections: int = 100,
    pool_timeout_s: float = 10.0,
    client_name: str | None = None,
    retry_closed: bool = False,
) -> Redis:
    """A client that fails fast when Redis is down, so the API can answer 503 instead of hanging,
    and queues for a connection when all ``max_connections`` are in use (a burst, not an outage).

    ``retry_closed`` (the API's clients): a command that meets a closed connection is sent once more
    on a fresh one (redis-py's Retry), since a pooled connection dies with a restarted Redis and the
    first request on it must not be a 503. Only connection errors are retried, at once: a Redis still
    down is refused again in no time, and a timeout (a hung Redis) is not waited out twice. The
    worker keeps its own retry loops, built around at-least-once delivery.
    """
    retries = 1 if retry_closed else 0
    pool = _QueueingPool.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=30,
        retry=Retry(NoBackoff(), retries=retries, supported_errors=(RedisConnectionError,)),
        max_connections=max_connections,
        timeout=pool_timeout_s,
        client_name=client_name,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


# The job id is new to each call, so an existing job hash means this very call already ran (the API
# client sent it again after its reply was lost with the connection): answer as the first run did.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'created', ARGV[1]} end
if KEYS[3] ~= '' then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {'existing', prev} end
end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[5], '0', 'MKSTREAM')
local waiting = redis.call('XLEN', KEYS[2]) - redis.call('XPENDING', KEYS[2], ARGV[5])[1]
if waiting >= tonumber(ARGV[4]) then return {'full', tostring(waiting)} end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. ARGV[2])
  redis.call('HSET', KEYS[1], 'idem', KEYS[3])
end
return {'created', ARGV[1]}
"""

# A job (and its Idempotency-Key) lives until it is final and JOB_TTL_S after that: a job still
# queued or running never expires, so its result is never lost to a clock that started at submission.
_EXPIRE_FINAL = """
local function expire_final(key, ttl)
  redis.call('EXPIRE', key, ttl)
  local idem = redis.call('HGET', key, 'idem')
  if idem then redis.call('EXPIRE', idem, ttl) end
end
"""

_START = (
    _EXPIRE_FINAL
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'done' or st == 'failed' or st == 'cancelled' then return st end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[2], 'error', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'finishes', 1)
  expire_final(KEYS[1], ARGV[6])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 'running'
"""
)

_FINISH = (
    _EXPIRE_FINAL
    + """
local st = redis.call('HGET', KEYS[1], 'status')
local written = 0
if ARGV[1] ~= '' and st and st ~= 'done' and st ~= 'failed' and st ~= 'cancelled' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[4])
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[2]) end
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
  if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[10], 'steps', ARGV[10]) end
  redis.call('HINCRBY', KEYS[1], 'finishes', 1)
  expire_final(KEYS[1], ARGV[5])
  redis.call('PUBLISH', ARGV[8], ARGV[9])
  written = 1
end
if ARGV[6] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[7], ARGV[6])
  redis.call('XDEL', KEYS[2], ARGV[6])
end
return written
"""
)

_CANCEL = (
    _EXPIRE_FINAL
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'done' or st == 'failed' or st == 'cancelled' then return st end
redis.call('HSET', KEYS[1], 'cancel', '1')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[1], 'error', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'finishes', 1)
  expire_final(KEYS[1], ARGV[5])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 'cancelled'
end
return 'cancelling'
"""
)

# Progress only on a job that still exists and runs: an HSET on an expired (or deleted) job would
# recreate a record with no id, status or expiry.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'steps', ARGV[2])
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
return 0
"""

_REQUEUE = """
local st = redis.call('HGET', KEYS[1], 'status')
if st and st ~= 'done' and st ~= 'failed' and st ~= 'cancelled' then
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], 'step', 'steps', 'worker')
  redis.call('XADD', KEYS[2], '*', 'id', ARGV[3])
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
return st
"""

CANCELLED_ERROR = JobError(reason="cancelled by DELETE /jobs/{id}").model_dump_json()


@dataclass
class Delivery:
    """One stream entry handed to this worker, with its job as the API wrote it."""

    entry_id: str
    job_id: str
    job: Job
    created: float  # first-submitted time: kept when the job is requeued or reclaimed
    reclaimed: bool = False

    @property
    def model(self) -> str:
        return self.job.model

    @property
    def kind(self) -> str:
        return self.job.kind

    @property
    def stream(self) -> str:
        return stream_key(self.model)


@dataclass
class SubmitResult:
    job_id: str
    created: bool
    fingerprint_matches: bool = True


@dataclass
class DeadLetter:
    job_id: str
    model: str
    kind: str
    runs: int


class QueueFull(Exception):
    """The model's stream already holds MAX_QUEUE_DEPTH waiting jobs."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} jobs waiting")
        self.waiting = waiting


@dataclass
class JobQueue:
    """Queue operations shared by the API (submit, read, cancel) and the workers (claim, run, finish)."""

    redis: Redis
    job_ttl_s: int = 3600
    _scripts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, source in (
            ("submit", _SUBMIT),
            ("start", _START),
            ("finish", _FINISH),
            ("cancel", _CANCEL),
            ("requeue", _REQUEUE),
            ("progress", _PROGRESS),
        ):
            self._scripts[name] = self.redis.register_script(source)

    # ---- API side --------------------------------------------------------------------------------
    async def submit(
        self,
        job: Job,
        *,
        max_depth: int,
        idempotency_key: str | None = None,
        fingerprint: str = "",
    ) -> SubmitResult:
        """Store the job and append it to its model's stream, atomically with the depth and key checks."""
        job_id = uuid.uuid4().hex
        now = repr(time.time())
        model = job.model
        fields = {
            "id": job_id,
            "kind": job.kind,
            "model": model,
            "status": "queued",
            "created": now,
            "request": job.model_dump_json(),
        }
        args: list[Any] = [job_id, fingerprint, self.job_ttl_s, max_depth, GROUP]
        for name, value in fields.items():
            args += [name, value]
        keys = [job_key(job_id), stream_key(model), idem_key(idempotency_key) if idempotency_key else ""]
        outcome, value = await self._scripts["submit"](keys=keys, args=args)
        if outcome == "full":
            raise QueueFull(int(value))
        if outcome == "existing":
            prev_id, _, prev_fp = value.partition(" ")
            if not await self.redis.exists(job_key(prev_id)):
                await self.redis.delete(keys[2])
                return await self.submit(
                    job,
                    max_depth=max_depth,
                    idempotency_key=idempotency_key,
                    fingerprint=fingerprint,
                )
            return SubmitResult(prev_id, created=False, fingerprint_matches=prev_fp == fingerprint)
        return SubmitResult(job_id, created=True)

    async def get(self, job_id: str) -> dict[str, str] | None:
        data: dict[str, str] = await self.redis.hgetall(job_key(job_id))  # type: ignore[assignment]
        return data or None

    async def cancel(self, job_id: str) -> str:
        """Returns 'missing', a final status, 'cancelled' (was queued) or 'cancelling' (running)."""
        args = [repr(time.time()), CANCELLED_ERROR, EVENTS_CHANNEL, job_id, self.job_ttl_s]
        return str(await self._scripts["cancel"](keys=[job_key(job_id)], args=args))

    async def models(self) -> dict[str, ModelEntry]:
        """The registry; an entry this API cannot read (a worker of another version) is left out."""
        raw: dict[str, str] = await self.redis.hgetall(MODELS_KEY)  # type: ignore[assignment]
        out = {}
        for name, info in raw.items():
            try:
                out[name] = ModelEntry.model_validate_json(info)
            except ValidationError as err:
                log.warning("model %r: unreadable registry entry (%s)", name, err.errors()[0]["msg"])
        return out

    async def connected_workers(self) -> set[str] | None:
        """Workers with an open Redis connection (named by ``connect(client_name=...)``): a worker
        killed with -9 drops its connections at once, seconds before its heartbeat goes stale.
        None where CLIENT LIST is not allowed (e.g. an ACL): then only heartbeats tell."""
        try:
            clients = await self.redis.client_list()
        except ResponseError:
            return None
        names = (str(c.get("name") or "") for c in clients)
        return {n.removeprefix(WORKER_CLIENT_PREFIX) for n in names if n.startswith(WORKER_CLIENT_PREFIX)}

    async def heartbeats(self) -> dict[str, Heartbeat]:
        """Each worker's last heartbeat; one this process cannot read is logged and taken as absent."""
        raw: dict[str, str] = await self.redis.hgetall(HEARTBEATS_KEY)  # type: ignore[assignment]
        out = {}
        for worker, beat in raw.items():
            try:
                out[worker] = Heartbeat.model_validate_json(beat)
            except ValidationError as err:
                log.warning("worker %r: unreadable heartbeat (%s)", worker, err.errors()[0]["msg"])
        return out

    async def waiting(self, models: Iterable[str]) -> dict[str, int]:
        """Jobs not yet delivered to any worker, per model."""
        names = list(models)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xlen(stream_key(name))
                pipe.xpending(stream_key(name), GROUP)
            replies = await pipe.execute(raise_on_error=False)
        out = {}
        for i, name in enumerate(names):
            length, pending = replies[2 * i], replies[2 * i + 1]
            count = pending["pending"] if isinstance(pending, dict) else 0
            out[name] = max(0, int(length) - int(count)) if isinstance(length, int) else 0
        return out

    async def dead_letter_size(self) -> int:
        return int(await self.redis.xlen(DEAD_STREAM))

    # ---- worker side -----------------------------------------------------------------------------
    async def ensure_groups(self, models: Iterable[str]) -> None:
        for name in models:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
                await self.redis.xgroup_create(stream_key(name), GROUP, id="0", mkstream=True)

    async def register(self, worker: str, infos: dict[str, ModelEntry], meta: dict[str, Any]) -> None:
        """Heartbeat: say which models this worker serves, and that it is alive now (``meta``: the
        other ``Heartbeat`` fields)."""
        beat = Heartbeat.model_validate({**meta, "ts": time.time(), "models": sorted(infos)})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(MODELS_KEY, mapping={name: info.model_dump_json() for name, info in infos.items()})
            pipe.hset(HEARTBEATS_KEY, worker, beat.model_dump_json())
            await pipe.execute()

    async def deregister(self, worker: str) -> None:
        await self.redis.hdel(HEARTBEATS_KEY, worker)

    async def forget_dead_workers(self, beats: dict[str, Heartbeat], max_age_s: float) -> list[str]:
        """Drop heartbeats older than ``max_age_s``: a killed worker never deregisters, and its
        ever-growing heartbeat age would otherwise keep the stale-worker alert firing forever.
        Its unacknowledged jobs are not touched: other workers reclaim them (XAUTOCLAIM)."""
        now = time.time()
        dead = [w for w, b in beats.items() if b.age(now) > max_age_s]
        if dead:
            await self.redis.hdel(HEARTBEATS_KEY, *dead)
        return dead

    async def read(
        self, consumer: str, models: list[str], count: int, block_ms: int | None
    ) -> list[Delivery]:
        """New entries for this consumer; ``block_ms`` None returns at once."""
        streams: dict[Any, Any] = {stream_key(m): ">" for m in models}
        try:
            reply: Any = await self.redis.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        except ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            await self.ensure_groups(models)  # Redis lost its data (restart without persistence)
            return []
        entries = [(stream, entry_id, data) for stream, items in (reply or []) for entry_id, data in items]
        return await self._load(entries, reclaimed=False)

    async def _load(
        self, entries: list[tuple[str, str, dict[str, str]]], *, reclaimed: bool
    ) -> list[Delivery]:
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, _, data in entries:
                pipe.hmget(job_key(data.get("id", "")), ["kind", "model", "request", "created"])
            rows = await pipe.execute()
        out = []
        for (stream, entry_id, data), (_, _, request, created) in zip(entries, rows, strict=True):
            if request is None:  # expired or malformed entry: nothing to run
                await self.ack(stream, entry_id)
                continue
            try:
                job = Job.model_validate_json(request)
            except ValidationError as err:  # written by an incompatible API: fail it, never lose it silently
                reason = f"unreadable job record: {err.errors()[0]['msg']}"
                await self.finish(stream, entry_id, data["id"], "failed", error=JobError(reason=reason))
                continue
            out.append(Delivery(entry_id, data["id"], job, float(created), reclaimed))
        return out

    async def ack(self, stream: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def reclaim(
        self,
        consumer: str,
        model: str,
        idle_ms: int,
        max_deliveries: int,
        dead_workers: Iterable[str] = (),
        dead_idle_ms: int = 0,
    ) -> tuple[list[Delivery], list[DeadLetter]]:
        """Take over the entries of ``dead_workers`` (heartbeat stopped) idle for ``dead_idle_ms``, and
        any entry idle for ``idle_ms`` (its worker died unseen); dead-letter the jobs that ran too often.

        A live worker touches its entries every heartbeat, so ``dead_idle_ms`` (the liveness timeout)
        keeps a worker whose heartbeat only looks stale (clock skew) from losing its jobs.
        """
        stream = stream_key(model)
        try:
            reply = await self.redis.xautoclaim(stream, GROUP, consumer, idle_ms, "0-0", count=100)
            claimed = [(entry_id, data) for entry_id, data in reply[1] if data]
            for worker in dead_workers:
                held = await self.redis.xpending_range(
                    stream, GROUP, "-", "+", 100, consumername=worker, idle=dead_idle_ms
                )
                if held:
                    ids: list[Any] = [h["message_id"] for h in held]
                    taken: list[tuple[str, dict[str, str]]] = await self.redis.xclaim(  # type: ignore[assignment]
                        stream, GROUP, consumer, dead_idle_ms, ids
                    )
                    claimed += [(entry_id, data) for entry_id, data in taken if data]
        except ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            return [], []
        keep: list[tuple[str, str, dict[str, str]]] = []
        dead: list[DeadLetter] = []
        for entry_id, data in claimed:
            job_id = data.get("id", "")
            # Runs started (not deliveries): a job that waited in a dead worker's backlog, behind the
            # job that killed it, never ran and must not be blamed.
            kind, attempts = await self.redis.hmget(job_key(job_id), ["kind", "attempts"])
            ran = int(attempts or 0)
            if ran >= max_deliveries:
                await self.dead_letter(stream, entry_id, job_id, model, ran)
                dead.append(DeadLetter(job_id, model, str(kind or "sample"), ran))
            else:
                keep.append((stream, entry_id, data))
        return await self._load(keep, reclaimed=True), dead

    async def dead_letter(self, stream: str, entry_id: str, job_id: str, model: str, runs: int) -> None:
        reason = (
            f"dead_letter: started {runs} times and never finished "
            "(the worker crashed or was killed each time)"
        )
        await self.redis.xadd(
            DEAD_STREAM,
            {
                "id": job_id,
                "model": model,
                "entry": entry_id,
                "runs": runs,
                "reason": reason,
                "ts": repr(time.time()),
            },
        )
        await self.finish(stream, entry_id, job_id, "failed", error=JobError(reason=reason))

    async def touch(self, consumer: str, held: Iterable[Delivery]) -> None:
        """Reset the idle time of entries this live worker holds, so nobody reclaims them."""
        by_stream: dict[str, list[Any]] = {}
        for d in held:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        for stream, ids in by_stream.items():
            await self.redis.xclaim(stream, GROUP, consumer, 0, ids, justid=True)

    async def start(self, worker: str, deliveries: list[Delivery]) -> list[str]:
        """Mark jobs running; returns each one's status ('running' means: run it)."""
        now = repr(time.time())
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in deliveries:
                await self._scripts["start"](
                    keys=[job_key(d.job_id)],
                    args=[worker, now, CANCELLED_ERROR, EVENTS_CHANNEL, d.job_id, self.job_ttl_s],
                    client=pipe,
                )
            return [str(s) for s in await pipe.execute()]

    async def progress(self, jobs: list[tuple[Delivery, int, int]]) -> list[bool]:
        """Record each running job's (delivery, step i, of n steps), never recreating an expired record;
        returns each job's cancel flag."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for d, step, steps in jobs:
                await self._scripts["progress"](keys=[job_key(d.job_id)], args=[step, steps], client=pipe)
            return [int(reply) == 1 for reply in await pipe.execute()]

    async def finish(
        self,
        stream: str,
        entry_id: str,
        job_id: str,
        status: str,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        steps: int | None = None,
    ) -> bool:
        """Write the final status once (False if it already had one) and ack the entry.

        ``steps`` marks the progress complete: per-step updates are coalesced and may skip the last.
        """
        args = [
            status,
            result.model_dump_json() if result is not None else "",
            error.model_dump_json() if error is not None else "",
            repr(time.time()),
            self.job_ttl_s,
            entry_id,
            GROUP,
            EVENTS_CHANNEL,
            job_id,
            "" if steps is None else steps,
        ]
        return bool(await self._scripts["finish"](keys=[job_key(job_id), stream], args=args))

    async def requeue(self, delivery: Delivery) -> None:
        """Hand a job back: a fresh entry at the stream's end, the held one acked."""
        await self._scripts["requeue"](
            keys=[job_key(delivery.job_id), delivery.stream], args=[delivery.entry_id, GROUP, delivery.job_id]
        )


class CompletionListener:
    """One pub/sub subscription per API process that wakes the requests waiting on a job.

    A waiter re-reads the job hash after registering (so an event that came first is not lost) and
    at most every ``recheck_s`` (so events missed while Redis was unreachable are not either).
    """

    def __init__(self, redis: Redis, recheck_s: float = 5.0) -> None:
        self._redis = redis
        self._recheck_s = recheck_s
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        # The loop also ends by itself within a read (1 s): a cancel that meets redis-py's read
        # timeout as it expires can be lost (Python 3.11), which once hung the API's shutdown.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(EVENTS_CHANNEL)
                backoff = 0.1
                while not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._wake(str(message["data"]))
            except REDIS_ERRORS:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()

    def _wake(self, job_id: str) -> None:
        for fut in self._waiters.get(job_id, ()):
            if not fut.done():
                fut.set_result(None)

    async def wait(
        self, job_id: str, timeout: float, fetch: Callable[[str], Awaitable[dict[str, str] | None]]
    ) -> dict[str, str] | None:
        """The job once final (or as it is when ``timeout`` runs out; None if it vanished)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(job_id, set()).add(fut)
        try:
            while True:
                job = await fetch(job_id)
                remaining = deadline - loop.time()
                if job is None or job.get("status") in TERMINAL or remaining <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), min(remaining, self._recheck_s))
                if fut.done():
                    self._waiters[job_id].discard(fut)
                    fut = loop.create_future()
                    self._waiters[job_id].add(fut)
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[job_id]
