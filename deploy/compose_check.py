"""Checks a running compose stack from the host, over loopback only (called by deploy/compose-check.sh).

Standard library only, so it runs with the host's python3 before any project environment exists:

    python3 deploy/compose_check.py --api http://127.0.0.1:PORT --prometheus http://127.0.0.1:PORT \
        --workers 2 --out result.json

It waits (bounded) for /readyz and for every Prometheus target to be up; with --kill-workers it kills
the workers while async jobs run and requires them back, every job done and the reclaims counted;
then it sends rounds of traffic (a sample, a purification of the sampled image, a refused request,
an async job cancelled), each round seen by a scrape before the next, runs every query of the
Grafana dashboard against the live Prometheus and requires data from each, and requires every
alert rule healthy and none firing. Exit 0 when every check passed; the JSON lists them all.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "robustdiff.json"
PNG_B64 = "iVBORw0KGgo"  # base64 of the PNG signature
# Grafana macros and the template variable, replaced by what plain PromQL accepts (as tests/deploy does).
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$model": ".*"}
# Dashboard queries allowed to return no series in a healthy stack, with the reason.
MAY_BE_EMPTY = {
    "Reclaimed jobs A": "no worker died, so no robustdiff_jobs_reclaimed_total series exists",
}
ROUNDS = 3


class CheckFailed(Exception):
    pass


def http(method: str, url: str, body: Any = None, timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, dict(err.headers), err.read()
    try:
        payload: Any = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode(errors="replace")
    return status, headers, payload


def wait_until(what: str, predicate: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except (OSError, ValueError, KeyError) as err:
            last = err
        time.sleep(every)
    raise CheckFailed(f"{what}: not reached within {timeout:.0f} s (last: {last!r})")


def pngs(payload: Any) -> list[str]:
    """Every base64 PNG anywhere in a JSON answer."""
    if isinstance(payload, str):
        return [payload] if payload.startswith(PNG_B64) else []
    if isinstance(payload, list):
        return [png for item in payload for png in pngs(item)]
    if isinstance(payload, dict):
        return [png for item in payload.values() for png in pngs(item)]
    return []


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        status, _, body = http("GET", f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            raise CheckFailed(f"Prometheus refused {promql!r}: {status} {body}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def total(self, promql: str) -> float:
        found = self.query(f"sum({promql})")
        return float(found[0]["value"][1]) if found else 0.0

    def targets(self) -> list[dict[str, Any]]:
        status, _, body = http("GET", f"{self.url}/api/v1/targets?state=active")
        if status != 200:
            raise CheckFailed(f"/api/v1/targets answered {status}")
        return list(body["data"]["activeTargets"])


class Checks:
    def __init__(self, api: str, prometheus: str, workers: int, timeout: float) -> None:
        self.api = api
        self.prom = Prometheus(prometheus)
        self.workers = workers
        self.timeout = timeout
        self.results: list[dict[str, Any]] = []

    def record(self, name: str, ok: bool, detail: Any) -> None:
        self.results.append({"check": name, "ok": ok, "detail": detail})
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {json.dumps(detail)[:300]}", flush=True)
        if not ok:
            raise CheckFailed(name)

    def readyz(self) -> None:
        def ready() -> Any:
            status, _, body = http("GET", f"{self.api}/readyz", timeout=5)
            return body if status == 200 else None

        self.record("api /readyz is 200", True, wait_until("/readyz 200", ready, self.timeout, every=2))

    def targets_up(self) -> None:
        expected = {"robustdiff-api": 1, "robustdiff-worker": self.workers, "prometheus": 1}

        def all_up() -> Any:
            targets = self.prom.targets()
            up: dict[str, int] = {}
            for target in targets:
                if target["health"] != "up":
                    return None
                job = target["labels"]["job"]
                up[job] = up.get(job, 0) + 1
            return up if up == expected else None

        up = wait_until(f"every Prometheus target up ({expected})", all_up, self.timeout, every=2)
        self.record("every Prometheus target is up", True, up)

    def traffic(self) -> dict[str, int]:
        """Rounds of traffic, each seen by a Prometheus scrape before the next (rates need two samples)."""
        counts = {"generated": 0, "purified": 0, "refused": 0}
        for i in range(ROUNDS):
            request = {"num_images": 2, "sampler": "ddim", "steps": 2, "seeds": i}
            status, _, body = http("POST", f"{self.api}/sample", request)
            images = pngs(body)
            self.record(f"/sample round {i}", status == 200 and len(images) == 2, {"status": status})
            counts["generated"] += 2
            status, _, body = http(
                "POST",
                f"{self.api}/purify",
                {"images": images[:1], "strength": "light", "steps": 2, "seeds": i},
            )
            self.record(f"/purify round {i}", status == 200 and len(pngs(body)) == 1, {"status": status})
            counts["purified"] += 1
            status, _, body = http("POST", f"{self.api}/sample", {"steps": 0})
            self.record(f"refused request round {i} is 422", status == 422, body)
            counts["refused"] += 1
            wait_until(
                f"round {i} scraped by Prometheus",
                lambda: (
                    self.prom.total("robustdiff_images_generated_total") >= counts["generated"]
                    and self.prom.total("robustdiff_images_purified_total") >= counts["purified"]
                    and self.prom.total('robustdiff_requests_total{route="/sample",status="422"}')
                    >= counts["refused"]
                ),
                60,
                every=2,
            )
        self.async_and_cancel()
        return counts

    def async_and_cancel(self) -> None:
        status, headers, body = http(
            "POST", f"{self.api}/sample", {"num_images": 1, "steps": 200, "async": True}
        )
        location = headers.get("Location") or headers.get("location")
        self.record("async /sample is 202 with a Location", status == 202 and bool(location), body)
        status, _, body = http("DELETE", f"{self.api}{location}")
        self.record("DELETE of the job is 200, 202 or 409", status in (200, 202, 409), body)
        settled = wait_until(
            "the cancelled job to settle",
            lambda: http("GET", f"{self.api}{location}")[2].get("status") in ("cancelled", "done"),
            60,
        )
        self.record("the cancelled job settles", bool(settled), location)

    def workers_killed(self, kill: str) -> None:
        """Workers killed with jobs in flight: restarted (restart policy), they reclaim and finish every job."""
        locations = []
        for i in range(4):
            request = {"num_images": 2, "sampler": "ddim", "steps": 50, "seeds": 100 + i, "async": True}
            status, headers, body = http("POST", f"{self.api}/sample", request)
            if status != 202:
                self.record("async jobs accepted before the kill", False, body)
            locations.append(headers.get("Location") or headers.get("location"))

        def statuses() -> list[str]:
            return [http("GET", f"{self.api}{location}")[2]["status"] for location in locations]

        def all_finished() -> list[str] | None:
            found = statuses()
            return found if all(status in ("done", "failed", "cancelled") for status in found) else None

        def one_running() -> list[str] | None:
            found = statuses()
            return found if "running" in found else None

        before = wait_until("a job running", one_running, 120, every=0.2)
        killed = subprocess.run(shlex.split(kill), capture_output=True, text=True, timeout=60)
        self.record(
            f"workers killed ({kill})", killed.returncode == 0, {"jobs": before, "stderr": killed.stderr}
        )
        finished = wait_until("every job of the killed workers finished", all_finished, self.timeout, every=2)
        self.record("every accepted job finished after the kill", set(finished) == {"done"}, finished)
        self.targets_up()
        reclaimed = wait_until(
            "robustdiff_jobs_reclaimed_total scraped",
            lambda: self.prom.total("robustdiff_jobs_reclaimed_total"),
            60,
            every=2,
        )
        self.record("reclaimed jobs counted", reclaimed >= 1, reclaimed)

    def dashboard(self, may_be_empty: dict[str, str]) -> None:
        dashboard = json.loads(DASHBOARD.read_text())
        for variable in dashboard.get("templating", {}).get("list", []):
            promql = variable["query"]["query"]
            metric, label = promql.removeprefix("label_values(").removesuffix(")").split(", ")
            query = urllib.parse.urlencode({"match[]": metric})
            status, _, body = http("GET", f"{self.prom.url}/api/v1/label/{label}/values?{query}")
            self.record(f"dashboard variable {variable['name']}", status == 200 and bool(body["data"]), body)
        empty, allowed, series = [], {}, 0
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if not target.get("expr"):
                    continue
                where = f"{panel['title']} {target['refId']}"
                promql = target["expr"]
                for macro, value in GRAFANA_SUBSTITUTIONS.items():
                    promql = promql.replace(macro, value)
                found = self.prom.query(promql)
                series += len(found)
                if not found:
                    if where in may_be_empty:
                        allowed[where] = may_be_empty[where]
                    else:
                        empty.append(f"{where}: {promql}")
        queries = sum(1 for panel in dashboard["panels"] for t in panel.get("targets", []) if t.get("expr"))
        self.record(
            "every dashboard query returns data",
            not empty,
            {"queries": queries, "series": series, "empty": empty, "empty_allowed": allowed},
        )

    def alert_rules(self) -> None:
        status, _, body = http("GET", f"{self.prom.url}/api/v1/rules")
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        bad = [(rule["name"], rule.get("lastError")) for rule in rules if rule.get("health") != "ok"]
        self.record(
            "alert rules loaded and healthy",
            status == 200 and bool(rules) and not bad,
            {"rules": len(rules), "bad": bad},
        )

    def no_alerts(self) -> None:
        status, _, body = http("GET", f"{self.prom.url}/api/v1/alerts")
        firing = [alert for alert in body["data"]["alerts"] if alert["state"] == "firing"]
        pending = [
            alert["labels"]["alertname"] for alert in body["data"]["alerts"] if alert["state"] != "firing"
        ]
        self.record("no alert firing", status == 200 and not firing, {"firing": firing, "pending": pending})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", required=True, help="http://127.0.0.1:PORT of the API")
    parser.add_argument("--prometheus", required=True, help="http://127.0.0.1:PORT of Prometheus")
    parser.add_argument("--workers", type=int, default=1, help="worker replicas Prometheus must find")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument(
        "--kill-workers",
        metavar="CMD",
        help="command that kills every worker (e.g. podman kill ...) while jobs run; they must come back",
    )
    args = parser.parse_args(argv)
    for url in (args.api, args.prometheus):
        host = urllib.parse.urlsplit(url).hostname or ""
        if not (host == "localhost" or host.startswith("127.") or host == "::1"):
            parser.error(f"{url}: only loopback addresses are checked")
    checks = Checks(args.api, args.prometheus, args.workers, args.timeout)
    ok = True
    try:
        checks.readyz()
        checks.targets_up()
        # Workers killed first: the traffic after their restart then feeds every rate() on the dashboard.
        if args.kill_workers:
            checks.workers_killed(args.kill_workers)
        traffic = checks.traffic()
        checks.record("traffic sent", True, traffic)
        # Two more scrapes (15 s interval) after the traffic, so every rate() sees the last round.
        time.sleep(32)
        checks.dashboard({} if args.kill_workers else MAY_BE_EMPTY)
        checks.alert_rules()
        checks.no_alerts()
    except CheckFailed as err:
        ok = False
        print(f"compose check failed: {err}", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps({"ok": ok, "checks": checks.results}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
