"""Faults, load and careless use: bursts beyond the Redis pool, expiring jobs, disconnecting and slow
clients, Redis blips while a request waits, and what the OpenAPI document promises."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import redis

from service import metrics as m
from service.api import create_app
from service.queue import MODELS_KEY
from tests.service.conftest import api_settings

# What a worker registers for a tiny unconditional diffusion model; tests that only need the API to
# accept jobs write it themselves instead of loading a model.
TINY_INFO = {
    "name": "tiny", "kind": "diffusion", "method": "standard", "image_shape": [1, 8, 8], "num_classes": 0,
    "timesteps": 100, "class_names": [], "hash": "0" * 64, "samplers": ["ddpm", "ddim", "dpm-solver++"],
    "default_steps": 2,
}  # fmt: skip


def failures(reason: str) -> float:
    return m.API_REGISTRY.get_sample_value("robustdiff_failures_total", {"reason": reason}) or 0.0


def requests_with(status: int) -> float:
    return sum(
        s.value
        for metric in m.API_REGISTRY.collect()
        if metric.name == "robustdiff_requests"
        for s in metric.samples
        if s.name == "robustdiff_requests_total" and s.labels["status"] == str(status)
    )


def register_tiny(url: str) -> None:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        r.hset(MODELS_KEY, "tiny", json.dumps(TINY_INFO))
    finally:
        r.close()


def run_app(url: str, body: Callable[[httpx.AsyncClient], Awaitable[Any]], **overrides: Any) -> Any:
    """Run ``body`` against the app in this process (lifespan included) with concurrent requests."""

    async def main() -> Any:
        app = create_app(api_settings(url, default_model="tiny", **overrides))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                return await body(client)

    return asyncio.run(main())


def test_a_burst_beyond_the_redis_pool_queues_instead_of_503(private_redis: Any) -> None:
    """300 requests at once on a 20-connection pool: all accepted, /readyz stays 200 meanwhile.
    redis-py's pool once failed the 101st concurrent command, which the API called an outage."""
    url = private_redis.url
    register_tiny(url)
    r = redis.Redis.from_url(url, decode_responses=True)
    r.hset("robustdiff:heartbeats", "w", json.dumps({"ts": 1e12, "models": ["tiny"]}))
    r.close()

    async def burst(client: httpx.AsyncClient) -> tuple[list[int], list[int]]:
        posts = [client.post("/sample", json={"steps": 1, "seeds": i, "async": True}) for i in range(300)]
        probes = [client.get("/readyz") for _ in range(20)]
        answers = await asyncio.gather(*posts, *probes)
        return [a.status_code for a in answers[:300]], [a.status_code for a in answers[300:]]

    posts, probes = run_app(url, burst, redis_max_connections=20, max_queue_depth=1000)
    assert posts == [202] * 300, sorted(set(posts))
    assert probes == [200] * 20


def test_a_pool_busy_past_its_wait_is_busy_not_unreachable(private_redis: Any) -> None:
    url = private_redis.url
    register_tiny(url)

    async def burst(client: httpx.AsyncClient) -> list[httpx.Response]:
        posts = [client.post("/sample", json={"steps": 1, "seeds": i, "async": True}) for i in range(200)]
        return await asyncio.gather(*posts)

    before = failures("redis_unavailable"), failures("busy")
    answers = run_app(url, burst, redis_max_connections=2, redis_pool_timeout_s=0.001)
    refused = [a for a in answers if a.status_code != 202]
    assert refused and {a.status_code for a in refused} == {503}
    assert {a.json()["error"] for a in refused} == {"busy"} and all(
        "retry-after" in a.headers for a in refused
    )
    assert (failures("redis_unavailable"), failures("busy")) == (before[0], before[1] + len(refused))
