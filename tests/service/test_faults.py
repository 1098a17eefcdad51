"""Fault tests, each on its own Redis: killed workers, crashing jobs, Redis outages, SIGTERM."""

from __future__ import annotations

import json
import threading
from typing import Any

import redis

from service.queue import DEAD_STREAM, job_key
from service.worker import CRASH_EXIT_CODE, FAULT_CRASH_SEED_ENV, FAULT_STEP_DELAY_ENV


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
    worker = spawn_worker(url, **{FAULT_STEP_DELAY_ENV: "0.3", "ROBUSTDIFF_MAX_WAIT_MS": "0"})
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
    first = spawn_worker(url, **env, **{FAULT_STEP_DELAY_ENV: "0.3"})
    with make_client(url, default_model="tiny") as c:
        job = c.post("/sample", json={"steps": 20, "seeds": 4, "async": True}).json()["id"]
        wait_for(lambda: job_hash(url, job).get("status") == "running")
        second = spawn_worker(url, **env)  # after the first holds the job, so it cannot take it first
        first.kill()
        done = wait_for(lambda: (j := c.get(f"/jobs/{job}").json())["status"] == "done" and j, 20)
    assert job_hash(url, job)["worker"].endswith(str(second.pid))
    assert len(done["result"]["images"]) == 1
