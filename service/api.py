"""The HTTP API: validates requests, enqueues jobs, waits for or reports their results.

Stateless apart from its Redis connection, so any number can run behind a load balancer. It never
imports torch: what a request may ask of a model comes from the model registry that the workers
write to Redis, and images are decoded with numpy and Pillow.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
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
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import UserError
from service import images as imgs
from service import metrics as m
from service.queue import REDIS_ERRORS, TERMINAL, CompletionListener, JobQueue, QueueFull, connect
from service.schemas import (
    MAX_SEED,
    STRENGTHS,
    ErrorBody,
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
# A worker silent this long is forgotten (its heartbeat-age series disappears); alerts fire well before.
DEAD_WORKER_RETENTION_S = 600.0
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429, 503)
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
            409: "conflict",
            413: "too_large",
            422: "invalid",
            429: "queue_full",
            503: "unavailable",
            504: "timeout",
        }.get(status, "error")
        self.headers = headers


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
        self.redis = connect(settings.redis_url)
        self.queue = JobQueue(self.redis, job_ttl_s=settings.job_ttl_s)
        self.listener = CompletionListener(self.redis)

    # ---- body reading --------------------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body", f"{declared} bytes is over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body", f"more than the limit of {limit} bytes")
            chunks.append(chunk)
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
                form = await request.form(max_files=self.settings.max_images, max_fields=64)
            except Exception as err:  # python-multipart / starlette raise several types for bad bodies
                raise ApiError(422, "body", f"malformed multipart body ({err})") from None
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
        samplers = list(info["samplers"])
        sampler = req.sampler or ("ddim" if "ddim" in samplers else samplers[0])
        if sampler not in samplers:
            if sampler == "consistency":
                reason = (
                    f"'consistency' needs a consistency model; {info['name']!r} is a {info['kind']} model"
                )
            elif info["kind"] == "consistency" and sampler in ("ddpm", "ddim", "dpm-solver++"):
                reason = f"{info['name']!r} is a consistency model; use 'consistency'"
            else:
                reason = f"unknown sampler {sampler!r}; {info['name']!r} supports {samplers}"
            raise ApiError(422, "sampler", reason)
        if req.eta and sampler != "ddim":
            raise ApiError(422, "eta", f"only the ddim sampler uses eta; {sampler} would ignore it")
        if req.times is None:
            steps = req.steps or int(info["default_steps"])
        else:
            steps = len(req.times) + 1
            if any(later >= earlier for earlier, later in itertools.pairwise(req.times)):
                raise ApiError(422, "times", "must be strictly decreasing")
            if req.steps is not None and req.steps != steps:
                raise ApiError(
                    422, "steps", f"{req.steps} does not match the {steps} evaluations times gives"
                )
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
                kind,
                job["model"],
                job,
                max_depth=self.settings.max_queue_depth,
                idempotency_key=scoped,
                fingerprint=fingerprint,
            )
        except QueueFull as full:
            m.API_FAILURES.labels(reason="queue_full").inc()
            retry = str(max(1, min(60, full.waiting // 50)))
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
        record = await self.listener.wait(sub.job_id, self.settings.request_timeout_s, self.queue.get)
        return self.answer(sub.job_id, record)

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
            out += [imgs.fit(a, shape, field, req.resize) for a in decoded]  # type: ignore[arg-type]
        return out


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

    app = FastAPI(
        title="robustdiff",
        version="0.1.0",
        summary="Sampling and adversarial purification with robust diffusion and consistency models.",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(_Observe, api_keys=settings.api_keys)
    _install_handlers(app)

    @app.post(
        "/sample",
        summary="Generate images",
        response_model=JobResult,
        responses={202: {"description": "Accepted (async)"}, **ERROR_RESPONSES},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": model_schema(SampleRequest)}},
            }
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
        responses={202: {"description": "Accepted (async)"}, **ERROR_RESPONSES},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": model_schema(PurifyRequest)},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["files"],
                            "properties": {
                                "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                **{
                                    k: v
                                    for k, v in model_schema(PurifyRequest)["properties"].items()
                                    if k != "images"
                                },
                            },
                        }
                    },
                },
            }
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

    @app.get("/jobs/{job_id}", response_model=JobStatus, responses=ERROR_RESPONSES, summary="Job status")
    async def get_job(job_id: str) -> Response:
        record = await svc.queue.get(_job_id(job_id))
        if record is None:
            raise ApiError(404, "job_id", f"{job_id} expired or does not exist")
        return JSONResponse(svc.status(record))

    @app.delete("/jobs/{job_id}", responses=ERROR_RESPONSES, summary="Cancel a job")
    async def cancel_job(job_id: str) -> Response:
        outcome = await svc.queue.cancel(_job_id(job_id))
        if outcome == "missing":
            raise ApiError(404, "job_id", f"{job_id} expired or does not exist")
        if outcome in ("done", "failed"):
            raise ApiError(409, "job_id", f"job already {outcome}")
        code = 200 if outcome == "cancelled" else 202
        return JSONResponse({"id": job_id, "status": outcome}, status_code=code)

    @app.get("/models", response_model=ModelsResponse, summary="Models the workers serve")
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

    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="The API process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route(
        "/readyz", methods=["GET", "HEAD"], summary="Redis reachable and a live worker with its models loaded"
    )
    async def readyz() -> Response:
        try:
            await svc.redis.ping()
            beats = await svc.queue.heartbeats()
        except REDIS_ERRORS:
            return JSONResponse({"ready": False, "redis": "unreachable", "workers": 0}, status_code=503)
        now = time.time()
        live = [
            w
            for w, b in beats.items()
            if now - float(b.get("ts", 0)) < settings.liveness_s and b.get("models")
        ]
        body = {"ready": bool(live), "redis": "ok", "workers": len(live)}
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def metrics() -> Response:
        await _refresh_gauges(svc)
        return Response(generate_latest(m.API_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


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
        return error_response(exc.status_code, "http_error", [(field, reason)], dict(exc.headers or {}))

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
