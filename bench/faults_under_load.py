"""Faults under load: kill -9 the worker, then the private Redis, of a running `robustdiff serve`.

    python bench/faults_under_load.py --jobs 200 --steps 8 --out bench/results/faults_under_load.json

Each fault gets a fresh `robustdiff serve --workers 1` on loopback (private Redis with its append-only
file, one supervised worker, a tiny checkpoint, the service's default heartbeat and reclaim settings,
one torch thread per process). ``--jobs`` async jobs (npy output, seeds 0..jobs-1) are submitted,
and a second after the first starts running the fault strikes while clients keep going: two async submitters,
two synchronous clients, a poller of every accepted job and a /readyz prober. Every client follows
docs/CLIENT_GUIDE.md: each submission has an Idempotency-Key, and a 503 that names no job is retried
with the same key after its Retry-After. Reported per fault: jobs queued or running at the kill,
time to recovery (first job finished after the kill; /readyz 200 again), the status codes each kind
of client saw before the kill, until recovery and after, and whether every accepted job finished
exactly once (``finishes`` = 1 in its record). Then a fresh, undisturbed service reruns every
accepted request and each result must be bitwise equal (the same .npy bytes). Every loop has a
deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import BASE_ENV, ROOT, machine, tiny_model, wait_until_ready

from service.queue import GROUP, job_key, stream_key
from service.redis_server import free_port

FINAL = ("done", "failed", "cancelled")
# The service's defaults, not the quick ones of the other service benchmarks: recovery is timed as a
# user of `robustdiff serve` would see it.
SERVE_ENV = {
    k: v
    for k, v in BASE_ENV.items()
    if k not in ("ROBUSTDIFF_HEARTBEAT_S", "ROBUSTDIFF_RECLAIM_IDLE_MS", "ROBUSTDIFF_MAX_BATCH_IMAGES")
}


class Serve:
    """`robustdiff serve --workers 1` with its private Redis and supervised worker, as a user runs it."""

    def __init__(self, model: Path, logs: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
        env |= {
            **SERVE_ENV,
            "ROBUSTDIFF_MODELS": str(model),
            "ROBUSTDIFF_DEFAULT_MODEL": "tiny",
            "ROBUSTDIFF_WORKER_METRICS_PORT": "0",
        }
        self.log = logs / f"serve-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--workers", "1", "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{self.port}"
        wait_until_ready(self.base, 180, self.proc, self.log)

    def child(self, what: str) -> psutil.Process:
        for proc in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = proc.cmdline()
            if (what == "redis" and "redis-server" in Path(cmd[0]).name) or (
                what == "worker" and "worker" in cmd
            ):
                return proc
        raise LookupError(what)

    @property
    def redis_url(self) -> str:
        listening = [
            c.laddr.port for c in self.child("redis").net_connections() if c.status == psutil.CONN_LISTEN
        ]
        return f"redis://127.0.0.1:{listening[0]}/0"

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Clients:
    """The load around a fault; every answer is logged as (time, client, status or error name)."""

    def __init__(self, client: httpx.AsyncClient, load_steps: int, interval_s: float) -> None:
        self.client = client
        self.load_steps = load_steps
        self.interval_s = interval_s
        self.log: list[tuple[float, str, str]] = []
        self.requests: dict[str, dict[str, Any]] = {}  # job id -> the request that created it
        self.final: dict[str, str] = {}
        self.arrays: dict[str, str] = {}
        self.stop_load = asyncio.Event()
        self.ready_log: list[tuple[float, int]] = []
        self.double_accepts = 0
        self.attempts: dict[str, list[tuple[float, str]]] = {}  # job id -> its submission's answers

    def note(self, who: str, what: int | str) -> None:
        self.log.append((time.time(), who, str(what)))

    async def submit(self, who: str, body: dict[str, Any], key: str, deadline: float) -> None:
        """POST until the job is accepted (named) or refused for good; retries keep the Idempotency-Key."""
        answers: list[tuple[float, str]] = []
        while time.monotonic() < deadline:
            try:
                r = await self.client.post("/sample", json=body, headers={"Idempotency-Key": key})
            except httpx.HTTPError as err:
                self.note(who, type(err).__name__)
                answers.append((time.time(), type(err).__name__))
                await asyncio.sleep(1.0)
                continue
            named = r.status_code >= 500 and "location" in r.headers
            self.note(who, f"{r.status_code} naming its job" if named else r.status_code)
            answers.append((time.time(), str(r.status_code)))
            if r.status_code in (200, 202) or (r.status_code >= 500 and "location" in r.headers):
                job = r.headers["location"].rsplit("/", 1)[-1]  # every answer naming a job has it
                self.attempts[job] = answers
                if job in self.requests and self.requests[job] != body:
                    self.double_accepts += 1
                self.requests[job] = body
                if r.status_code == 200:
                    self.final[job] = "done"
                    self.arrays[job] = r.json()["array"]
                return
            if r.status_code in (429, 503):
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            raise SystemExit(f"{who}: unexpected {r.status_code}: {r.text[:300]}")

    async def submitter(self, who: str, first_seed: int, sync: bool, deadline: float) -> None:
        n = 0
        while not self.stop_load.is_set() and time.monotonic() < deadline:
            body = {"steps": self.load_steps, "seeds": first_seed + n, "format": "npy", "async": not sync}
            await self.submit(who, body, f"{who}-{first_seed + n}", deadline)
            n += 1
            await asyncio.sleep(self.interval_s)

    async def poller(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            pending = [j for j in self.requests if j not in self.final]
            if not pending and self.stop_load.is_set():
                return
            for j in pending[:50]:
                try:
                    r = await self.client.get(f"/jobs/{j}")
                except httpx.HTTPError as err:
                    self.note("poll", type(err).__name__)
                    continue
                self.note("poll", r.status_code)
                if r.status_code == 200 and r.json()["status"] in FINAL:
                    self.final[j] = r.json()["status"]
                    if r.json()["status"] == "done":
                        self.arrays[j] = r.json()["result"]["array"]
            await asyncio.sleep(0.2)

    async def prober(self, deadline: float) -> None:
        while not self.stop_load.is_set() and time.monotonic() < deadline:
            try:
                code = (await self.client.get("/readyz")).status_code
            except httpx.HTTPError:
                code = 0
            self.ready_log.append((time.time(), code))
            await asyncio.sleep(0.25)


def diagnose(redis_url: str, ids: list[str]) -> list[dict[str, Any]]:
    """Where each unfinished job is: its record, its stream entry and that entry's pending state."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    out = []
    try:
        for j in ids:
            record = {k: v for k, v in r.hgetall(job_key(j)).items() if k not in ("request", "result")}
            key = stream_key(record.get("model", "tiny"))
            entries = [entry_id for entry_id, data in r.xrange(key) if data.get("id") == j]
            pending = [r.xpending_range(key, GROUP, e, e, 1) for e in entries]
            groups = r.xinfo_groups(key)
            out.append({"id": j, "record": record, "entries": entries, "pending": pending, "groups": groups})
    finally:
        r.close()
    return out


def statuses(redis_url: str, ids: list[str]) -> dict[str, dict[str, str]]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        pipe = r.pipeline()
        for j in ids:
            pipe.hgetall(job_key(j))
        return dict(zip(ids, pipe.execute(), strict=True))
    finally:
        r.close()


async def fault_run(
    serve: Serve, fault: Callable[[], None], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
    jobs, steps = args.jobs, args.steps
    deadline = time.monotonic() + args.deadline_s
    redis_url = serve.redis_url  # the same port after a restart
    # Idle connections are dropped before uvicorn's 5 s keep-alive ends, so a request is never sent on
    # a connection the server is closing at that moment (httpx's default is also 5 s: a race).
    limits = httpx.Limits(max_connections=100, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=serve.base, timeout=600, limits=limits) as client:
        c = Clients(client, args.load_steps, args.load_interval_s)
        gate = asyncio.Semaphore(50)

        async def main_job(i: int) -> None:
            async with gate:
                body = {"steps": steps, "seeds": i, "format": "npy", "async": True}
                await c.submit("main", body, f"main-{i}", deadline)

        await asyncio.gather(*(main_job(i) for i in range(jobs)))
        main_ids = list(c.requests)
        tasks = [
            asyncio.create_task(c.poller(deadline)),
            asyncio.create_task(c.prober(deadline)),
            asyncio.create_task(c.submitter("async-1", 100_000, False, deadline)),
            asyncio.create_task(c.submitter("async-2", 200_000, False, deadline)),
            asyncio.create_task(c.submitter("sync-1", 300_000, True, deadline)),
            asyncio.create_task(c.submitter("sync-2", 400_000, True, deadline)),
        ]
        while "running" not in {h.get("status") for h in statuses(redis_url, main_ids).values()}:
            if time.monotonic() > deadline:
                raise SystemExit("no job started before the deadline")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # into the running batch
        at_kill = Counter(h.get("status") for h in statuses(redis_url, main_ids).values())
        t_kill = time.time()
        fault()
        while (
            any(j not in c.final for j in main_ids) or time.time() < t_kill + 20
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        c.stop_load.set()
        await asyncio.gather(*tasks)
    records = statuses(redis_url, list(c.requests))
    finished_after = [float(h["finished"]) for h in records.values() if float(h.get("finished", 0)) > t_kill]
    t_recovered = min(finished_after) if finished_after else float("nan")
    ready_down = [t for t, code in c.ready_log if t > t_kill and code != 200]
    first_down = ready_down[0] if ready_down else t_kill
    ready_back = next((t for t, code in c.ready_log if t > first_down and code == 200), float("nan"))
    windows: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for t, who, what in c.log:
        window = "before_kill" if t < t_kill else "until_recovery" if t < t_recovered else "after_recovery"
        windows[window][who.split("-")[0]][what] += 1
    out = {
        "main_jobs": jobs,
        "main_jobs_at_kill": dict(at_kill),
        "accepted_jobs": len(c.requests),
        "accepted_during_load": len(c.requests) - len(main_ids),
        "recovery_s_first_job_done_after_kill": round(t_recovered - t_kill, 2),
        "readyz_not_200_s_after_kill": [round(first_down - t_kill, 2), round(ready_back - t_kill, 2)]
        if ready_down
        else None,
        "readyz_not_200_answers": len(ready_down),
        "client_statuses": {w: {k: dict(v) for k, v in ws.items()} for w, ws in windows.items()},
        "exactly_once": dict(
            Counter(f"finishes={h.get('finishes')} status={h.get('status')}" for h in records.values())
        ),
        "reruns_after_kill": sum(int(h.get("attempts", 1)) > 1 for h in records.values()),
        "not_final_at_deadline": sum(j not in c.final for j in c.requests),
        "same_job_for_two_requests": c.double_accepts,
        "t_kill": t_kill,
        "unfinished": diagnose(redis_url, [j for j in c.requests if j not in c.final]),
        "unfinished_submissions": {
            j: [(round(t - t_kill, 2), what) for t, what in c.attempts[j]]
            for j in c.requests
            if j not in c.final
        },
    }
    return out, c.requests, c.arrays


async def reference(base: str, requests: list[dict[str, Any]], deadline_s: float) -> list[str]:
    """Run each request once, async, on an undisturbed service; its .npy result (base64) in order."""
    deadline = time.monotonic() + deadline_s
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        gate = asyncio.Semaphore(50)

        async def one(body: dict[str, Any]) -> str:
            async with gate:
                r = await client.post("/sample", json={**body, "async": True})
                while r.status_code == 429:
                    await asyncio.sleep(float(r.headers["retry-after"]))
                    r = await client.post("/sample", json={**body, "async": True})
                job = r.json()["id"]
            while time.monotonic() < deadline:
                s = (await client.get(f"/jobs/{job}")).json()
                if s["status"] == "done":
                    return str(s["result"]["array"])
                if s["status"] in FINAL:
                    return f"({s['status']})"
                await asyncio.sleep(0.3)
            return "(not done)"

        return list(await asyncio.gather(*(one(b) for b in requests)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--steps", type=int, default=8, help="sampler steps of the main jobs")
    p.add_argument("--load-steps", type=int, default=2, help="sampler steps of the jobs the load adds")
    p.add_argument(
        "--load-interval-s", type=float, default=2.0, help="pause of each load client between requests"
    )
    p.add_argument("--faults", default="worker,redis")
    p.add_argument("--deadline-s", type=float, default=400, help="longest one fault run may take")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults_under_load.json")
    args = p.parse_args()
    result: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine(),
        "service_env": SERVE_ENV,
    }
    results: dict[str, tuple[dict[str, dict[str, Any]], dict[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="robustdiff-faults-") as tmp:
        folder = Path(tmp)
        model = tiny_model(folder)
        for name in args.faults.split(","):
            serve = Serve(model, folder)
            try:
                target = serve.child("worker" if name == "worker" else "redis")

                def fault(target: psutil.Process = target) -> None:
                    target.send_signal(signal.SIGKILL)

                out, requests, arrays = asyncio.run(fault_run(serve, fault, args))
            finally:
                serve.close()
            out["serve_log_tail"] = serve.log.read_text(errors="replace")[-1500:]
            out["loadavg_end"] = os.getloadavg()
            result[f"kill_{name}"] = out
            results[name] = (requests, arrays)
            print(name, json.dumps({k: v for k, v in out.items() if k != "serve_log_tail"}), flush=True)
        serve = Serve(model, folder)
        try:
            for name, (requests, arrays) in results.items():
                done = [j for j in requests if j in arrays]
                again = asyncio.run(reference(serve.base, [requests[j] for j in done], args.deadline_s))
                equal = sum(arrays[j] == a for j, a in zip(done, again, strict=True))
                result[f"kill_{name}"]["bitwise_equal_to_undisturbed_rerun"] = f"{equal}/{len(done)}"
                print(name, "bitwise equal", equal, "of", len(done), flush=True)
        finally:
            serve.close()
    result["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
