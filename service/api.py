"""The HTTP API: validates requests, enqueues jobs, waits for or reports their results.

Stateless apart from its Redis connection, so any number can run behind a load balancer. It never
imports torch: what a request may ask of a model comes from the model registry that the workers
write to Redis, and images are decoded with numpy and Pillow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import sampling_spec as spec
from models.errors import UserError
from service import images as imgs
from service import metrics as m
from service.docs_ui import install_docs
from service.jobs import Job
from service.queue import (
    REDIS_ERRORS,
    TERMINAL,
    CompletionListener,
    JobQueue,
    PoolBusy,
    QueueFull,
    connect,
)
from service.schemas import (
    MAX_SEED,
    STRENGTHS,
    ErrorBody,
    JobAccepted,
    JobResult,
    JobStatus,
    ModelsResponse,
    PurifyRequest,
    SampleRequest,
    model_schema,
)
from service.settings import Settings, load_settings

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
CLIENT_CLOSED_REQUEST = 499  # counted in robustdiff_requests_total{status="499"}
JOB_STATUSES = frozenset({"queued", "running", *TERMINAL})
# A worker silent this long is forgotten (its heartbeat-age series disappears); alerts fire well before.
DEAD_WORKER_RETENTION_S = 600.0
_MAX_FORM_FIELDS = 64  # non-file multipart fields: far more than PurifyRequest has
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429, 503)
}
# What a job submission may answer besides its result: each status with what it means.
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    202: {
        "model": JobAccepted,
        "description": "Accepted (async, or found by its Idempotency-Key): poll the Location",
        "headers": {"Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}},
        "links": {
            "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}},
            "CancelJob": {"operationId": "cancel_job", "parameters": {"job_id": "$response.body#/id"}},
        },
    },
    408: {"model": ErrorBody, "description": "The body did not arrive within ROBUSTDIFF_BODY_TIMEOUT_S"},
    409: {"model": ErrorBody, "description": "Idempotency-Key reused for another request, or job cancelled"},
    415: {"model": ErrorBody, "description": "Content-Type or Content-Encoding not supported"},
    429: {
        "model": ErrorBody,
        "description": "The model's queue is full; retry after Retry-After seconds (spread per client)",
        "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
    },
    500: {"model": ErrorBody, "description": "The job failed in the worker"},
    503: {
        "model": ErrorBody,
        "description": "Redis unreachable or busy, or no model registered; when the job was already "
        "accepted the body has its id and Location names it: poll it, do not resubmit",
        "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
    },
    504: {
        "model": ErrorBody,
        "description": "Not finished within ROBUSTDIFF_REQUEST_TIMEOUT_S; poll the Location",
        "headers": {"Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}},
    },
}
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Retry safely: a request repeated with the same key (and body) answers the job the "
    "first one created instead of running it again, for as long as that job is kept.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


class ApiError(Exception):
    """A request the API refuses: status, offending field, and why."""

    def __init__(
        self, status: int, field: str, reason: str, *, code: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason
        self.code = code or {
            401: "unauthorized",
            404: "not_found",
            408: "timeout",
            409: "conflict",
            413: "too_large",
            422: "invalid",
            429: "queue_full",
            503: "unavailable",
            504: "timeout",
        }.get(status, "error")
        self.headers = headers


def retry_after(waiting: int) -> int:
    """Seconds a refused client should wait: about one per 50 jobs waiting, drawn at random over a
    window at least 4 s wide, so a burst of refused clients does not come back all at once."""
    low = max(1, min(60, waiting // 50))
    high = max(low + 3, min(60, 2 * low))
    return low + secrets.randbelow(high - low + 1)


def error_response(
    status: int, code: str, errors: list[tuple[str, str]], headers: dict[str, str] | None = None
) -> JSONResponse:
    items = [{"field": f, "reason": r} for f, r in errors]
    detail = "; ".join(f"{f}: {r}" for f, r in errors)
    return JSONResponse(
        {"error": code, "detail": detail, "errors": items}, status_code=status, headers=headers
    )


def _loc(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _is_union_tag(part: int | str) -> bool:
    """Pydantic puts the tried union member ('list[constrained-int]', 'str'...) in an error's loc."""
    return isinstance(part, str) and (
        any(c in part for c in "[-") or part in ("int", "str", "float", "bool", "list", "dict")
    )


def _is_type_mismatch(error_type: str) -> bool:
    return error_type.endswith("_type") or error_type in ("none_required", "is_instance_of")


def _validation_errors(err: ValidationError | RequestValidationError) -> list[tuple[str, str]]:
    """One reason per field. A value tried against each member of a union (``seeds``: a list or one
    seed) fails once per member; keep the member that says what is wrong with the value (``seeds[0]``
    is below 0, or not an integer) over those that only say the whole value is of another type."""
    errors = []
    for e in err.errors():
        loc = tuple(x for x in e.get("loc", ()) if not _is_union_tag(x))
        reason = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            reason = f"malformed JSON ({e.get('ctx', {}).get('error', reason)})"
        errors.append((loc, str(e.get("type", "")), reason))
    informative = {loc[:1] for loc, kind, _ in errors if not _is_type_mismatch(kind)}
    deeper = {loc[:i] for loc, _, _ in errors for i in range(1, len(loc))}
    out: dict[str, str] = {}
    for loc, kind, reason in errors:
        if _is_type_mismatch(kind) and (loc in deeper or (len(loc) == 1 and loc in informative)):
            continue
        out.setdefault(_loc(loc), reason)
    return list(out.items()) or [("body", "invalid")]


class _Observe:
    """Pure ASGI middleware: bearer auth plus the request count and duration metrics."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if self.keys and scope["path"] not in PUBLIC_PATHS and not self._authorised(scope):
                status = 401
                resp = error_response(
                    401,
                    "unauthorized",
                    [("Authorization", "a valid 'Bearer <api key>' header is required")],
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unauthorized" if status == 401 else "unmatched")
            m.REQUESTS.labels(route=label, status=str(status)).inc()
            m.REQUEST_DURATION.labels(route=label).observe(time.perf_counter() - start)

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        return any(hmac.compare_digest(token.strip(), key) for key in self.keys)


class Service:
    """Request handling shared by the routes; owns the Redis client, queue and completion listener."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect(
            settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s
        )
        # Probes get connections of their own, so a burst that fills the pool never fails /readyz.
        self.probe = connect(settings.redis_url, max_connections=4, pool_timeout_s=2.0)
        self.queue = JobQueue(self.redis, job_ttl_s=settings.job_ttl_s)
        self.probe_queue = JobQueue(self.probe, job_ttl_s=settings.job_ttl_s)
        self.listener = CompletionListener(self.redis)

    # ---- body reading --------------------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body", f"{declared} bytes is over the limit of {limit}")
        chunks, size = [], 0
        timeout = self.settings.body_timeout_s
        try:
            async with asyncio.timeout(timeout):  # a slow or lying client must not hold a connection
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, "body", f"more than the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408,
                "body",
                f"{size} bytes of {declared or 'an unknown length'} arrived in {timeout} s "
                "(ROBUSTDIFF_BODY_TIMEOUT_S)",
                code="timeout",
                headers={"Connection": "close"},  # the rest of the body may still come: never reuse it
            ) from None
        except ClientDisconnect:
            raise ClientGone(f"{request.method} {request.url.path} after {size} bytes of the body") from None
        body = b"".join(chunks)
        request._body = body  # let request.form() parse what was already read
        return body

    async def parse(self, request: Request, schema: type[BaseModel]) -> tuple[BaseModel, list[bytes]]:
        """The validated body (JSON, or multipart for /purify) and any uploaded files."""
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise ApiError(415, "content-encoding", f"{encoding!r} is not supported; send the body as is")
        body = await self.read_body(request)
        ctype = request.headers.get("content-type", "").lower()  # media types are case-insensitive
        files: list[bytes] = []
        if ctype.startswith("multipart/form-data") and schema is PurifyRequest:
            data: dict[str, Any] = {}
            try:
                form = await request.form(max_files=self.settings.max_images, max_fields=_MAX_FORM_FIELDS)
            except Exception as err:  # python-multipart / starlette raise several types for bad bodies
                raise _multipart_error(err, self.settings.max_images) from None
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in ("files", "images"):
                        raise ApiError(422, key, "file parts must be named 'files'")
                    files.append(await value.read())
                elif key in data:
                    raise ApiError(422, key, "given more than once")
                else:
                    try:
                        data[key] = json.loads(value)
                    except ValueError:
                        data[key] = value
            if not files:
                raise ApiError(422, "files", "at least one image file is required")
            if "images" in data:
                raise ApiError(422, "images", "send images as files or as base64 JSON, not both")
            data["images"] = ["multipart"]  # placeholder: the files are decoded instead
            try:
                return schema.model_validate(data), files
            except ValidationError as err:
                raise _Invalid(err) from None
        if ctype and not ctype.startswith("application/json"):
            accepted = (
                "application/json or multipart/form-data" if schema is PurifyRequest else "application/json"
            )
            raise ApiError(
                415, "content-type", f"{ctype.split(';')[0]!r} is not {accepted}", code="unsupported"
            )
        try:  # strict: JSON has types, so "4" is not a number and "yes" not a boolean
            return schema.model_validate_json(body or b"null", strict=True), files
        except ValidationError as err:
            raise _Invalid(err) from None

    # ---- model resolution --------------------------------------------------------------------------
    async def model_info(self, name: str | None) -> dict[str, Any]:
        served = await self.queue.models()
        if not served:
            raise ApiError(
                503, "model", "no worker has registered any model yet", headers={"Retry-After": "5"}
            )
        if name is None:
            default = self.settings.default_model
            if default in served:
                return served[default]
            if len(served) == 1:
                return next(iter(served.values()))
            raise ApiError(422, "model", f"required: choose one of {sorted(served)}")
        if name not in served:
            raise ApiError(422, "model", f"unknown model {name!r}; served: {sorted(served)}")
        return served[name]

    def resolve_common(self, req: SampleRequest | PurifyRequest, info: dict[str, Any]) -> dict[str, Any]:
        kind, name = str(info["kind"]), str(info["name"])
        sampler = req.sampler or spec.default_sampler(kind)
        try:
            spec.check_sampler(sampler, kind, name)
            spec.check_eta(sampler, req.eta)
            if req.times is None:
                steps = req.steps or int(info["default_steps"])
            else:  # below t* is checked by /purify once t* is known
                timesteps = int(info.get("timesteps") or 10**9)  # registered by current workers
                steps = spec.check_times(req.times, 1.0, timesteps, req.steps)
        except UserError as err:
            raise ApiError(422, err.field, err.reason) from None
        if steps > self.settings.max_steps:
            raise ApiError(422, "steps", f"{steps} is over the maximum of {self.settings.max_steps}")
        return {
            "model": info["name"],
            "sampler": sampler,
            "steps": steps,
            "times": req.times,
            "eta": req.eta,
            "format": req.format,
        }

    def seeds(self, given: list[int] | int | None, n: int) -> list[int]:
        if given is None:
            base = secrets.randbelow(2**31)
            return [base + i for i in range(n)]
        if isinstance(given, int):
            if given + n - 1 > MAX_SEED:
                raise ApiError(422, "seeds", f"base seed + {n - 1} is over {MAX_SEED}")
            return [given + i for i in range(n)]
        if len(given) != n:
            raise ApiError(
                422, "seeds", f"{len(given)} seeds given for {n} output images (or give one base seed)"
            )
        return list(given)

    def labels(
        self,
        given: list[int | str] | int | str | None,
        n: int,
        info: dict[str, Any],
        seeds: list[int],
        kind: str,
    ) -> list[int] | None:
        classes = int(info["num_classes"])
        if not classes:
            if given is not None:
                raise ApiError(422, "labels", f"{info['name']!r} is unconditional; omit labels")
            return None
        if given is None:
            if kind == "purify":
                raise ApiError(
                    422, "labels", f"{info['name']!r} is class-conditional: give each image's label"
                )
            return [s % classes for s in seeds]  # reproducible from the seeds alone
        items = given if isinstance(given, list) else [given] * n
        if len(items) != n:
            raise ApiError(422, "labels", f"{len(items)} labels given for {n} images")
        names = list(info.get("class_names") or [])
        out = []
        for i, lab in enumerate(items):
            if isinstance(lab, str):
                if lab not in names:
                    raise ApiError(422, f"labels[{i}]", f"unknown class {lab!r}; classes: {names}")
                out.append(names.index(lab))
            elif lab >= classes:
                raise ApiError(422, f"labels[{i}]", f"{lab} is not a class index in [0, {classes - 1}]")
            else:
                out.append(lab)
        return out

    # ---- job submission and answers -----------------------------------------------------------------
    async def submit(
        self,
        request: Request,
        kind: str,
        job: dict[str, Any],
        req: BaseModel,
        files: list[bytes],
        info: dict[str, Any] | None = None,
    ) -> Response:
        """Enqueue (or find by Idempotency-Key) the job; answer 202 at once or its result when done.

        A synchronous request whose estimated run time (outputs x steps x the worker's measured
        seconds per evaluation) exceeds the request timeout is answered 202 at once too, with the
        reason, instead of waiting the timeout out for a 504."""
        async_ = bool(getattr(req, "async_", False))
        estimate = len(job["seeds"]) * int(job["steps"]) * float((info or {}).get("eval_s") or 0.0)
        too_long = not async_ and estimate > self.settings.request_timeout_s
        async_ = async_ or too_long
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise ApiError(422, "Idempotency-Key", "must be 1 to 255 characters")
        scoped = None
        fingerprint = ""
        if key:
            caller = request.headers.get("authorization", "")
            scoped = hashlib.sha256(f"{caller}\n{kind}\n{key}".encode()).hexdigest()
            # The request as sent (not the resolved job, whose random seeds differ per attempt).
            digest = hashlib.sha256(req.model_dump_json(exclude={"async_"}).encode())
            for data in files:
                digest.update(hashlib.sha256(data).digest())
            fingerprint = digest.hexdigest()[:32]
        try:
            sub = await self.queue.submit(
                Job.model_validate({"kind": kind, **job}),
                max_depth=self.settings.max_queue_depth,
                idempotency_key=scoped,
                fingerprint=fingerprint,
            )
        except QueueFull as full:
            m.API_FAILURES.labels(reason="queue_full").inc()
            retry = str(retry_after(full.waiting))
            raise ApiError(
                429,
                "queue",
                f"{full.waiting} jobs are waiting for model {job['model']!r}; retry later",
                headers={"Retry-After": retry},
            ) from None
        if not sub.fingerprint_matches:
            raise ApiError(409, "Idempotency-Key", "already used for a different request")
        location = f"/jobs/{sub.job_id}"
        if async_:
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
        return await self.wait(request, sub.job_id, cancel_if_gone=sub.created)

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
        location = f"/jobs/{job_id}"
        if record is None:
            raise ApiError(404, "job", f"{job_id} expired or does not exist")
        status = record.get("status")
        if status == "done":
            return JSONResponse(self.result(record), headers={"Location": location})
        if status == "cancelled":
            return error_response(
                409, "cancelled", [("job", "cancelled before it finished")], headers={"Location": location}
            )
        if status == "failed":
            err = json.loads(record.get("error") or "{}")
            invalid = err.get("code") == "invalid"  # the worker refused the request, nothing broke
            return error_response(
                422 if invalid else 500,
                "invalid" if invalid else "job_failed",
                [(err.get("field", "job"), err.get("reason", "failed"))],
                headers={"Location": location},
            )
        m.API_FAILURES.labels(reason="timeout").inc()
        return error_response(
            504,
            "timeout",
            [("job", f"not finished after {self.settings.request_timeout_s} s; poll {location}")],
            headers={"Location": location},
        )

    @staticmethod
    def result(record: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(record["result"])
        out["timings"]["total_s"] = round(float(record["finished"]) - float(record["created"]), 6)
        return out

    def status(self, record: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {k: record.get(k) for k in ("id", "kind", "model", "status")}
        if "steps" in record:
            out["progress"] = {"step": int(record.get("step", 0)), "steps": int(record["steps"])}
        if record.get("status") == "done" and "result" in record:
            out["result"] = self.result(record)
        if record.get("error") and record.get("status") in TERMINAL:
            err = json.loads(record["error"])
            out["error"] = {"field": err.get("field", "job"), "reason": err.get("reason", "failed")}
        return out

    # ---- purify inputs -----------------------------------------------------------------------------
    def decode_inputs(self, req: PurifyRequest, files: list[bytes], info: dict[str, Any]) -> list[np.ndarray]:
        shape = tuple(int(x) for x in info["image_shape"])
        raws = (
            [(f"files[{i}]", data) for i, data in enumerate(files)]
            if files
            else [(f"images[{i}]", imgs.b64decode(text, f"images[{i}]")) for i, text in enumerate(req.images)]
        )
        out: list[np.ndarray] = []
        for field, data in raws:
            decoded = imgs.decode(data, field, req.npy_range)
            if len(out) + len(decoded) > self.settings.max_images:
                raise ApiError(422, "images", f"more than the maximum of {self.settings.max_images} images")
            out += [imgs.fit(d, shape, field, req.resize) for d in decoded]  # type: ignore[arg-type]
        return out


def _multipart_error(err: Exception, max_files: int) -> ApiError:
    """Starlette's parser stops at its limits with a 400 ("Too many files. Maximum number of files
    is 64."); say which field is over which limit, as for every other refusal."""
    detail = str(getattr(err, "detail", "") or err)
    if detail.startswith("Too many files"):
        return ApiError(
            422, "files", f"more than the maximum of {max_files} files (ROBUSTDIFF_MAX_IMAGES) in one request"
        )
    if detail.startswith("Too many fields"):
        return ApiError(422, "body", f"more than the maximum of {_MAX_FORM_FIELDS} form fields")
    return ApiError(422, "body", f"malformed multipart body ({detail})")


class ClientGone(Exception):
    """The client closed the connection before its request was read: its doing, not a server error."""


class _Invalid(Exception):
    def __init__(self, err: ValidationError) -> None:
        super().__init__(str(err))
        self.err = err


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app; ``settings`` default to the environment, and must name a Redis URL."""
    settings = settings or load_settings()
    if not settings.redis_url:
        raise UserError(
            "ROBUSTDIFF_REDIS_URL", "required by the API (`robustdiff serve` starts a private one)"
        )
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.listener.start()
        yield
        await svc.listener.stop()
        await svc.redis.aclose()
        await svc.probe.aclose()

    app = FastAPI(
        title="robustdiff",
        version="0.1.0",
        summary="Sampling and adversarial purification with robust diffusion and consistency models.",
        lifespan=lifespan,
        docs_url=None,  # served from the installed package by install_docs: the default uses a CDN
        redoc_url=None,
    )
    app.state.service = svc
    app.add_middleware(_Observe, api_keys=settings.api_keys)
    _install_handlers(app)
    install_docs(app)

    @app.post(
        "/sample",
        summary="Generate images",
        response_model=JobResult,
        responses=SUBMIT_RESPONSES,
        openapi_extra={
            "parameters": [IDEMPOTENCY_HEADER],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": model_schema(SampleRequest)}},
            },
        },
    )
    async def sample(request: Request) -> Response:
        req, _ = await svc.parse(request, SampleRequest)
        assert isinstance(req, SampleRequest)
        if req.num_images > settings.max_images:
            raise ApiError(
                422, "num_images", f"{req.num_images} is over the maximum of {settings.max_images}"
            )
        info = await svc.model_info(req.model)
        job = svc.resolve_common(req, info)
        seeds = svc.seeds(req.seeds, req.num_images)
        job.update(seeds=seeds, labels=svc.labels(req.labels, req.num_images, info, seeds, "sample"))
        return await svc.submit(request, "sample", job, req, [], info)

    @app.post(
        "/purify",
        summary="Purify images (diffuse to t*, then denoise)",
        response_model=JobResult,
        responses=SUBMIT_RESPONSES,
        openapi_extra={
            "parameters": [IDEMPOTENCY_HEADER],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": model_schema(PurifyRequest)},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["files"],
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                    "minItems": 1,
                                },
                                **{
                                    k: v
                                    for k, v in model_schema(PurifyRequest)["properties"].items()
                                    if k != "images"
                                },
                            },
                        }
                    },
                },
            },
        },
    )
    async def purify(request: Request) -> Response:
        req, files = await svc.parse(request, PurifyRequest)
        assert isinstance(req, PurifyRequest)
        if req.t_star is not None and req.strength is not None:
            raise ApiError(422, "strength", "give t_star or strength, not both")
        if not files and len(req.images) > settings.max_images:
            raise ApiError(422, "images", f"{len(req.images)} is over the maximum of {settings.max_images}")
        info = await svc.model_info(req.model)
        job = svc.resolve_common(req, info)
        inputs = await run_in_threadpool(svc.decode_inputs, req, files, info)
        outputs = len(inputs) * req.draws
        if outputs > settings.max_images:
            raise ApiError(
                422,
                "draws",
                f"{len(inputs)} images x {req.draws} draws = {outputs} outputs, over the maximum "
                f"of {settings.max_images}",
            )
        seeds = svc.seeds(req.seeds, outputs)
        t_star = req.t_star if req.t_star is not None else STRENGTHS[req.strength or "medium"]
        if "timesteps" in info:  # registered by workers that know their schedule
            t_min = 1 / int(info["timesteps"])
            if t_star < t_min:
                raise ApiError(422, "t_star", f"must be at least {t_min} (one step of the model's schedule)")
            if req.steps is None and req.times is None:  # the default must fit below a shallow t*
                job["steps"] = min(job["steps"], round(t_star * int(info["timesteps"])))
        if req.times and req.times[0] >= t_star:
            raise ApiError(422, "times", f"must all be below t_star={t_star}, where purification starts")
        labels = svc.labels(req.labels, len(inputs), info, seeds, "purify")
        job.update(
            seeds=seeds,
            draws=req.draws,
            t_star=t_star,
            labels=labels,
            images=imgs.npy_b64(np.stack(inputs).astype(np.float32)),
        )
        return await svc.submit(request, "purify", job, req, files, info)

    @app.get(
        "/jobs/{job_id}",
        response_model=JobStatus,
        responses=ERROR_RESPONSES,
        summary="Job status",
        operation_id="get_job",
    )
    async def get_job(job_id: str) -> Response:
        record = await svc.queue.get(_job_id(job_id))
        if record is None or record.get("id") != job_id or record.get("status") not in JOB_STATUSES:
            raise ApiError(404, "job_id", f"{job_id} expired or does not exist")  # never a partial record
        return JSONResponse(svc.status(record))

    @app.delete(
        "/jobs/{job_id}",
        responses={**ERROR_RESPONSES, 202: {"description": "Running: it stops at its next step"}},
        summary="Cancel a job",
        operation_id="cancel_job",
    )
    async def cancel_job(job_id: str) -> Response:
        outcome = await svc.queue.cancel(_job_id(job_id))
        if outcome == "missing":
            raise ApiError(404, "job_id", f"{job_id} expired or does not exist")
        if outcome in ("done", "failed"):
            raise ApiError(409, "job_id", f"job already {outcome}")
        code = 200 if outcome == "cancelled" else 202
        return JSONResponse({"id": job_id, "status": outcome}, status_code=code)

    @app.get(
        "/models",
        response_model=ModelsResponse,
        responses={503: {"model": ErrorBody}},
        summary="Models the workers serve",
    )
    async def list_models() -> Response:
        served = await svc.queue.models()
        beats = await svc.queue.heartbeats()
        now = time.time()
        live = [b for b in beats.values() if now - float(b.get("ts", 0)) < settings.liveness_s]
        default = (
            settings.default_model
            if settings.default_model in served
            else (next(iter(served)) if len(served) == 1 else None)
        )
        entries = [
            dict(info, workers=sum(name in b.get("models", []) for b in live), default=name == default)
            for name, info in sorted(served.items())
        ]
        return JSONResponse({"models": entries})

    @app.get("/healthz", summary="The API process is up", operation_id="healthz")
    @app.head("/healthz", summary="The API process is up", operation_id="healthz_head")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    ready_doc = "Redis reachable and a live worker with its models loaded"
    ready_503: dict[int | str, dict[str, Any]] = {
        503: {"description": "Not ready (Redis unreachable or no live worker)"}
    }

    @app.get("/readyz", summary=ready_doc, operation_id="readyz", responses=ready_503)
    @app.head("/readyz", summary=ready_doc, operation_id="readyz_head", responses=ready_503)
    async def readyz() -> Response:
        try:
            await svc.probe.ping()
            beats = await svc.probe_queue.heartbeats()
            connected = await svc.probe_queue.connected_workers()
        except REDIS_ERRORS:
            return JSONResponse({"ready": False, "redis": "unreachable", "workers": 0}, status_code=503)
        now = time.time()
        live = [
            w
            for w, b in beats.items()
            if now - float(b.get("ts", 0)) < settings.liveness_s
            and b.get("models")
            and (connected is None or w in connected)
        ]
        body = {
            "ready": bool(live),
            "redis": "ok",
            "workers": len(live),
            "worker_metrics": sorted(beats[w]["metrics"] for w in live if beats[w].get("metrics")),
        }
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        await _refresh_gauges(svc)
        return Response(generate_latest(m.API_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    _describe_security(app, settings)
    return app


def _describe_security(app: FastAPI, settings: Settings) -> None:
    """Bearer auth in the OpenAPI document: required on every route but the public ones when API keys
    are set, optional otherwise (the same routes answer 401 only when keys are set)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "ROBUSTDIFF_API_KEYS"}
        }
        security: list[dict[str, list[str]]] = [{"bearer": []}] if settings.api_keys else [{}, {"bearer": []}]
        for path, item in schema["paths"].items():
            if path in PUBLIC_PATHS:
                continue
            for operation in item.values():
                operation["security"] = security
                unauthorised = {"description": "Missing or wrong bearer token", "model": ErrorBody}
                operation.setdefault("responses", {}).setdefault(
                    "401",
                    {
                        "description": unauthorised["description"],
                        "content": {"application/json": {"schema": ErrorBody.model_json_schema()}},
                    },
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of this path answers."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _job_id(job_id: str) -> str:
    if not (1 <= len(job_id) <= 64 and job_id.isalnum()):
        raise ApiError(404, "job_id", f"{job_id[:80]!r} is not a job id")
    return job_id


async def _refresh_gauges(svc: Service) -> None:
    """Queue, dead-letter and worker gauges are read from Redis at scrape time."""
    try:
        served = await svc.queue.models()
        for name, waiting in (await svc.queue.waiting(served)).items():
            m.QUEUE_SIZE.labels(model=name).set(waiting)
        m.DEAD_LETTER_SIZE.set(await svc.queue.dead_letter_size())
        beats = await svc.queue.heartbeats()
        for worker in await svc.queue.forget_dead_workers(beats, DEAD_WORKER_RETENTION_S):
            del beats[worker]
    except REDIS_ERRORS:
        m.WORKERS_ALIVE.set(0)
        return
    now = time.time()
    ages = {w: now - float(b.get("ts", 0)) for w, b in beats.items()}
    m.HEARTBEAT_AGE.clear()
    for worker, age in ages.items():
        m.HEARTBEAT_AGE.labels(worker=worker).set(age)
    m.WORKERS_ALIVE.set(sum(age < svc.settings.liveness_s for age in ages.values()))


def _install_handlers(app: FastAPI) -> None:
    Handler = Callable[[Request, Any], Awaitable[Response]]

    def handle(exc_type: type[Exception]) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            app.add_exception_handler(exc_type, fn)
            return fn

        return deco

    @handle(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        if exc.status in (413, 415, 422):
            m.API_FAILURES.labels(reason="validation").inc()
        return error_response(exc.status, exc.code, [(exc.field, exc.reason)], exc.headers)

    @handle(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        # Nobody reads this answer; 499 (nginx's "client closed request") keeps it out of the 5xx alert.
        log.info("client disconnected during %s", exc)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @handle(imgs.ImageError)
    async def image_error(_: Request, exc: imgs.ImageError) -> Response:
        m.API_FAILURES.labels(reason="validation").inc()
        return error_response(422, "invalid", [(exc.field, exc.reason)])

    @handle(_Invalid)
    async def invalid(_: Request, exc: _Invalid) -> Response:
        m.API_FAILURES.labels(reason="validation").inc()
        return error_response(422, "invalid", _validation_errors(exc.err))

    @handle(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> Response:
        m.API_FAILURES.labels(reason="validation").inc()
        return error_response(422, "invalid", _validation_errors(exc))

    @handle(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        field = "path" if exc.status_code in (404, 405) else "request"
        reason = f"{request.method} {request.url.path}: {exc.detail}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first route's methods only (GET, not DELETE)
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        return error_response(exc.status_code, "http_error", [(field, reason)], headers)

    @handle(PoolBusy)
    async def pool_busy(_: Request, exc: PoolBusy) -> Response:
        m.API_FAILURES.labels(reason="busy").inc()
        log.warning("busy: %s", exc)
        return error_response(
            503,
            "busy",
            [("server", f"every connection to the job queue is in use ({exc}); retry shortly")],
            headers={"Retry-After": str(1 + secrets.randbelow(5))},
        )

    for redis_exc in REDIS_ERRORS:

        @handle(redis_exc)
        async def redis_down(_: Request, exc: Exception) -> Response:
            m.API_FAILURES.labels(reason="redis_unavailable").inc()
            log.warning("redis unavailable: %s", exc)
            return error_response(
                503,
                "unavailable",
                [("redis", "the job queue is unreachable; retry shortly")],
                headers={"Retry-After": "2"},
            )

    @handle(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal", [("server", "unexpected error; it has been logged")])
