"""A real Prometheus scrapes a real API and worker: every dashboard and alert query runs and the core series
carry data.

The offline tests (test_deploy_prometheus) prove the PromQL parses; this one proves it matches what the
service actually exports: a private redis-server, `robustdiff serve` (API only) and one `robustdiff worker`
serving a tiny checkpoint, scraped every second by /usr/bin/prometheus with deploy/prometheus/alerts.yml
loaded. Traffic is sent in rounds, each one seen by a scrape before the next, so every rate() has two
distinct samples to work with.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import yaml
from PIL import Image

from models.testing import tiny_checkpoint
from service.queue import HEARTBEATS_KEY
from service.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
MODEL = "tiny"
ROUNDS = 3
REQUEST_TIMEOUT_S = 20  # the API answers 504 after this, so a dead worker fails fast

# Dashboard queries allowed to return no series in a healthy stack, with the reason.
MAY_BE_EMPTY = {
    # The counter has a model label and is only created when a job is reclaimed from a dead worker.
    "dashboard: Reclaimed jobs A": "no worker died, so no robustdiff_jobs_reclaimed_total series exists",
}


def robustdiff_command() -> list[str]:
    script = Path(sys.executable).parent / "robustdiff"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def service_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    return {
        **base,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ROBUSTDIFF_LOG_LEVEL": "WARNING",
        **extra,
    }


@dataclass
class Child:
    """One child process with its log file; ``stop`` terminates, then kills."""

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
        child = cls(name, log_dir / f"{name}.log")
        with child.log_path.open("wb") as log:
            child.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return child

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Stack:
    api: str
    prom: str
    children: dict[str, Child] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {c.name} log ---\n{c.log()}" for c in self.children.values())


def wait_until(predicate: Callable[[], Any], what: str, timeout: float, children: list[Child]) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for child in children:
            child.check_alive()
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as err:
            last_error = err
        time.sleep(0.2)
    logs = "\n".join(f"--- {c.name} log ---\n{c.log()}" for c in children)
    raise AssertionError(f"{what} not reached within {timeout} s (last error: {last_error!r})\n{logs}")


def query(prom: str, promql: str) -> dict[str, Any]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body.get("status") == "success", f"{promql!r}: {r.status_code} {r.text}"
    return body["data"]


def values(prom: str, promql: str) -> list[tuple[dict[str, str], float]]:
    """The instant vector (or scalar) as (labels, value) pairs."""
    data = query(prom, promql)
    if data["resultType"] == "vector":
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]
    if data["resultType"] == "scalar":
        return [({}, float(data["result"][1]))]
    raise AssertionError(f"{promql!r}: unexpected result type {data['resultType']}")


def total(prom: str, promql: str) -> float:
    found = values(prom, f"sum({promql})")
    return found[0][1] if found else 0.0


def worker_registered(redis_url: str) -> bool:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        beats = client.hgetall(HEARTBEATS_KEY)
    finally:
        client.close()
    return any(MODEL in json.loads(beat).get("models", []) for beat in beats.values())


def grey_png_b64(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def prometheus_config(tmp_path: Path, api_port: int, worker_port: int) -> Path:
    rules = tmp_path / "alerts.yml"
    shutil.copyfile(ALERTS, rules)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "robustdiff-api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]},
            {"job_name": "robustdiff-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def send_round(client: httpx.Client, i: int, counts: dict[str, int]) -> None:
    """One round of traffic: a 2-step DDIM sample, a purification and a refused request."""
    r = client.post(
        "/sample", json={"model": MODEL, "num_images": 2, "sampler": "ddim", "steps": 2, "seeds": i}
    )
    assert r.status_code == 200, r.text
    counts["generated"] += 2
    r = client.post(
        "/purify",
        json={"model": MODEL, "images": [grey_png_b64(i)], "strength": "light", "steps": 2, "seeds": i},
    )
    assert r.status_code == 200, r.text
    counts["purified"] += 1
    r = client.post("/sample", json={"model": MODEL, "steps": 0})
    assert r.status_code == 422, r.text
    counts["refused"] += 1


def async_and_cancel(client: httpx.Client, children: list[Child]) -> None:
    r = client.post("/sample", json={"model": MODEL, "num_images": 1, "steps": 200, "async": True})
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    cancel = client.delete(location)
    # Cancelled while queued (200), while running (202), or it was already done (409): all fine here.
    assert cancel.status_code in (200, 202, 409), cancel.text
    wait_until(
        lambda: client.get(location).json()["status"] in ("cancelled", "done"),
        "the cancelled job to settle",
        30,
        children,
    )


def drive_traffic(stack: Stack) -> dict[str, int]:
    """Rounds of traffic, each seen by a scrape before the next, then one async job cancelled."""
    procs = list(stack.children.values())
    counts = {"generated": 0, "purified": 0, "refused": 0}
    with httpx.Client(base_url=stack.api, timeout=REQUEST_TIMEOUT_S + 10) as client:
        for i in range(ROUNDS):
            send_round(client, i, counts)
            # Rates need the counters to grow between scrapes, not a series appearing at its final value.
            wait_until(
                lambda: (
                    total(stack.prom, f'robustdiff_images_generated_total{{model="{MODEL}"}}')
                    == counts["generated"]
                    and total(stack.prom, f'robustdiff_images_purified_total{{model="{MODEL}"}}')
                    == counts["purified"]
                    and total(stack.prom, 'robustdiff_requests_total{route="/sample",status="422"}')
                    == counts["refused"]
                ),
                f"round {i} scraped",
                20,
                procs,
            )
        async_and_cancel(client, procs)
    return counts


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A missing Prometheus must fail loudly: skipping would leave the dashboards untested against real data.
    missing = [str(p) for p in (PROMETHEUS, PROMTOOL) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: install Debian's prometheus "
            "(apt-get install --no-install-recommends prometheus), which ships prometheus and promtool"
        )
    tmp = tmp_path_factory.mktemp("prometheus-live")
    checkpoint = tiny_checkpoint(tmp / f"{MODEL}.safetensors", name=MODEL)
    api_port, worker_port, prom_port = free_port(), free_port(), free_port()
    while len({api_port, worker_port, prom_port}) < 3:
        worker_port, prom_port = free_port(), free_port()
    redis_server = RedisServer().start()
    children: dict[str, Child] = {}
    try:
        common = {"ROBUSTDIFF_REDIS_URL": redis_server.url, "ROBUSTDIFF_DEVICE": "cpu"}
        children["worker"] = Child.start(
            "worker",
            [*robustdiff_command(), "worker"],
            tmp,
            service_env(
                **common,
                ROBUSTDIFF_MODELS=str(checkpoint),
                ROBUSTDIFF_WORKER_METRICS_PORT=str(worker_port),
                ROBUSTDIFF_MAX_WAIT_MS="5",
            ),
        )
        children["api"] = Child.start(
            "api",
            [*robustdiff_command(), "serve", "--host", "127.0.0.1", "--port", str(api_port)],
            tmp,
            service_env(
                **common, ROBUSTDIFF_DEFAULT_MODEL=MODEL, ROBUSTDIFF_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S)
            ),
        )
        children["prometheus"] = Child.start(
            "prometheus",
            [
                str(PROMETHEUS),
                f"--config.file={prometheus_config(tmp, api_port, worker_port)}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp,
        )
        stack = Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}", children)
        procs = list(children.values())
        # Wait on the worker's heartbeat and the API's liveness first, so that /readyz is asked only once
        # ready: its 503s would count as 5xx answers (see test_alert_rules_load_evaluate_and_stay_silent).
        wait_until(lambda: worker_registered(redis_server.url), "worker heartbeat in Redis", 90, procs)
        wait_until(
            lambda: httpx.get(f"{stack.api}/healthz", timeout=2).status_code == 200, "API /healthz", 60, procs
        )
        wait_until(
            lambda: httpx.get(f"{stack.api}/readyz", timeout=2).status_code == 200, "API /readyz", 10, procs
        )
        wait_until(
            lambda: httpx.get(f"{stack.prom}/-/ready", timeout=2).status_code == 200,
            "Prometheus ready",
            30,
            procs,
        )
        wait_until(
            lambda: (
                {s["job"] for s, v in values(stack.prom, "up == 1")}
                >= {"robustdiff-api", "robustdiff-worker"}
            ),
            "both targets scraped up",
            30,
            procs,
        )
        try:
            stack.traffic = drive_traffic(stack)
        except (AssertionError, httpx.HTTPError) as err:
            raise AssertionError(f"traffic failed: {err}\n{stack.diagnostics()}") from err
        # Two more scrapes, and a rule evaluation, after the traffic.
        time.sleep(2.5)
        yield stack
    finally:
        for name in ("prometheus", "api", "worker"):
            if name in children:
                children[name].stop()
        redis_server.close()


def test_every_dashboard_and_alert_query_succeeds(
    stack: Stack, dashboard_exprs: list, alert_exprs: list
) -> None:
    failures = []
    empty = []
    for expr in [*dashboard_exprs, *alert_exprs]:
        try:
            data = query(stack.prom, expr.promql)
        except (AssertionError, httpx.HTTPError, ValueError) as err:
            failures.append(f"{expr.where}: {err}")
            continue
        if expr.where.startswith("dashboard:") and not data["result"] and expr.where not in MAY_BE_EMPTY:
            empty.append(f"{expr.where}: {expr.promql}")
    assert not failures, "queries refused by Prometheus:\n" + "\n".join(failures)
    assert not empty, (
        "dashboard queries with no data after traffic:\n" + "\n".join(empty) + stack.diagnostics()
    )


def _finite(found: list[tuple[dict[str, str], float]]) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for labels, v in found if math.isfinite(v)]


def test_core_series_carry_data(stack: Stack) -> None:
    prom = stack.prom
    by_route = {
        (s["route"], s["status"]): v
        for s, v in values(prom, "sum by (route, status) (robustdiff_requests_total)")
    }
    assert by_route.get(("/sample", "200"), 0) >= ROUNDS, by_route
    assert by_route.get(("/purify", "200"), 0) >= ROUNDS, by_route
    assert by_route.get(("/sample", "422"), 0) == ROUNDS, by_route
    assert by_route.get(("/sample", "202"), 0) >= 1, by_route
    assert any(route == "/jobs/{job_id}" for route, _ in by_route), by_route
    rates = values(prom, "sum by (route, status) (rate(robustdiff_requests_total[1m]))")
    assert any(s.get("route") == "/sample" and s.get("status") == "200" and v > 0 for s, v in rates), rates

    assert total(prom, f'robustdiff_images_generated_total{{model="{MODEL}"}}') >= stack.traffic["generated"]
    assert total(prom, f'robustdiff_images_purified_total{{model="{MODEL}"}}') == stack.traffic["purified"]

    def quantile(metric: str, by: str = "le", q: float = 0.5) -> list[tuple[dict[str, str], float]]:
        found = _finite(values(prom, f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket[1m])))"))
        assert found, f"no finite p{int(q * 100)} of {metric}"
        return found

    (p50,) = quantile("robustdiff_request_duration_seconds")
    assert 0 < p50[1] < 60, p50
    batch = quantile("robustdiff_batch_size", "le, model")
    # histogram_quantile interpolates inside a bucket: batches of 1 land in (0, 1], not at 1.
    assert {s["model"] for s, _ in batch} == {MODEL} and all(0 < v <= 512 for _, v in batch), batch
    inference = quantile("robustdiff_inference_duration_seconds", "le, kind, sampler")
    assert {(s["kind"], s["sampler"]) for s, _ in inference} >= {("sample", "ddim"), ("purify", "ddim")}, (
        inference
    )
    waits = quantile("robustdiff_queue_wait_seconds", "le, model, kind")
    assert {s["kind"] for s, _ in waits} >= {"sample", "purify"}, waits
    quantile("robustdiff_step_duration_seconds", "le, model, sampler")
    jobs = {
        (s["kind"], s["status"]): v for s, v in values(prom, "sum by (kind, status) (robustdiff_jobs_total)")
    }
    assert jobs.get(("sample", "done"), 0) >= ROUNDS and jobs.get(("purify", "done"), 0) == ROUNDS, jobs

    assert values(prom, "max(robustdiff_workers_alive)") == [({}, 1.0)]
    assert values(prom, 'count(up{job="robustdiff-worker"} == 1)') == [({}, 1.0)]
    queue = values(prom, "max by (model) (robustdiff_queue_size)")
    assert [(s["model"], v) for s, v in queue] == [(MODEL, 0.0)], queue
    assert values(prom, "max(robustdiff_dead_letter_size)") == [({}, 0.0)]
    ages = values(prom, "max by (worker) (robustdiff_worker_heartbeat_age_seconds)")
    assert len(ages) == 1 and 0 <= ages[0][1] < 60, ages
    assert [v for _, v in values(prom, "max by (worker) (robustdiff_gpu_memory_used_bytes)")] == [0.0]


def test_alert_rules_load_evaluate_and_stay_silent(stack: Stack, alert_rules: list[dict]) -> None:
    def evaluated() -> list[dict]:
        r = httpx.get(f"{stack.prom}/api/v1/rules", timeout=10)
        rules = [rule for group in r.json()["data"]["groups"] for rule in group["rules"]]
        return (
            rules if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules) else []
        )

    rules = wait_until(evaluated, "every alert rule evaluated", 15, list(stack.children.values()))
    assert sorted(rule["name"] for rule in rules) == sorted(rule["alert"] for rule in alert_rules)
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    alerts = httpx.get(f"{stack.prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    errors = values(stack.prom, 'sum by (route, status) (robustdiff_requests_total{status=~"5.."})')
    assert alerts == [], f"a healthy stack raised alerts: {alerts}; 5xx answers: {errors}"
