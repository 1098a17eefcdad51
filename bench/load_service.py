"""Load: N concurrent async clients submit at once, then poll their jobs; then synchronous requests.

    python bench/load_service.py --clients 1000 --small-depth 50 --sync 200 --sync-concurrency 50 \
        --out bench/results/load_service.json

Everything runs on loopback: a private Redis, the API (`robustdiff serve --workers 0`) and one worker
on a tiny checkpoint (1 sampler step), one torch thread each. Reports, per phase: accepted (202) vs
refused (429, each with Retry-After and its spread), any 5xx or connection error, whether every
accepted job finished exactly once (`finishes` = 1 in its record), acceptance latency p50/p99, and the
RSS of the API, worker and Redis before, at peak and after. Every loop has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import ROOT, RssSampler, Stack, machine, percentile, tiny_model

from service.queue import job_key


async def burst(base: str, clients: int, deadline_s: float) -> dict[str, Any]:
    """``clients`` POSTs at once, each on its own connection, then poll every accepted job to the end."""
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latency: list[float] = []
    retry_after: list[int] = []
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post("/sample", json={"steps": 1, "seeds": i, "async": True})
            except httpx.HTTPError as err:
                errors[type(err).__name__] += 1
                return
            latency.append(time.perf_counter() - t0)
            statuses[r.status_code] += 1
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            elif r.status_code == 429:
                retry_after.append(int(r.headers["retry-after"]))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        submit_s = time.perf_counter() - t0
        pending = set(accepted)
        final: Counter[str] = Counter()
        poll_errors = 0
        deadline = time.monotonic() + deadline_s
        while pending and time.monotonic() < deadline:
            ids = list(pending)[:200]
            answers = await asyncio.gather(*(client.get(f"/jobs/{j}") for j in ids), return_exceptions=True)
            for j, a in zip(ids, answers, strict=True):
                if isinstance(a, BaseException) or a.status_code >= 500:
                    poll_errors += 1
                elif a.json().get("status") in ("done", "failed", "cancelled"):
                    final[a.json()["status"]] += 1
                    pending.discard(j)
            await asyncio.sleep(0.2)
        done_s = time.perf_counter() - t0
    return {
        "clients": clients,
        "statuses": dict(statuses),
        "connection_errors": dict(errors),
        "accepted": len(accepted),
        "refused_429": statuses.get(429, 0),
        "status_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "retry_after_min_max_distinct": [min(retry_after), max(retry_after), len(set(retry_after))]
        if retry_after
        else None,
        "acceptance_p50_s": round(percentile(latency, 50), 4),
        "acceptance_p99_s": round(percentile(latency, 99), 4),
        "submit_wall_s": round(submit_s, 2),
        "all_final_wall_s": round(done_s, 2),
        "final": dict(final),
        "not_final_at_deadline": len(pending),
        "poll_errors": poll_errors,
        "_ids": accepted,
    }


async def synchronous(base: str, requests: int, concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latency: list[float] = []
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def one(i: int) -> None:
            async with gate:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/sample", json={"steps": 1, "seeds": 10_000 + i})
                except httpx.HTTPError as err:
                    errors[type(err).__name__] += 1
                    return
                latency.append(time.perf_counter() - t0)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    ids.append(r.json()["job_id"])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    return {
        "requests": requests,
        "concurrency": concurrency,
        "statuses": dict(statuses),
        "connection_errors": dict(errors),
        "status_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "latency_p50_s": round(percentile(latency, 50), 3),
        "latency_p99_s": round(percentile(latency, 99), 3),
        "wall_s": round(wall, 2),
        "_ids": ids,
    }


def exactly_once(url: str, ids: list[str]) -> dict[str, int]:
    """Each job's record: finished once (``finishes`` = 1) and done."""
    r = redis.Redis.from_url(url, decode_responses=True)
    counts: Counter[str] = Counter()
    for j in ids:
        finishes, status = r.hmget(job_key(j), ["finishes", "status"])
        counts[f"finishes={finishes} status={status}"] += 1
    r.close()
    return dict(counts)


def phase(stack: Stack, name: str, run: Any) -> dict[str, Any]:
    with RssSampler(stack.pids()) as rss:
        out: dict[str, Any] = asyncio.run(run)
        time.sleep(2.0)  # let the processes settle before 'after'
        after = rss.now()
    out["exactly_once"] = exactly_once(stack.redis.url, out.pop("_ids"))
    out["rss_mb"] = {"before": rss.before, "peak": rss.peak, "after": after}
    out["loadavg_end"] = os.getloadavg()
    print(name, json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--small-depth", type=int, default=50, help="ROBUSTDIFF_MAX_QUEUE_DEPTH of the second run")
    p.add_argument("--sync", type=int, default=200)
    p.add_argument("--sync-concurrency", type=int, default=50)
    p.add_argument("--deadline-s", type=float, default=600, help="longest wait for the jobs of one phase")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load_service.json")
    args = p.parse_args()
    result: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="robustdiff-load-") as tmp:
        model = tiny_model(Path(tmp))
        stack = Stack(model, Path(tmp))
        try:
            stack.start_worker()
            stack.start_api()
            stack.wait_ready()
            result["default_depth"] = phase(
                stack, "default depth", burst(stack.base, args.clients, args.deadline_s)
            )
            stack.stop_api()
            stack.start_api(ROBUSTDIFF_MAX_QUEUE_DEPTH=str(args.small_depth))
            stack.wait_ready()
            result[f"depth_{args.small_depth}"] = phase(
                stack, f"depth {args.small_depth}", burst(stack.base, args.clients, args.deadline_s)
            )
            result["synchronous"] = phase(
                stack, "synchronous", synchronous(stack.base, args.sync, args.sync_concurrency)
            )
        finally:
            stack.close()
    result["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
