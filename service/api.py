"""The HTTP API: its routes. Stateless apart from its Redis connection, so any number can run
behind a load balancer.

It never imports torch: what a request may ask of a model comes from the model registry that the
workers write to Redis, and images are decoded with numpy and Pillow. The work behind each route
lives in modules of its own: ``bodies`` reads and validates bodies, ``resolve`` turns them into
jobs (pure), ``submit`` enqueues and answers them, ``fleet`` reads what the workers report,
``errors`` and ``middleware`` shape every refusal, auth and the request metrics, ``openapi`` the
document.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from models.errors import UserError
from service import fleet, resolve
from service import images as imgs
from service import metrics as m
from service.bodies import decode_inputs, parse
from service.docs_ui import install_docs
from service.errors import ApiError, install_handlers
from service.middleware import Observe
from service.openapi import (
    ERROR_RESPONSES,
    SUBMIT_RESPONSES,
    describe_security,
    json_body,
    json_or_multipart_body,
)
from service.queue import REDIS_ERRORS, TERMINAL, CompletionListener, JobQueue, connect
from service.schemas import (
    ErrorBody,
    JobResult,
    JobStatus,
    ModelEntry,
    ModelsResponse,
    PurifyRequest,
    SampleRequest,
)
from service.settings import Settings, load_settings
from service.submit import Submitter, job_status

JOB_STATUSES = frozenset({"queued", "running", *TERMINAL})


class Service:
    """What the routes share: the Redis clients, the queue and the completion listener."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect(
            settings.redis_url,
            settings.redis_max_connections,
            settings.redis_pool_timeout_s,
            retry_closed=True,
        )
        # Probes get connections of their own, so a burst that fills the pool never fails /readyz.
        self.probe = connect(settings.redis_url, max_connections=4, pool_timeout_s=2.0, retry_closed=True)
        self.queue = JobQueue(self.redis, job_ttl_s=settings.job_ttl_s)
        self.probe_queue = JobQueue(self.probe, job_ttl_s=settings.job_ttl_s)
        self.listener = CompletionListener(self.redis)
        self.submitter = Submitter(self.queue, self.listener, settings)

    async def model(self, name: str | None) -> ModelEntry:
        served = await self.queue.models()
        return resolve.choose_model(served, name, self.settings.default_model)


def _job_id(job_id: str) -> str:
    if not (1 <= len(job_id) <= 64 and job_id.isalnum()):
        raise ApiError(404, "job_id", f"{job_id[:80]!r} is not a job id")
    return job_id


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
    app.add_middleware(Observe, api_keys=settings.api_keys)
    install_handlers(app)
    install_docs(app)

    @app.post(
        "/sample",
        summary="Generate images",
        response_model=JobResult,
        responses=SUBMIT_RESPONSES,
        openapi_extra=json_body(SampleRequest),
    )
    async def sample(request: Request) -> Response:
        req, _ = await parse(request, SampleRequest, settings)
        resolve.check_sample(req, settings.max_images)
        model = await svc.model(req.model)
        job = resolve.sample_job(req, model, settings.max_steps, secrets.randbelow(2**31))
        return await svc.submitter.submit(request, job, req, [], model)

    @app.post(
        "/purify",
        summary="Purify images (diffuse to t*, then denoise)",
        response_model=JobResult,
        responses=SUBMIT_RESPONSES,
        openapi_extra=json_or_multipart_body(PurifyRequest, "images"),
    )
    async def purify(request: Request) -> Response:
        req, files = await parse(request, PurifyRequest, settings)
        resolve.check_purify(req, len(files), settings.max_images)
        model = await svc.model(req.model)
        how = resolve.sampling(req, model, settings.max_steps)
        inputs = await run_in_threadpool(decode_inputs, req, files, model, settings.max_images)
        images = imgs.npy_b64(np.stack(inputs).astype(np.float32))
        job = resolve.purify_job(
            req, model, how, len(inputs), images, settings.max_images, secrets.randbelow(2**31)
        )
        return await svc.submitter.submit(request, job, req, files, model)

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
        return JSONResponse(job_status(record))

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
        entries = fleet.served_models(served, beats, time.time(), settings.liveness_s, settings.default_model)
        return JSONResponse({"models": [e.model_dump(mode="json") for e in entries]})

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
        body = fleet.readiness(beats, connected, time.time(), settings.liveness_s)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        await fleet.refresh_gauges(svc.queue, settings.liveness_s)
        return Response(generate_latest(m.API_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    describe_security(app, settings.api_keys)
    return app
