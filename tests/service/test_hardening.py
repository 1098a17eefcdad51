"""Faults, load and careless use: bursts beyond the Redis pool, expiring jobs, disconnecting and slow
clients, Redis blips while a request waits, and what the OpenAPI document promises."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from fastapi.testclient import TestClient

from service import metrics as m
from service.api import create_app
from service.jobs import Job
from service.queue import MODELS_KEY, Delivery, JobQueue, connect, job_key
from service.redis_server import RedisServer, free_port
from service.worker import FAULT_STEP_DELAY_ENV
from tests.service.conftest import ROOT, api_settings

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
    # A worker as /readyz sees one: a fresh heartbeat and an open connection under its name.
    r = redis.Redis.from_url(url, decode_responses=True, client_name="robustdiff-worker:w")
    r.hset("robustdiff:heartbeats", "w", json.dumps({"ts": 1e12, "models": ["tiny"]}))

    async def burst(client: httpx.AsyncClient) -> tuple[list[int], list[int]]:
        posts = [client.post("/sample", json={"steps": 1, "seeds": i, "async": True}) for i in range(300)]
        probes = [client.get("/readyz") for _ in range(20)]
        answers = await asyncio.gather(*posts, *probes)
        return [a.status_code for a in answers[:300]], [a.status_code for a in answers[300:]]

    posts, probes = run_app(url, burst, redis_max_connections=20, max_queue_depth=1000)
    r.close()
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


def test_a_job_lives_until_final_then_its_ttl(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    """With a 2 s TTL, a job running 3 s and one queued behind it both finish with their results, and
    expire 2 s after finishing. The TTL once ran from submission: the running job's progress then
    recreated a record without id, status or expiry (GET answered 200 with nulls), and the queued
    one answered 404 and never ran."""
    url = private_redis.url
    env = {"ROBUSTDIFF_JOB_TTL_S": "2", FAULT_STEP_DELAY_ENV: "0.4", "ROBUSTDIFF_MAX_WAIT_MS": "0"}
    spawn_worker(url, **env)
    with make_client(url, default_model="tiny", job_ttl_s=2) as c:
        long = c.post("/sample", json={"steps": 8, "seeds": 1, "async": True}).json()["id"]
        behind = c.post("/sample", json={"steps": 3, "seeds": 2, "async": True}).json()["id"]
        r = redis.Redis.from_url(url, decode_responses=True)
        ttl_when_done: dict[str, int] = {}

        def both_done() -> bool:
            # Step-level batching may finish either first: watch both, each TTL at its first sight done.
            for job in (long, behind):
                if job not in ttl_when_done:
                    answer = c.get(f"/jobs/{job}").json()
                    assert answer["id"] == job and answer["status"] in ("queued", "running", "done"), answer
                    if answer["status"] == "done":
                        assert len(answer["result"]["images"]) == 1
                        ttl_when_done[job] = r.pttl(job_key(job))
            return len(ttl_when_done) == 2

        wait_for(both_done, 30)
        assert all(0 < ttl <= 2000 for ttl in ttl_when_done.values()), ttl_when_done
        r.close()
        wait_for(
            lambda: c.get(f"/jobs/{long}").status_code == 404 and c.get(f"/jobs/{behind}").status_code == 404,
            10,
        )


def test_progress_never_recreates_an_expired_job(private_redis: Any) -> None:
    async def main() -> tuple[list[bool], int]:
        client = connect(private_redis.url)
        queue = JobQueue(client)
        job = Job(kind="sample", model="tiny", sampler="ddim", steps=5, seeds=[1])
        sub = await queue.submit(job, max_depth=10)
        await client.delete(job_key(sub.job_id))  # as if it had expired
        d = Delivery("0-1", sub.job_id, job, 0.0)
        flags = await queue.progress([(d, 1, 5)])
        exists = int(await client.exists(job_key(sub.job_id)))
        await client.aclose()
        return flags, exists

    assert asyncio.run(main()) == ([False], 0)


def test_a_partial_job_record_is_404_not_a_broken_schema(client: Any, redis_server: Any) -> None:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.hset(job_key("abc123partial"), mapping={"step": 3, "steps": 9})
    r.expire(job_key("abc123partial"), 60)
    r.close()
    answer = client.get("/jobs/abc123partial")
    assert answer.status_code == 404 and answer.json()["errors"][0]["field"] == "job_id"


def drive(app: Any, path: str, messages: list[dict[str, Any]], hang: bool = False) -> list[dict[str, Any]]:
    """One POST through the ASGI app with the given body messages; after them the client either
    hangs (sends nothing more) or disconnects. Returns what the app sent."""
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if hang:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100"), (b"host", b"api")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


def test_a_client_hanging_up_mid_upload_is_499_at_info(caplog: Any) -> None:
    """Content-Length 100, 11 bytes, then the client closes: once an ERROR with two tracebacks and
    a 500 in robustdiff_requests_total, which feeds the 5xx alert."""
    app = create_app(api_settings("redis://127.0.0.1:1/0"))
    before = requests_with(499), requests_with(500)
    with caplog.at_level("INFO"):
        drive(app, "/sample", [{"type": "http.request", "body": b'{"steps": 1', "more_body": True}])
    assert (requests_with(499), requests_with(500)) == (before[0] + 1, before[1])
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    assert any("disconnected" in r.getMessage() and r.levelname == "INFO" for r in caplog.records)


def test_a_body_slower_than_the_limit_is_408() -> None:
    """A Content-Length that promised more than was sent once held the connection for uvicorn's 70 s."""
    app = create_app(api_settings("redis://127.0.0.1:1/0", body_timeout_s=0.3))
    before = requests_with(408)
    sent = drive(
        app, "/sample", [{"type": "http.request", "body": b'{"steps": 1', "more_body": True}], hang=True
    )
    start = next(msg for msg in sent if msg["type"] == "http.response.start")
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    body = json.loads(b"".join(msg.get("body", b"") for msg in sent if msg["type"] == "http.response.body"))
    assert body["errors"][0]["field"] == "body" and "0.3 s" in body["detail"]
    assert requests_with(408) == before + 1


def test_a_redis_blip_while_waiting_keeps_the_accepted_job(
    spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    """A synchronous request whose job was queued once got a bare 503 'retry shortly' when Redis
    blinked; the job still ran, so a retry ran it twice. Now: an outage shorter than the request
    timeout is waited out, a longer one is a 503 that names the job (Location, id)."""
    server = RedisServer(persistent=True).start()  # comes back with its jobs, as serve's private one
    url = server.url
    try:
        register_tiny(url)
        answers: dict[str, Any] = {}

        def post(name: str, client: Any, seed: int) -> threading.Thread:
            t = threading.Thread(
                target=lambda: answers.update(
                    {name: client.post("/sample", json={"steps": 1, "seeds": seed})}
                )
            )
            t.start()
            wait_for(lambda: queued_ids(url) and len(queued_ids(url)) >= seed, 10)
            return t

        with (
            make_client(url, default_model="tiny", request_timeout_s=1.5) as short,
            make_client(url, default_model="tiny", request_timeout_s=60) as patient,
        ):
            waiting_short = post("short", short, 1)
            waiting_long = post("long", patient, 2)
            server.stop()
            waiting_short.join(10)
            time.sleep(0.5)
            server.start()
            spawn_worker(url)
            waiting_long.join(60)
        refused, done = answers["short"], answers["long"]
        assert refused.status_code == 503, refused.text
        job = refused.json()["id"]
        assert refused.headers["location"] == f"/jobs/{job}" and job in refused.json()["detail"]
        assert done.status_code == 200, done.text
        assert done.json()["seeds"] == [2]
        r = redis.Redis.from_url(url, decode_responses=True)
        wait_for(lambda: r.hget(job_key(job), "status") == "done", 30)  # the 503's job ran, once
        assert r.hget(job_key(job), "finishes") == "1"
        r.close()
    finally:
        server.close()


def queued_ids(url: str) -> list[str]:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [key.rsplit(":", 1)[1] for key in r.scan_iter("robustdiff:job:*")]
    finally:
        r.close()


def test_a_synchronous_client_that_hangs_up_cancels_its_job(private_redis: Any) -> None:
    url = private_redis.url
    register_tiny(url)
    body = json.dumps({"steps": 1, "seeds": 7}).encode()

    async def main(cancel: bool) -> None:
        app = create_app(
            api_settings(url, default_model="tiny", request_timeout_s=3, cancel_on_disconnect=cancel)
        )
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.5)  # the client waits a little, then gives up
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/sample", "raw_path": b"/sample", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(main(cancel=True))
    r = redis.Redis.from_url(url, decode_responses=True)
    statuses = {r.hget(job_key(j), "status") for j in queued_ids(url)}
    assert statuses == {"cancelled"}
    for j in queued_ids(url):
        r.delete(job_key(j))
    asyncio.run(main(cancel=False))  # the setting off: the job stays
    statuses = {r.hget(job_key(j), "status") for j in queued_ids(url)}
    r.close()
    assert statuses == {"queued"}


def test_openapi_describes_the_service() -> None:
    """What schemathesis found undescribed: /metrics as JSON, OPTIONS /jobs/{id} allowing GET only,
    zero-file multipart, duplicate GET/HEAD operationIds, and 202/408/415/504/auth/Idempotency-Key."""
    app = create_app(api_settings("redis://127.0.0.1:1/0", api_keys=["k"]))
    with TestClient(app) as c:
        spec = c.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
        options = c.options("/jobs/abc", headers={"Authorization": "Bearer k"})
    paths = spec["paths"]
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert options.status_code == 405 and set(options.headers["allow"].split(", ")) >= {"GET", "DELETE"}
    multipart = paths["/purify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["required"] == ["files"] and multipart["properties"]["files"]["minItems"] == 1
    for path in ("/sample", "/purify"):
        op = paths[path]["post"]
        assert {"200", "202", "408", "415", "422", "429", "503", "504"} <= set(op["responses"])
        accepted = op["responses"]["202"]
        assert accepted["links"]["GetJob"]["operationId"] == "get_job" and "Location" in accepted["headers"]
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert [p["name"] for p in op["parameters"]] == ["Idempotency-Key"]
        assert op["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "security" not in paths["/healthz"]["get"]
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(spec))
    assert refs and all(_resolve(spec, ref) for ref in refs)  # the 401s named "#/$defs/ErrorItem"
    for path in ("/sample", "/purify"):  # schemathesis' examples phase and Swagger's "Try it out" use them
        assert paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["examples"]


def _resolve(doc: Any, pointer: str) -> Any:
    for part in pointer.split("/"):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def test_retry_after_is_spread_under_a_burst(private_redis: Any) -> None:
    """Every refused client was told 'Retry-After: 1', so they all came back together."""
    url = private_redis.url
    register_tiny(url)

    async def burst(client: httpx.AsyncClient) -> list[httpx.Response]:
        posts = [client.post("/sample", json={"steps": 1, "seeds": i, "async": True}) for i in range(60)]
        return await asyncio.gather(*posts)

    answers = run_app(url, burst, max_queue_depth=10)
    waits = [int(a.headers["retry-after"]) for a in answers if a.status_code == 429]
    assert len(waits) == 50 and all(1 <= w <= 60 for w in waits)
    assert len(set(waits)) >= 3, waits


def test_two_serve_instances_share_a_host(
    checkpoints: dict[str, Path], tmp_path: Path, wait_for: Any
) -> None:
    """The worker's metrics port was fixed at 9400: the second `robustdiff serve` loaded its models and
    exited with 'Address already in use'. Now each worker takes a free port on loopback, and /readyz
    says which."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    env.update({
        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ROBUSTDIFF_MODELS": str(checkpoints["tiny"]),
        "ROBUSTDIFF_DEVICE": "cpu", "ROBUSTDIFF_HEARTBEAT_S": "0.5",
    })  # fmt: skip
    procs, bases = [], []
    try:
        for i in range(2):
            port = free_port()
            with (tmp_path / f"serve{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                    stdout=log, stderr=log,
                ))  # fmt: skip
            bases.append(f"http://127.0.0.1:{port}")

        def ready(i: int) -> dict[str, Any] | None:
            assert procs[i].poll() is None, (tmp_path / f"serve{i}.log").read_text()
            try:
                r = httpx.get(f"{bases[i]}/readyz", timeout=5)
            except httpx.HTTPError:
                return None
            return r.json() if r.status_code == 200 else None

        states = [wait_for(lambda i=i: ready(i), 90, 0.2) for i in range(2)]
        for base in bases:
            answer = httpx.post(f"{base}/sample", json={"steps": 1, "seeds": 3}, timeout=30)
            assert answer.status_code == 200, answer.text
        urls = [state["worker_metrics"][0] for state in states]
        assert urls[0] != urls[1] and all(u.startswith("http://127.0.0.1:") for u in urls)
        for url in urls:
            assert "robustdiff_jobs_total" in httpx.get(url, timeout=5).text
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)


def test_readyz_is_503_at_once_after_the_only_worker_is_killed(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    """/readyz said ready for ~5 s (the heartbeat's liveness) after a kill -9 of the only worker; a
    killed worker's Redis connections close at once, and /readyz now looks for them."""
    url = private_redis.url
    worker = spawn_worker(url, ROBUSTDIFF_HEARTBEAT_S="2", ROBUSTDIFF_RECLAIM_IDLE_MS="6000")
    with make_client(url, default_model="tiny", heartbeat_s=2, reclaim_idle_ms=6000) as c:
        assert c.get("/readyz").status_code == 200
        worker.kill()
        killed = time.monotonic()
        wait_for(lambda: c.get("/readyz").status_code == 503, 1.0, 0.02)
        assert time.monotonic() - killed < 1.0  # the heartbeat alone would say ready for up to 6 s
        assert c.get("/readyz").json()["workers"] == 0
