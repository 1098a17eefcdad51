"""What the workers say about themselves, read by the API: which are live, whether the service is
ready, the models they serve, and the queue and worker gauges of the API's /metrics.

A worker is live while its heartbeat is younger than ROBUSTDIFF_LIVENESS_S (and, for readiness,
while its Redis connection is open when Redis lets us list connections).
"""

from __future__ import annotations

import time
from typing import Any

from service import metrics as m
from service.jobs import Heartbeat
from service.queue import REDIS_ERRORS, JobQueue
from service.resolve import default_model
from service.schemas import ModelEntry, ServedModel

DEAD_WORKER_RETENTION_S = 600.0
"""A worker silent this long is forgotten (its heartbeat-age series disappears); alerts fire well before."""

Beats = dict[str, Heartbeat]


def live_workers(beats: Beats, now: float, liveness_s: float) -> list[str]:
    return [w for w, b in beats.items() if b.age(now) < liveness_s]


def served_models(
    served: dict[str, ModelEntry], beats: Beats, now: float, liveness_s: float, configured_default: str
) -> list[ServedModel]:
    """GET /models: each registered model with its live workers and whether it is the default."""
    live = [beats[w] for w in live_workers(beats, now, liveness_s)]
    default = default_model(served, configured_default)
    return [
        ServedModel(
            **entry.model_dump(),
            workers=sum(name in b.models for b in live),
            default=name == default,
        )
        for name, entry in sorted(served.items())
    ]


def readiness(beats: Beats, connected: set[str] | None, now: float, liveness_s: float) -> dict[str, Any]:
    """GET /readyz's body: ready once a live worker (still connected, where that is known) has its
    models loaded; with the metrics URLs of those workers to scrape."""
    live = [
        w
        for w in live_workers(beats, now, liveness_s)
        if beats[w].models and (connected is None or w in connected)
    ]
    return {
        "ready": bool(live),
        "redis": "ok",
        "workers": len(live),
        "worker_metrics": sorted(url for w in live if (url := beats[w].metrics)),
    }


async def refresh_gauges(queue: JobQueue, liveness_s: float) -> None:
    """Queue, dead-letter and worker gauges are read from Redis at scrape time."""
    try:
        served = await queue.models()
        for name, waiting in (await queue.waiting(served)).items():
            m.QUEUE_SIZE.labels(model=name).set(waiting)
        m.DEAD_LETTER_SIZE.set(await queue.dead_letter_size())
        beats = await queue.heartbeats()
        for worker in await queue.forget_dead_workers(beats, DEAD_WORKER_RETENTION_S):
            del beats[worker]
    except REDIS_ERRORS:
        m.WORKERS_ALIVE.set(0)
        return
    now = time.time()
    ages = {w: b.age(now) for w, b in beats.items()}
    m.HEARTBEAT_AGE.clear()
    for worker, age in ages.items():
        m.HEARTBEAT_AGE.labels(worker=worker).set(age)
    m.WORKERS_ALIVE.set(sum(age < liveness_s for age in ages.values()))
