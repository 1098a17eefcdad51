"""Job submission and answers: enqueue a resolved job (or find it by its Idempotency-Key), then
answer 202 at once or wait for its result, and read a stored job back as its status or answer.

Once a job is accepted every answer names it (a Redis outage while waiting is a 503 with its id,
never a bare error that would make a client submit it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from service import metrics as m
from service.errors import ApiError, ClientGone, error_response
from service.jobs import Job, JobError, JobResult
from service.queue import REDIS_ERRORS, TERMINAL, CompletionListener, JobQueue, QueueFull
from service.schemas import ModelEntry
from service.settings import Settings

log = logging.getLogger(__name__)


def retry_after(waiting: int) -> int:
    """Seconds a refused client should wait: about one per 50 jobs waiting, drawn at random over a
    window at least 4 s wide, so a burst of refused clients does not come back all at once."""
    low = max(1, min(60, waiting // 50))
    high = max(low + 3, min(60, 2 * low))
    return low + secrets.randbelow(high - low + 1)


def idempotency(request: Request, kind: str, req: BaseModel, files: list[bytes]) -> tuple[str | None, str]:
    """The Idempotency-Key scoped to the caller and route, and the fingerprint of the request as sent
    (not the resolved job, whose random seeds differ per attempt); (None, "") without a key."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise ApiError(422, "Idempotency-Key", "must be 1 to 255 characters")
    if not key:
        return None, ""
    caller = request.headers.get("authorization", "")
    scoped = hashlib.sha256(f"{caller}\n{kind}\n{key}".encode()).hexdigest()
    digest = hashlib.sha256(req.model_dump_json(exclude={"async_"}).encode())
    for data in files:
        digest.update(hashlib.sha256(data).digest())
    return scoped, digest.hexdigest()[:32]


def job_result(record: dict[str, str]) -> dict[str, Any]:
    """A done job's answer: the worker's result with the time from enqueue to finish."""
    result = JobResult.model_validate_json(record["result"])
    return result.answer(float(record["finished"]) - float(record["created"]))


def job_status(record: dict[str, str]) -> dict[str, Any]:
    """GET /jobs/{id}: status, progress once running, and the result or the error once final."""
    out: dict[str, Any] = {k: record.get(k) for k in ("id", "kind", "model", "status")}
    if "steps" in record:
        out["progress"] = {"step": int(record.get("step", 0)), "steps": int(record["steps"])}
    if record.get("status") == "done" and "result" in record:
        out["result"] = job_result(record)
    if record.get("error") and record.get("status") in TERMINAL:
        err = JobError.model_validate_json(record["error"])
        out["error"] = {"field": err.field, "reason": err.reason}
    return out


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Submitter:
    """Submits jobs to the queue and waits for their completion events."""

    def __init__(self, queue: JobQueue, listener: CompletionListener, settings: Settings) -> None:
        self.queue = queue
        self.listener = listener
        self.settings = settings

    async def submit(
        self, request: Request, job: Job, req: BaseModel, files: list[bytes], model: ModelEntry
    ) -> Response:
        """Enqueue (or find by Idempotency-Key) the job; answer 202 at once or its result when done.

        A synchronous request whose estimated run time (outputs x steps x the worker's measured
        seconds per evaluation) exceeds the request timeout is answered 202 at once too, with the
        reason, instead of waiting the timeout out for a 504."""
        async_ = bool(getattr(req, "async_", False))
        estimate = job.outputs * job.steps * model.eval_s
        too_long = not async_ and estimate > self.settings.request_timeout_s
        async_ = async_ or too_long
        scoped, fingerprint = idempotency(request, job.kind, req, files)
        try:
            sub = await self.queue.submit(
                job,
                max_depth=self.settings.max_queue_depth,
                idempotency_key=scoped,
                fingerprint=fingerprint,
            )
        except QueueFull as full:
            m.API_FAILURES.labels(reason="queue_full").inc()
            raise ApiError(
                429,
                "queue",
                f"{full.waiting} jobs are waiting for model {job.model!r}; retry later",
                headers={"Retry-After": str(retry_after(full.waiting))},
            ) from None
        if not sub.fingerprint_matches:
            raise ApiError(409, "Idempotency-Key", "already used for a different request")
        location = f"/jobs/{sub.job_id}"
        if not async_:
            return await self.wait(request, sub.job_id, cancel_if_gone=sub.created)
        status = "queued"
        if not sub.created:  # the Idempotency-Key's job: say where it is now
            with contextlib.suppress(*REDIS_ERRORS):  # accepted: the answer must name it regardless
                record = await self.queue.get(sub.job_id)
                status = record.get("status", "queued") if record else "queued"
        body: dict[str, Any] = {
            "id": sub.job_id,
            "status": status,
            "created": sub.created,
            "location": location,
        }
        if too_long:
            body["reason"] = (
                f"estimated {estimate:.0f} s of work exceeds the {self.settings.request_timeout_s:.0f} s "
                f"request timeout: running as an async job, poll {location}"
            )
        return JSONResponse(body, status_code=202, headers={"Location": location})

    async def wait(self, request: Request, job_id: str, *, cancel_if_gone: bool) -> Response:
        """The accepted job's answer, within REQUEST_TIMEOUT_S. A Redis outage meanwhile is waited out
        (the job is safe in Redis); if it outlasts the timeout the 503 names the job, so a retry polls
        it instead of running it again. A client that hangs up cancels a job it created
        (ROBUSTDIFF_CANCEL_ON_DISCONNECT)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        watch = cancel_if_gone and self.settings.cancel_on_disconnect
        gone = asyncio.create_task(_disconnected(request)) if watch else None
        backoff = 0.1
        try:
            while True:
                waiting = asyncio.create_task(
                    self.listener.wait(job_id, max(0.0, deadline - loop.time()), self.queue.get)
                )
                await asyncio.wait(
                    [t for t in (waiting, gone) if t is not None], return_when="FIRST_COMPLETED"
                )
                if gone is not None and gone.done():
                    waiting.cancel()
                    await self.cancel_abandoned(job_id)
                    raise ClientGone(f"the wait for job {job_id}, which was cancelled")
                try:
                    return self.answer(job_id, waiting.result())
                except REDIS_ERRORS as err:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return self.unreachable_with_job(job_id, err)
                    log.warning(
                        "redis unavailable while job %s is waited for (%s); still waiting", job_id, err
                    )
                    await asyncio.sleep(min(backoff, remaining))
                    backoff = min(backoff * 2, 2.0)
        finally:
            if gone is not None:
                gone.cancel()

    async def cancel_abandoned(self, job_id: str) -> None:
        try:
            outcome = await self.queue.cancel(job_id)
        except REDIS_ERRORS as err:
            log.warning("could not cancel job %s of a client that hung up (%s)", job_id, err)
            return
        log.info("client hung up waiting for job %s: %s", job_id, outcome)

    def unreachable_with_job(self, job_id: str, err: Exception) -> Response:
        m.API_FAILURES.labels(reason="redis_unavailable").inc()
        location = f"/jobs/{job_id}"
        log.warning("redis unavailable until the timeout while job %s was waited for: %s", job_id, err)
        return JSONResponse(
            {
                "error": "unavailable",
                "detail": f"job: accepted as {job_id} but the job queue is unreachable; poll {location}, "
                "do not submit again",
                "errors": [{"field": "job", "reason": f"accepted as {job_id}; poll {location}"}],
                "id": job_id,
                "location": location,
            },
            status_code=503,
            headers={"Location": location, "Retry-After": "2"},
        )

    def answer(self, job_id: str, record: dict[str, str] | None) -> Response:
        """A waited-for job's answer: its result, 409 cancelled, 422/500 failed, or 504 still running."""
        location = f"/jobs/{job_id}"
        if record is None:
            raise ApiError(404, "job", f"{job_id} expired or does not exist")
        status = record.get("status")
        if status == "done":
            return JSONResponse(job_result(record), headers={"Location": location})
        if status == "cancelled":
            return error_response(
                409, "cancelled", [("job", "cancelled before it finished")], headers={"Location": location}
            )
        if status == "failed":
            err = JobError.model_validate_json(record.get("error") or "{}")
            invalid = err.code == "invalid"  # the worker refused the request, nothing broke
            return error_response(
                422 if invalid else 500,
                "invalid" if invalid else "job_failed",
                [(err.field, err.reason)],
                headers={"Location": location},
            )
        m.API_FAILURES.labels(reason="timeout").inc()
        return error_response(
            504,
            "timeout",
            [("job", f"not finished after {self.settings.request_timeout_s} s; poll {location}")],
            headers={"Location": location},
        )
