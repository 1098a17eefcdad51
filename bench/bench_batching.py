"""Step policies of the step-level batching (and optionally the previous batching), interleaved in
one run on the same machine.

    python bench/bench_batching.py --policies fifo,srpt --out batching.json
    git archive 0fe9eac | tar -x -C /tmp/robustdiff-before       # the tree before step-level batching
    python bench/bench_batching.py --old-src /tmp/robustdiff-before --policies fifo --out batching.json

Starts `robustdiff serve` (private Redis, API, one worker with one torch thread) from this tree once
per ``--policies`` entry (``ROBUSTDIFF_SCHEDULER_POLICY``; the side is named for it) and, with
``--old-src``, from that tree ("old"), all with the same checkpoint, then runs each workload on each
side in turn, rotating which goes first, ``--rounds`` times; ratios are against the first side:

- A (head-of-line): a ``--long-images``-image DDPM-``--long-steps`` job every ``--long-every-s``
  seconds plus Poisson arrivals of 1-image DDIM-``--short-steps`` requests at half the engine's
  capacity for them (0.5 / the first policy side's solo latency of one such request). Reports the short
  requests' p50 / p99 latency divided by their solo latency (target: p99 <= 3x).
- B (saturation, mixed): ``--clients`` clients each sending ``--b-requests`` / clients requests of
  random steps (5/10/20/50), sampler (ddpm, ddim, dpm-solver++) and 1-4 images. images/s.
- C (uniform): the same clients all sending 4-image DDIM-10 requests (the old batching's best case).

For every run: images/s, p50 / p99 latency per class, and the mean running batch size a job saw
(its ``timings.batch_images``, weighted by its images x steps). The load average is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _stack import percentile, wait_until_ready

from models.bench_cli import BenchParser, positive_int

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def start_serve(
    src: Path, checkpoint: Path, port: int, log: Path, max_batch: int, policy: str | None
) -> subprocess.Popen[bytes]:
    """`robustdiff serve` from the source tree ``src``, one torch thread in its worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    if policy is not None:
        env["ROBUSTDIFF_SCHEDULER_POLICY"] = policy
    env.update(
        PYTHONPATH=str(src),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        ROBUSTDIFF_MODELS=f"bench={checkpoint}",
        ROBUSTDIFF_DEFAULT_MODEL="bench",
        ROBUSTDIFF_DEVICE="cpu",
        ROBUSTDIFF_MAX_IMAGES="8",
        ROBUSTDIFF_MAX_BATCH_IMAGES=str(max_batch),
        ROBUSTDIFF_MAX_QUEUE_DEPTH="1000",
        ROBUSTDIFF_WORKER_METRICS_PORT="0",
        ROBUSTDIFF_LOG_LEVEL="WARNING",
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=src, stdout=out,
            stderr=out,
        )  # fmt: skip
    wait_until_ready(f"http://127.0.0.1:{port}", 300, proc, log)
    return proc


class Recorder:
    """Latencies per request class, images done, and each job's batch size weighted by its work."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.images = 0
        self.weighted_batch = 0.0
        self.work = 0

    async def post(self, client: httpx.AsyncClient, cls: str, body: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        r = await client.post("/sample", json={**body, "format": "npy"})
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        out = r.json()
        self.latency.setdefault(cls, []).append(elapsed)
        n = body.get("num_images", 1)
        self.images += n
        self.weighted_batch += out["timings"]["batch_images"] * n * body["steps"]
        self.work += n * body["steps"]

    def summary(self, elapsed: float) -> dict[str, Any]:
        return {
            "elapsed_s": elapsed,
            "images": self.images,
            "images_per_s": self.images / elapsed,
            "mean_batch_images": self.weighted_batch / max(1, self.work),
            "classes": {
                cls: {"n": len(v), "p50_s": percentile(v, 50), "p99_s": percentile(v, 99)}
                for cls, v in sorted(self.latency.items())
            },
        }


async def solo(url: str, body: dict[str, Any], n: int) -> float:
    """Median latency of one request at a time on an idle service."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        times = []
        for i in range(n + 1):
            t0 = time.perf_counter()
            (
                await client.post("/sample", json={**body, "seeds": 10_000 + i, "format": "npy"})
            ).raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first pays any cold start


async def workload_a(url: str, args: argparse.Namespace, rate: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    rec = Recorder()
    long_body = {"sampler": "ddpm", "steps": args.long_steps, "num_images": args.long_images}
    short_body = {"sampler": "ddim", "steps": args.short_steps, "num_images": 1}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=200)) as c:
        tasks = []
        t0 = time.perf_counter()
        next_long, next_short, i = 0.0, rng.expovariate(rate), 0
        while True:
            now = time.perf_counter() - t0
            if now >= args.a_seconds:
                break
            if next_long <= now:
                tasks.append(asyncio.create_task(rec.post(c, "long", {**long_body, "seeds": 50_000 + i})))
                next_long += args.long_every_s
            if next_short <= now:
                tasks.append(asyncio.create_task(rec.post(c, "short", {**short_body, "seeds": 90_000 + i})))
                next_short += rng.expovariate(rate)
            i += 1
            await asyncio.sleep(max(0.0, min(next_long, next_short) - (time.perf_counter() - t0)))
        await asyncio.gather(*tasks)
        return rec.summary(time.perf_counter() - t0)


async def closed_loop(
    url: str, args: argparse.Namespace, bodies: list[tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    rec = Recorder()
    queue = list(enumerate(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as c:

        async def client_loop() -> None:
            while queue:
                i, (cls, body) = queue.pop(0)
                await rec.post(c, cls, {**body, "seeds": 200_000 + 16 * i})

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        return rec.summary(time.perf_counter() - t0)


def mixed_bodies(n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps = rng.choice((5, 10, 20, 50))
        body = {"sampler": rng.choice(SAMPLERS), "steps": steps, "num_images": rng.randint(1, 4)}
        out.append((f"steps-{steps}", body))
    return out


def main() -> int:
    parser = BenchParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="fifo,srpt", help="ROBUSTDIFF_SCHEDULER_POLICY of each side")
    parser.add_argument("--old-src", type=Path, help="also serve this source tree (the previous batching)")
    parser.add_argument("--checkpoint", type=Path, help="served checkpoint (default: a random tiny one)")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--max-batch", type=positive_int, default=64, help="ROBUSTDIFF_MAX_BATCH_IMAGES")
    parser.add_argument("--long-steps", type=positive_int, default=250)
    parser.add_argument("--long-images", type=positive_int, default=4)
    parser.add_argument("--long-every-s", type=float, default=5.0)
    parser.add_argument("--short-steps", type=positive_int, default=10)
    parser.add_argument("--a-seconds", type=float, default=30.0)
    parser.add_argument("--b-requests", type=positive_int, default=32)
    parser.add_argument("--c-requests", type=positive_int, default=16)
    parser.add_argument("--clients", type=positive_int, default=8)
    parser.add_argument("--solo-requests", type=positive_int, default=5)
    parser.add_argument("--only", default="ABC", help="workloads to run, e.g. AB")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--summarise", type=Path, help="only recompute the summary of this results JSON")
    args = parser.parse_args()
    if args.summarise is not None:
        return resummarise(args.summarise)
    policies = [p for p in args.policies.split(",") if p]
    if not policies or not set(policies) <= {"auto", "fifo", "srpt"} or len(set(policies)) < len(policies):
        parser.error(f"--policies {args.policies}: distinct names out of auto, fifo, srpt")
    if args.old_src is not None and not (args.old_src / "service" / "worker.py").is_file():
        parser.error(f"--old-src {args.old_src}: not a robustdiff source tree")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out}: is a folder")

    from service.redis_server import free_port

    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads_per_process": 1},
        "load_before": os.getloadavg(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from models.testing import tiny_checkpoint

            checkpoint = tiny_checkpoint(Path(tmp) / "tiny.safetensors", name="bench")
        sides: dict[str, tuple[Path, str | None]] = {p: (ROOT, p) for p in policies}
        if args.old_src is not None:
            sides = {"old": (args.old_src.resolve(), None), **sides}
        procs, urls = {}, {}
        try:
            for side, (src, policy) in sides.items():
                port = free_port()
                log = Path(tmp) / f"{side}.log"
                procs[side] = start_serve(src, checkpoint, port, log, args.max_batch, policy)
                urls[side] = f"http://127.0.0.1:{port}"
            short = {"sampler": "ddim", "steps": args.short_steps, "num_images": 1}
            solos = {side: asyncio.run(solo(urls[side], short, args.solo_requests)) for side in sides}
            rate = 0.5 / solos[policies[0]]
            results.update(solo_short_s=solos, short_rate_per_s=rate)
            print(
                f"solo 1-image DDIM-{args.short_steps}: "
                + ", ".join(f"{s} {v * 1e3:.0f} ms" for s, v in solos.items())
            )
            for r in range(args.rounds):
                names = list(sides)
                order = names[r % len(names) :] + names[: r % len(names)]
                for workload in args.only:
                    for side in order:
                        load = os.getloadavg()
                        if workload == "A":
                            out = asyncio.run(workload_a(urls[side], args, rate, seed=r))
                            for cls in out["classes"].values():
                                cls["p50_over_solo"] = cls["p50_s"] / solos[side]
                                cls["p99_over_solo"] = cls["p99_s"] / solos[side]
                        elif workload == "B":
                            out = asyncio.run(closed_loop(urls[side], args, mixed_bodies(args.b_requests, r)))
                        else:
                            body = {"sampler": "ddim", "steps": 10, "num_images": 4}
                            out = asyncio.run(
                                closed_loop(urls[side], args, [("ddim-10x4", body)] * args.c_requests)
                            )
                        out.update(round=r, workload=workload, side=side, load_avg=load)
                        results["runs"].append(out)
                        classes = ", ".join(
                            f"{cls} p50 {v['p50_s']:.2f} s p99 {v['p99_s']:.2f} s"
                            for cls, v in out["classes"].items()
                        )
                        print(f"round {r} {workload} {side}: {out['images_per_s']:.2f} images/s, "
                              f"mean batch {out['mean_batch_images']:.1f}, {classes}, load {load[0]:.1f}",
                              flush=True)  # fmt: skip
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGINT)
            for proc in procs.values():
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    results["load_after"] = os.getloadavg()
    results["summary"] = summarise(results["runs"], list(sides), results.get("solo_short_s", {}))
    print(json.dumps(results["summary"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def summarise(runs: list[dict[str, Any]], sides: list[str], solos: dict[str, float]) -> dict[str, Any]:
    """Medians over rounds per (workload, side), and each side's images/s over the first side's.

    A request alone runs the same way under every step policy, so workload A's latencies are also
    divided by one common solo latency (the median of the sides' solo measurements): on a busy
    machine two solo measurements of the same path differ by tens of percent."""
    out: dict[str, Any] = {}
    common = statistics.median(solos.values()) if solos else None
    for workload in sorted({r["workload"] for r in runs}):
        per: dict[str, Any] = {}
        for side in sides:
            mine = [r for r in runs if r["workload"] == workload and r["side"] == side]
            classes = sorted({c for r in mine for c in r["classes"]})
            per[side] = {
                "images_per_s": statistics.median(r["images_per_s"] for r in mine),
                "mean_batch_images": statistics.median(r["mean_batch_images"] for r in mine),
                "classes": {
                    c: {
                        k: statistics.median(r["classes"][c][k] for r in mine if c in r["classes"])
                        for k in mine[0]["classes"].get(c, {})
                        if k != "n"
                    }
                    for c in classes
                },
            }
        if workload == "A" and common is not None:
            per["common_solo_s"] = common
            for side in sides:
                for c in per[side]["classes"].values():
                    c["p50_over_common_solo"] = c["p50_s"] / common
                    c["p99_over_common_solo"] = c["p99_s"] / common
        for side in sides[1:]:
            per[f"{side}_over_{sides[0]}_images_per_s"] = (
                per[side]["images_per_s"] / per[sides[0]]["images_per_s"]
            )
        out[workload] = per
    return out


def resummarise(path: Path) -> int:
    """Rewrite the summary of a results file (e.g. after the summary gained a column)."""
    results = json.loads(path.read_text())
    sides = list(dict.fromkeys(r["side"] for r in results["runs"]))
    if "old" in sides:
        sides.remove("old")
        sides.insert(0, "old")
    results["summary"] = summarise(results["runs"], sides, results.get("solo_short_s", {}))
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
