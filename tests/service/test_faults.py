"""Fault tests, each on its own Redis: killed workers, crashing jobs, Redis outages, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from service.queue import DEAD_STREAM, REDIS_ERRORS, job_key
from service.redis_server import RedisServer, free_port
from service.settings import Settings
from service.worker import CRASH_EXIT_CODE, FAULT_CRASH_SEED_ENV, FAULT_STEP_DELAY_ENV, Worker, load_pipelines

ROOT = Path(__file__).resolve().parents[2]
WORKER_ENV = {"ROBUSTDIFF_WORKER_METRICS_PORT": "0", "ROBUSTDIFF_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def job_hash(url: str, job_id: str) -> dict[str, str]:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return r.hgetall(job_key(job_id))  # type: ignore[return-value]
    finally:
        r.close()


def test_killed_worker_jobs_complete_once_on_another(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    url = private_redis.url
    first = spawn_worker(url, **{FAULT_STEP_DELAY_ENV: "0.3", "ROBUSTDIFF_MAX_WAIT_MS": "0"})
    with make_client(url, default_model="tiny") as c:
        ids = [
            c.post("/sample", json={"num_images": 1, "steps": s, "seeds": i, "async": True}).json()["id"]
            for i, s in enumerate([4, 4, 5, 6])
        ]
        sync_answers: list[Any] = []
        waiter = threading.Thread(
            target=lambda: sync_answers.append(c.post("/sample", json={"steps": 3, "seeds": 99})), daemon=True
        )
        waiter.start()
        wait_for(lambda: job_hash(url, ids[0]).get("status") == "running")
        first.kill()  # SIGKILL while it holds jobs (one running, others delivered or waiting)
        assert first.proc.returncode == -9
        assert job_hash(url, ids[-1]).get("status") in ("queued", "running")
        second = spawn_worker(url)
        done = [
            wait_for(lambda i=i: (j := c.get(f"/jobs/{i}").json())["status"] == "done" and j, 60) for i in ids
        ]
        waiter.join(60)
    assert [len(d["result"]["images"]) for d in done] == [1, 1, 1, 1]
    assert len(sync_answers) == 1 and sync_answers[0].status_code == 200
    hashes = [job_hash(url, i) for i in ids]
    assert all(h["finishes"] == "1" for h in hashes)  # answered exactly once
    assert any(int(h["attempts"]) >= 2 for h in hashes)  # the running one was reclaimed and re-run
    assert all(h["worker"].endswith(str(second.pid)) for h in hashes)


def test_job_that_always_crashes_goes_to_dead_letter(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    url = private_redis.url
    env = {FAULT_CRASH_SEED_ENV: "666", "ROBUSTDIFF_MAX_DELIVERIES": "2"}
    with make_client(url, default_model="tiny") as c:
        worker = spawn_worker(url, **env)
        job = c.post("/sample", json={"steps": 1, "seeds": 666, "async": True}).json()["id"]
        for _ in range(2):  # delivered twice; each delivery kills the worker
            assert worker.proc.wait(60) == CRASH_EXIT_CODE
            worker = spawn_worker(url, **env)
        final = wait_for(lambda: (j := c.get(f"/jobs/{job}").json())["status"] == "failed" and j, 30)
        assert final["error"]["reason"].startswith("dead_letter: started 2 times")
        ok = c.post("/sample", json={"steps": 1, "seeds": 1})
        assert ok.status_code == 200  # the worker that dead-lettered it is healthy
        metrics = c.get("/metrics").text
        assert "robustdiff_dead_letter_size 1.0" in metrics
    r = redis.Redis.from_url(url, decode_responses=True)
    entries = r.xrange(DEAD_STREAM)
    r.close()
    assert len(entries) == 1 and entries[0][1]["id"] == job and entries[0][1]["runs"] == "2"
    assert worker.proc.poll() is None


def test_a_crashing_job_does_not_take_its_batch_mates_down(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    url = private_redis.url
    # A long batching window so the healthy job and the crashing one share the first batch.
    env = {FAULT_CRASH_SEED_ENV: "666", "ROBUSTDIFF_MAX_DELIVERIES": "2", "ROBUSTDIFF_MAX_WAIT_MS": "3000"}
    with make_client(url, default_model="tiny") as c:
        worker = spawn_worker(url, **env)
        healthy = c.post("/sample", json={"steps": 2, "seeds": 5, "async": True}).json()["id"]
        poison = c.post("/sample", json={"steps": 2, "seeds": 666, "async": True}).json()["id"]
        assert worker.proc.wait(60) == CRASH_EXIT_CODE  # the shared batch killed it
        assert job_hash(url, healthy).get("status") == "running"

        def final() -> bool:
            nonlocal worker
            if worker.proc.poll() == CRASH_EXIT_CODE:
                worker = spawn_worker(url, **env)
            return all(job_hash(url, j).get("status") in ("done", "failed") for j in (healthy, poison))

        wait_for(final, 120, 0.2)
        ok, bad = c.get(f"/jobs/{healthy}").json(), c.get(f"/jobs/{poison}").json()
    assert ok["status"] == "done" and len(ok["result"]["images"]) == 1
    assert bad["status"] == "failed" and bad["error"]["reason"].startswith("dead_letter: started 2 times")
    r = redis.Redis.from_url(url, decode_responses=True)
    dead = [fields["id"] for _, fields in r.xrange(DEAD_STREAM)]
    r.close()
    assert dead == [poison]


def test_redis_outage_503_then_recovery(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    spawn_worker(private_redis.url)
    with make_client(private_redis.url, default_model="tiny") as c:
        assert c.post("/sample", json={"steps": 1}).status_code == 200
        private_redis.stop()
        down = c.post("/sample", json={"steps": 1})
        assert down.status_code == 503 and down.json()["errors"][0]["field"] == "redis"
        assert "retry-after" in down.headers
        assert c.get("/readyz").status_code == 503
        assert c.get("/models").status_code == 503
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
        private_redis.start()  # same port, empty: the worker must re-create its group and re-register
        wait_for(lambda: c.get("/readyz").status_code == 200, 30)
        back = c.post("/sample", json={"steps": 1, "seeds": 3})
        assert back.status_code == 200, back.text
        assert 'reason="redis_unavailable"} 0.0' not in c.get("/metrics").text


def test_sigterm_finishes_running_batch_and_hands_back_the_rest(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    url = private_redis.url
    # A one-image running batch, so the second job waits whenever the signal comes.
    one = {"ROBUSTDIFF_MAX_IMAGES": "1", "ROBUSTDIFF_MAX_BATCH_IMAGES": "1"}
    worker = spawn_worker(url, **{FAULT_STEP_DELAY_ENV: "0.3", "ROBUSTDIFF_MAX_WAIT_MS": "0", **one})
    with make_client(url, default_model="tiny") as c:
        running = c.post("/sample", json={"steps": 5, "seeds": 1, "async": True}).json()["id"]
        waiting = c.post("/sample", json={"steps": 4, "seeds": 2, "async": True}).json()["id"]
        wait_for(lambda: job_hash(url, running).get("status") == "running")
        assert worker.stop() == 0
        assert job_hash(url, running)["status"] == "done"
        assert job_hash(url, waiting)["status"] == "queued"
        r = redis.Redis.from_url(url, decode_responses=True)
        beats = {json.loads(b)["pid"] for b in r.hgetall("robustdiff:heartbeats").values()}
        r.close()
        assert worker.pid not in beats  # deregistered
        spawn_worker(url)
        wait_for(lambda: job_hash(url, waiting).get("status") == "done", 60)


def test_a_dead_workers_jobs_are_taken_over_when_its_heartbeat_stops(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    """Not after RECLAIM_IDLE_MS (a minute here): a job on a killed worker must not sit 'running'."""
    url = private_redis.url
    env = {"ROBUSTDIFF_RECLAIM_IDLE_MS": "60000", "ROBUSTDIFF_MAX_WAIT_MS": "0"}
    # 20 steps x 1 s: the first still runs the job after the second has started (seconds on a busy machine)
    first = spawn_worker(url, **env, **{FAULT_STEP_DELAY_ENV: "1.0"})
    with make_client(url, default_model="tiny") as c:
        job = c.post("/sample", json={"steps": 20, "seeds": 4, "async": True}).json()["id"]
        wait_for(lambda: job_hash(url, job).get("status") == "running")
        second = spawn_worker(url, **env)  # after the first holds the job, so it cannot take it first
        assert job_hash(url, job)["status"] == "running"
        first.kill()
        done = wait_for(lambda: (j := c.get(f"/jobs/{job}").json())["status"] == "done" and j, 20)
    assert job_hash(url, job)["worker"].endswith(str(second.pid))
    assert len(done["result"]["images"]) == 1


def _worker_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    return {**base, **WORKER_ENV, "PYTHONPATH": str(ROOT), **env}


def _assert_worker_refuses_in_one_line(name: str, **env: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"],
        cwd=ROOT,
        env=_worker_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("var", "value"),
    [(FAULT_STEP_DELAY_ENV, "abc"), (FAULT_STEP_DELAY_ENV, "-1"), (FAULT_CRASH_SEED_ENV, "1.5")],
)
def test_bad_fault_hook_is_one_line_before_loading_models(var: str, value: str) -> None:
    """A typo in a fault hook once raised a ValueError traceback after the models had loaded."""
    # named, not ROBUSTDIFF_MODELS: checked before the models
    _assert_worker_refuses_in_one_line(
        var, ROBUSTDIFF_REDIS_URL="redis://127.0.0.1:1/0", ROBUSTDIFF_MODELS="/nonexistent", **{var: value}
    )


def test_worker_with_a_garbage_redis_url_is_one_line() -> None:
    _assert_worker_refuses_in_one_line(
        "ROBUSTDIFF_REDIS_URL", ROBUSTDIFF_REDIS_URL="garbage", ROBUSTDIFF_MODELS="/nonexistent"
    )


def test_worker_stopped_while_redis_is_unreachable_exits_cleanly(
    checkpoints: dict[str, Path], tmp_path: Path, wait_for: Any
) -> None:
    """SIGTERM during the start-up retries once ended in a redis ConnectionError traceback."""
    env = _worker_env(
        ROBUSTDIFF_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", ROBUSTDIFF_MODELS=str(checkpoints["tiny"])
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        wait_for(lambda: "redis unavailable at start" in log_path.read_text() or proc.poll() is not None, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "Traceback" not in text and "stopped before Redis" in text, text


@pytest.mark.parametrize("call", ["start", "finish"])
def test_redis_lost_at_a_workers_call_loses_and_reruns_nothing(
    call: str, checkpoints: dict[str, Path], make_client: Any
) -> None:
    """Redis stops exactly during one call of the worker's and comes back with its data.

    start (the mark 'running'): kill -9 of Redis under load once left jobs 'queued' for good; the
    scheduler had admitted them, and they sat in the running batch without rows, held (so never
    reclaimed) and never run. finish (storing a computed result): the result was dropped and the job
    waited RECLAIM_IDLE_MS to be reclaimed and run again; now the worker stores it once Redis is back."""
    server = RedisServer(persistent=True).start()
    settings = Settings(
        redis_url=server.url,
        models=[str(checkpoints["tiny"])],
        device="cpu",
        max_wait_ms=200,
        heartbeat_s=0.5,
        reclaim_idle_ms=60_000,  # longer than the test: no job is done by being reclaimed
    )
    worker = Worker(settings, load_pipelines(settings))
    real = getattr(worker.queue, call)
    outages = 0

    async def during_an_outage(*args: Any, **kwargs: Any) -> Any:
        nonlocal outages
        if outages == 0:
            outages += 1
            server.stop()
            try:
                return await real(*args, **kwargs)
            finally:
                server.start()
        return await real(*args, **kwargs)

    setattr(worker.queue, call, during_an_outage)

    async def run_until_final(c: Any) -> list[dict[str, str]]:
        task = asyncio.create_task(worker.run())
        while "tiny" not in await worker.queue.models():
            await asyncio.sleep(0.05)
        body = {"steps": 3, "async": True}
        answers = [await asyncio.to_thread(c.post, "/sample", json={**body, "seeds": i}) for i in range(3)]
        ids = [a.json()["id"] for a in answers]
        deadline = time.monotonic() + 20
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            try:
                records = [await worker.queue.get(j) or {} for j in ids]
            except REDIS_ERRORS:
                records = []
            if records and all(r.get("status") == "done" for r in records):
                break
            await asyncio.sleep(0.1)
        worker._on_signal()
        await asyncio.wait_for(task, 30)
        return records

    try:
        with make_client(server.url, default_model="tiny") as c:
            records = asyncio.run(run_until_final(c))
    finally:
        server.close()
    assert outages == 1
    assert [(r.get("status"), r.get("finishes")) for r in records] == [("done", "1")] * 3
    if call == "finish":
        assert [r.get("attempts") for r in records] == ["1"] * 3  # stored, not run again
