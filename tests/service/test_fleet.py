"""What the API reads of the workers: liveness, readiness and the /models listing (in-process), and
the heartbeats as they cross a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis

from service import fleet
from service.jobs import Heartbeat
from service.queue import HEARTBEATS_KEY, WORKER_CLIENT_PREFIX, JobQueue, connect
from tests.service.test_resolve import entry

NOW = 1000.0
BEATS = {
    "w1": Heartbeat(ts=NOW - 1, models=["a", "b"], metrics="http://w1:9400/metrics"),
    "w2": Heartbeat(ts=NOW - 2, models=["a"]),
    "dead": Heartbeat(ts=NOW - 60, models=["a", "b"], metrics="http://dead:9400/metrics"),
    "loading": Heartbeat(ts=NOW - 1, models=[]),
}


def test_live_workers_have_a_fresh_heartbeat() -> None:
    assert fleet.live_workers(BEATS, NOW, 10.0) == ["w1", "w2", "loading"]


def test_models_list_live_workers_and_the_default() -> None:
    served = {"b": entry("b"), "a": entry("a")}
    listed = fleet.served_models(served, BEATS, NOW, 10.0, "b")
    assert [(m.name, m.workers, m.default) for m in listed] == [("a", 2, False), ("b", 1, True)]
    only = fleet.served_models({"a": entry("a")}, BEATS, NOW, 10.0, "missing")
    assert only[0].default  # the only model served is the default


def test_ready_needs_a_live_connected_worker_with_models() -> None:
    body = fleet.readiness(BEATS, None, NOW, 10.0)
    assert body == {"ready": True, "redis": "ok", "workers": 2, "worker_metrics": ["http://w1:9400/metrics"]}
    assert fleet.readiness(BEATS, {"w2"}, NOW, 10.0)["workers"] == 1  # w1's connection is gone
    assert not fleet.readiness(BEATS, set(), NOW, 10.0)["ready"]
    assert not fleet.readiness({"loading": BEATS["loading"]}, None, NOW, 10.0)["ready"]


def test_a_heartbeat_reads_back_as_the_worker_wrote_it(private_redis: Any) -> None:
    meta = {"pid": 7, "host": "h", "device": "cpu", "metrics": "http://h:9400/metrics"}

    async def round_trip() -> dict[str, Heartbeat]:
        r = connect(private_redis.url)
        try:
            q = JobQueue(r)
            await q.register("w", {"tiny": entry("tiny"), "a": entry("a")}, meta)
            return await q.heartbeats()
        finally:
            await r.aclose()

    before = time.time()
    beats = asyncio.run(round_trip())
    assert list(beats) == ["w"]
    beat = beats["w"]
    assert (beat.pid, beat.host, beat.device, beat.metrics, beat.models) == (
        7,
        "h",
        "cpu",
        meta["metrics"],
        ["a", "tiny"],
    )
    assert before <= beat.ts <= time.time()


def test_a_malformed_heartbeat_is_absent_and_logged(
    private_redis: Any, make_client: Any, caplog: Any
) -> None:
    """An unreadable heartbeat (a broken or foreign writer) once made /readyz, /models and /metrics 500."""
    url = private_redis.url
    r = redis.Redis.from_url(url, decode_responses=True, client_name=WORKER_CLIENT_PREFIX + "good")
    try:
        r.hset("robustdiff:models", "tiny", entry("tiny").model_dump_json())
        good = Heartbeat(ts=time.time() + 3600, models=["tiny"], metrics="http://good:9400/metrics")
        bad = {
            "not-json": "{ts: 1",
            "no-ts": '{"models": ["tiny"]}',
            "a-list": "[1, 2]",
            "ts-text": '{"ts": "soon"}',
        }
        r.hset(HEARTBEATS_KEY, mapping={"good": good.model_dump_json(), **bad})
        with (
            caplog.at_level(logging.WARNING, logger="service.queue"),
            make_client(url, default_model="tiny") as c,
        ):
            ready = c.get("/readyz")
            models = c.get("/models")
            metrics = c.get("/metrics")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"ready": True, "redis": "ok", "workers": 1, "worker_metrics": [good.metrics]}
        assert models.status_code == 200 and [m["workers"] for m in models.json()["models"]] == [1]
        assert metrics.status_code == 200 and "robustdiff_workers_alive 1.0" in metrics.text
        logged = {
            rec.getMessage().split("'")[1]
            for rec in caplog.records
            if "unreadable heartbeat" in rec.getMessage()
        }
        assert logged == set(bad)
        assert set(r.hkeys(HEARTBEATS_KEY)) == {"good", *bad}  # not ours to delete: a newer writer's may be
    finally:
        r.close()


def test_models_list_the_training_seed(private_redis: Any, make_client: Any) -> None:
    """GET /models shows each model's training seed; null for one registered without (an older worker)."""
    r = redis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        old = entry("old").model_dump_json(exclude={"seed"})
        r.hset(
            "robustdiff:models", mapping={"trained": entry("trained", seed=17).model_dump_json(), "old": old}
        )
        with make_client(private_redis.url, default_model="trained") as c:
            listed = c.get("/models")
        assert listed.status_code == 200, listed.text
        assert {m["name"]: m["seed"] for m in listed.json()["models"]} == {"old": None, "trained": 17}
    finally:
        r.close()
