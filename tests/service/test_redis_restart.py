"""A Redis restart under the API and the worker: the first request after it succeeds, nothing logs alarms."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from typing import Any

from service.jobs import Job
from service.queue import REDIS_ERRORS, Delivery, JobQueue, SubmitResult, connect, stream_key
from service.redis_server import RedisServer
from tests.service.test_hardening import register_tiny


def test_a_request_after_a_redis_restart_succeeds(make_client: Any) -> None:
    """Pooled connections die with the server; the first call on one used to answer 503."""
    server = RedisServer(persistent=True).start()  # comes back with its data, as serve's private one
    url = server.url
    try:
        register_tiny(url)
        with make_client(url, default_model="tiny") as c:
            job = c.post("/sample", json={"steps": 1, "seeds": 1, "async": True}).json()["id"]
            assert c.get(f"/jobs/{job}").status_code == 200  # the pool now holds open connections
            server.stop()
            server.start()  # same port
            again = c.get(f"/jobs/{job}")
            assert again.status_code == 200, again.text
            assert again.json()["status"] == "queued"
            server.stop()
            server.start()
            accepted = c.post("/sample", json={"steps": 1, "seeds": 2, "async": True})
            assert accepted.status_code == 202, accepted.text
    finally:
        server.close()


def test_a_redis_that_stays_down_is_a_quick_503(make_client: Any) -> None:
    server = RedisServer().start()
    try:
        register_tiny(server.url)
        with make_client(server.url, default_model="tiny") as c:
            assert c.get("/models").status_code == 200
            server.stop()
            t0 = time.monotonic()
            down = c.get("/models")
            took = time.monotonic() - t0
        assert down.status_code == 503 and down.json()["error"] == "unavailable"
        assert down.headers["retry-after"] == "2"
        assert took < 5.0  # not a speed target: a hang guard (retries must not wait the outage out)
    finally:
        server.close()


def test_a_submission_sent_twice_is_one_job(private_redis: Any, monkeypatch: Any) -> None:
    """The API's client resends a command whose connection closed, which may be after Redis ran it:
    the submit script run twice for one call must leave one job and one stream entry."""
    register_tiny(private_redis.url)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))  # the same call: the same job id
    job = Job(kind="sample", model="tiny", sampler="ddim", steps=1, seeds=[0])

    async def twice() -> tuple[list[SubmitResult], int]:
        r = connect(private_redis.url)
        try:
            q = JobQueue(r)
            results = [await q.submit(job, max_depth=10) for _ in range(2)]
            return results, await r.xlen(stream_key("tiny"))
        finally:
            await r.aclose()

    results, entries = asyncio.run(twice())
    assert [(s.job_id, s.created) for s in results] == [(uuid.UUID(int=7).hex, True)] * 2
    assert entries == 1


def test_a_worker_call_cut_by_a_redis_restart_leaves_no_pipeline_open(
    private_redis: Any, caplog: Any
) -> None:
    """A pipeline of scripts (the worker's start and progress) that met the dead connection of a
    restarted Redis kept it: asyncio logged 'Unclosed Pipeline client' at ERROR, and the connection
    never went back to the pool."""
    register_tiny(private_redis.url)
    job = Job(kind="sample", model="tiny", sampler="ddim", steps=1, seeds=[0])

    async def calls_across_a_restart() -> tuple[int, int]:
        r = connect(private_redis.url, max_connections=4)  # the worker's client: no retry of its own
        q = JobQueue(r)
        try:
            submitted = await q.submit(job, max_depth=10)
            d = Delivery("0-1", submitted.job_id, job, time.time())
            assert await q.start("w", [d]) == ["running"]
            for call in (lambda: q.start("w", [d]), lambda: q.progress([(d, 1, 2)])):
                private_redis.stop()
                private_redis.start()  # same port: every pooled connection is dead
                with contextlib.suppress(*REDIS_ERRORS):  # the worker retries later: what matters
                    await call()  # is what the pipeline left behind
            gc.collect()
            await asyncio.sleep(0)
            pool = r.connection_pool
            return len(pool._in_use_connections), len(pool._available_connections)  # type: ignore[attr-defined]
        finally:
            await r.aclose()

    with caplog.at_level(logging.ERROR):
        in_use, _ = asyncio.run(calls_across_a_restart())
    assert [rec.getMessage() for rec in caplog.records if "Unclosed" in rec.getMessage()] == []
    assert in_use == 0
