"""Service overhead benchmark: the HTTP service under load vs the same work on Pipeline in one process.

    python bench/bench_service.py --checkpoint models/weights/fmnist-dro-at.safetensors --out bench.json

Without --url it starts `robustdiff serve` (private Redis + one worker) on a free port with the same
checkpoint and device, so both sides run on this machine. It reports, for each side: requests/s,
p50/p99 latency and images/s at saturation (--concurrency clients sending --images-per-request), and
the added latency of one small request (1 image) over its compute time. With --rounds the engine
and the service take turns and the medians are reported; besides images/s (wall clock, which on a
shared machine follows everyone else's load) it compares images per CPU-second: the engine
process's CPU time against the serve process tree's (API, worker(s), Redis), read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from models.bench_cli import BenchParser, positive_int

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and its live descendants (/proc):
    the service's API, worker(s) and Redis, compared by CPU time on a machine others are using."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(procs[pid][1] for pid in tree if pid in procs)


def direct(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """The engine alone: batches of the size the worker would form, and one 1-image call."""
    from models.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(checkpoint, device=args.device)
    sampler = "consistency" if pipe.info.kind == "consistency" else args.sampler
    batch = args.concurrency * args.images_per_request
    pipe.sample(list(range(batch)), sampler=sampler, steps=args.steps)  # warm-up (and CUDA graphs)
    singles = []
    for i in range(args.single_requests):
        t0 = time.perf_counter()
        pipe.sample([i], sampler=sampler, steps=args.steps)
        singles.append(time.perf_counter() - t0)
    rounds = max(1, args.requests // args.concurrency)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for r in range(rounds):
        pipe.sample(list(range(r * batch, (r + 1) * batch)), sampler=sampler, steps=args.steps)
    elapsed = time.perf_counter() - t0
    return {
        "images_per_s": rounds * batch / elapsed,
        "cpu_s_per_image": (time.process_time() - cpu0) / (rounds * batch),
        "batch": batch,
        "single_p50_s": statistics.median(singles),
        "model": pipe.info.name,
        "sampler": sampler,
    }


async def service(
    args: argparse.Namespace, url: str, model: str, sampler: str, root: int | None = None
) -> dict[str, Any]:
    body = {"model": model, "sampler": sampler, "steps": args.steps, "format": "npy"}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for _ in range(3):  # warm-up
            (
                await client.post("/sample", json={**body, "num_images": args.images_per_request})
            ).raise_for_status()
        singles, computes = [], []
        for i in range(args.single_requests):
            t0 = time.perf_counter()
            r = await client.post("/sample", json={**body, "num_images": 1, "seeds": i})
            singles.append(time.perf_counter() - t0)
            r.raise_for_status()
            computes.append(r.json()["timings"]["compute_s"])

        latencies: list[float] = []
        queue = list(range(args.requests))

        async def client_loop() -> None:
            while queue:
                seed = queue.pop() * args.images_per_request
                t0 = time.perf_counter()
                r = await client.post(
                    "/sample", json={**body, "num_images": args.images_per_request, "seeds": seed}
                )
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        t0, cpu0 = time.perf_counter(), tree_cpu_s(root) if root else 0.0
        await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu_s(root) - cpu0 if root else None
    images = args.requests * args.images_per_request
    return {
        "cpu_s_per_image": cpu / images if cpu is not None else None,
        "requests_per_s": args.requests / elapsed,
        "images_per_s": args.requests * args.images_per_request / elapsed,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "single_p50_s": statistics.median(singles),
        "single_compute_p50_s": statistics.median(computes),
    }


def start_serve(args: argparse.Namespace, checkpoint: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    env.update(
        PYTHONPATH=str(ROOT),
        ROBUSTDIFF_MODELS=str(checkpoint),
        ROBUSTDIFF_DEVICE=args.device,
        ROBUSTDIFF_MAX_IMAGES=str(max(64, args.images_per_request)),
        ROBUSTDIFF_MAX_BATCH_IMAGES=str(max(256, args.concurrency * args.images_per_request)),
        ROBUSTDIFF_MAX_QUEUE_DEPTH=str(10 * args.concurrency),
        ROBUSTDIFF_WORKER_METRICS_PORT="0",
        ROBUSTDIFF_LOG_LEVEL="WARNING",
    )
    if args.workers:
        env["ROBUSTDIFF_WORKERS"] = str(args.workers)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=ROOT, stdout=out,
            stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("service not ready within 180 s")


def main() -> int:
    parser = BenchParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="served checkpoint (default: a random tiny one)")
    parser.add_argument("--url", help="an already running service (default: start `robustdiff serve`)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--images-per-request", type=positive_int, default=8)
    parser.add_argument("--concurrency", type=positive_int, default=16)
    parser.add_argument("--requests", type=positive_int, default=128)
    parser.add_argument("--single-requests", type=positive_int, default=20)
    parser.add_argument("--workers", type=positive_int, help="serve's workers (default: serve's own default)")
    parser.add_argument(
        "--rounds", type=positive_int, default=1, help="engine and service in turn this many times; medians"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from models.testing import tiny_checkpoint

            checkpoint = tiny_checkpoint(Path(tmp) / "tiny.safetensors", name="tiny")
        proc = None
        url = args.url
        if url is None:
            from service.redis_server import free_port

            port = free_port()
            proc = start_serve(args, checkpoint, port, Path(tmp) / "serve.log")
            url = f"http://127.0.0.1:{port}"
        rounds: list[dict[str, Any]] = []
        try:
            for r in range(args.rounds):  # in turn, so both sides see the same load on a shared machine
                engine = direct(args, checkpoint)
                root = proc.pid if proc is not None else None
                served = asyncio.run(service(args, url, engine["model"], engine["sampler"], root))
                ratio = served["images_per_s"] / engine["images_per_s"]
                cpu = served["cpu_s_per_image"]
                # images per CPU-second, service / engine: what the service makes of the cores it
                # gets, whatever else shares them (wall-clock images/s follows the other load).
                cpu_ratio = engine["cpu_s_per_image"] / cpu if cpu else None
                rounds.append(
                    {
                        "direct": engine,
                        "service": served,
                        "ratio": ratio,
                        "cpu_ratio": cpu_ratio,
                        "loadavg": os.getloadavg(),
                    }
                )
                print(f"round {r}: direct {engine['images_per_s']:.2f} images/s, service "
                      f"{served['images_per_s']:.2f} ({ratio:.1%}; per CPU-second {cpu_ratio or 0:.1%}), "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
    mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]  # the round with the median ratio
    engine, served = mid["direct"], mid["service"]
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "direct": engine,
        "service": served,
        "service_vs_direct_images_per_s": statistics.median(r["ratio"] for r in rounds),
        "service_vs_direct_images_per_cpu_s": statistics.median(r["cpu_ratio"] for r in rounds)
        if all(r["cpu_ratio"] for r in rounds)
        else None,
        "added_latency_one_small_request_s": served["single_p50_s"] - served["single_compute_p50_s"],
        "added_latency_vs_direct_call_s": served["single_p50_s"] - engine["single_p50_s"],
        "rounds": rounds,
        "torch_threads_direct": os.environ.get("OMP_NUM_THREADS"),
    }
    print(f"direct engine : {engine['images_per_s']:.1f} images/s (batch {engine['batch']}), "
          f"1 image {engine['single_p50_s'] * 1e3:.1f} ms")  # fmt: skip
    print(f"service       : {served['requests_per_s']:.1f} requests/s, {served['images_per_s']:.1f} images/s, "
          f"p50 {served['p50_s'] * 1e3:.1f} ms, p99 {served['p99_s'] * 1e3:.1f} ms")  # fmt: skip
    print(f"service / direct images/s: {result['service_vs_direct_images_per_s']:.1%}")
    if result["service_vs_direct_images_per_cpu_s"]:
        print(f"service / direct images per CPU-second: {result['service_vs_direct_images_per_cpu_s']:.1%}")
    print(f"one small request: p50 {served['single_p50_s'] * 1e3:.1f} ms, of which compute "
          f"{served['single_compute_p50_s'] * 1e3:.1f} ms: added "
          f"{result['added_latency_one_small_request_s'] * 1e3:.1f} ms")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
