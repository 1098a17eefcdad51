"""What the API reads of the workers, in-process: liveness, readiness and the /models listing."""

from __future__ import annotations

from service import fleet
from tests.service.test_resolve import entry

NOW = 1000.0
BEATS = {
    "w1": {"ts": NOW - 1, "models": ["a", "b"], "metrics": "http://w1:9400/metrics"},
    "w2": {"ts": NOW - 2, "models": ["a"]},
    "dead": {"ts": NOW - 60, "models": ["a", "b"], "metrics": "http://dead:9400/metrics"},
    "loading": {"ts": NOW - 1, "models": []},
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
