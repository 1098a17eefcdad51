"""Step policies of the pure ``service.scheduler.Scheduler`` compared in a simulation (no torch, no service).

    python bench/sim_scheduler.py --out bench/results/batching/sim-scheduler.json

Drives the real ``Scheduler`` (admission, starvation bound, retirement) with simulated time: a step
of n rows costs ``n * ms_per_image(n)`` plus a fixed per-step overhead, ``ms_per_image`` interpolated
(in log n) from CPU measurements of the network (``--cost``: rows=ms per image per evaluation). The
workloads are those of ``bench/bench_batching.py``:

- A: a 4-image DDPM job every ``--long-every-s`` plus Poisson 1-image DDIM requests at half the
  capacity for them (0.5 / their solo latency); p50 / p99 of the short requests over solo.
- B: ``--clients`` closed-loop clients sending requests of random steps (5/10/20/50), 1-4 images.
- C: the same clients all sending 4-image DDIM-10 requests.

Candidates: the production policies (``fifo``; ``srpt``: least work left, rows x steps, with its
fill factor) and, as subclasses here, SRPT by steps left (not work), a row budget per step in SRPT
order, and a slowdown-ranked one (age / solo time). Every non-fifo candidate runs
under the scheduler's starvation bound (``max_defer_steps``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.scheduler import Running, Scheduler, Ticket  # noqa: E402

CPU_COST = {1: 27.5, 2: 18.4, 4: 15.5, 8: 13.7, 16: 12.3, 32: 12.2}


def step_ms(rows: int, cost: dict[int, float], overhead_ms: float) -> float:
    """Wall time of one evaluation of ``rows`` rows."""
    points = sorted(cost)
    if rows <= points[0]:
        per = cost[points[0]]
    elif rows >= points[-1]:
        per = cost[points[-1]]
    else:
        hi = next(p for p in points if p >= rows)
        lo = max(p for p in points if p <= rows)
        w = 0.0 if hi == lo else (math.log(rows) - math.log(lo)) / (math.log(hi) - math.log(lo))
        per = cost[lo] + w * (cost[hi] - cost[lo])
    return rows * per + overhead_ms


@dataclass
class BudgetScheduler(Scheduler):
    """Candidate (c): jobs in SRPT order while their rows fit ``budget`` (at least one job)."""

    budget: int = 4

    def select(self, rows: list[Running]) -> list[Running]:
        out, used = [], 0
        for r in sorted(rows, key=lambda r: (r.remaining, r.ticket.submitted)):
            if out and used + r.ticket.rows > self.budget:
                continue
            out.append(r)
            used += r.ticket.rows
        return out


@dataclass
class StepsScheduler(Scheduler):
    """Candidate (b'): SRPT by steps left (not work), filled with the jobs within ``fill`` times the
    fewest."""

    fill: float = 4.0

    def select(self, rows: list[Running]) -> list[Running]:
        least = min(r.remaining for r in rows)
        return [r for r in rows if r.remaining <= self.fill * least]


@dataclass
class SlowdownScheduler(Scheduler):
    """Candidate (d): jobs whose slowdown so far (age / its solo time) is within ``share`` of the worst."""

    share: float = 0.5
    now: float = 0.0
    solo_step_s: float = 0.0275

    def select(self, rows: list[Running]) -> list[Running]:
        slow = {id(r): (self.now - r.ticket.submitted) / (r.ticket.steps * self.solo_step_s) for r in rows}
        worst = max(slow.values())
        return [r for r in rows if slow[id(r)] >= self.share * worst]


def make(policy: str, max_rows: int, max_defer: int) -> Scheduler:
    name, _, arg = policy.partition(":")
    if name == "fifo":
        return Scheduler(max_rows)
    if name == "srpt":
        return Scheduler(max_rows, policy="srpt", srpt_fill=float(arg), max_defer_steps=max_defer)
    if name == "steps":
        return StepsScheduler(max_rows, max_defer_steps=max_defer, fill=float(arg))
    if name == "budget":
        return BudgetScheduler(max_rows, max_defer_steps=max_defer, budget=int(arg))
    if name == "slowdown":
        return SlowdownScheduler(max_rows, max_defer_steps=max_defer, share=float(arg))
    raise ValueError(policy)


@dataclass
class Job:
    cls: str
    rows: int
    steps: int


def simulate(
    sched: Scheduler,
    arrivals: list[tuple[float, Job]],
    cost: dict[int, float],
    overhead_ms: float,
    closed: list[Job] | None = None,
    clients: int = 8,
    gap_ms: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Run to the end; open-loop ``arrivals`` (time, job), or ``clients`` closed-loop clients sharing
    the jobs ``closed`` (each sends its next a uniform 0..``gap_ms`` after its previous one is done:
    the HTTP round trips that keep real clients out of step)."""
    rng = random.Random(seed)
    heap = [(t, i, job) for i, (t, job) in enumerate(arrivals)]
    heapq.heapify(heap)
    todo = list(closed or [])
    jobs: dict[str, tuple[float, Job]] = {}
    latency: dict[str, list[float]] = {}
    now, seq, images, work, weighted, evaluations = 0.0, len(heap), 0, 0, 0.0, 0
    for _ in range(min(clients, len(todo))):
        heapq.heappush(heap, (rng.uniform(0, gap_ms) / 1000, seq, todo.pop(0)))
        seq += 1

    def submit_due() -> None:
        while heap and heap[0][0] <= now + 1e-12:
            t, i, job = heapq.heappop(heap)
            job_id = f"j{i}"
            jobs[job_id] = (t, job)
            sched.submit(Ticket(job_id, "m", job.rows, job.steps, t))

    while heap or not sched.idle():
        submit_due()
        if sched.idle():
            now = heap[0][0] + 0.005  # the worker's MAX_WAIT_MS for more jobs
            continue
        if isinstance(sched, SlowdownScheduler):
            sched.now = now
        plan = sched.plan()
        rows = sum(r.ticket.rows for r in sched.running["m"] if r.ticket.job_id in plan.running["m"])
        now += step_ms(rows, cost, overhead_ms) / 1000
        evaluations += 1
        weighted += rows * rows
        work += rows
        for t in sched.advance("m"):
            submitted, job = jobs.pop(t.job_id)
            latency.setdefault(job.cls, []).append(now - submitted)
            images += job.rows
            if todo:
                heapq.heappush(heap, (now + rng.uniform(0, gap_ms) / 1000, seq, todo.pop(0)))
                seq += 1
    return {
        "elapsed_s": now,
        "images_per_s": images / now,
        "mean_batch_images": weighted / max(1, work),
        "classes": {
            c: {"n": len(v), "p50_s": pct(v, 50), "p99_s": pct(v, 99)} for c, v in sorted(latency.items())
        },
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def workload_a(args: argparse.Namespace, seed: int, solo_s: float) -> list[tuple[float, Job]]:
    rng = random.Random(seed)
    rate = 0.5 / solo_s
    out = [(k * args.long_every_s, Job("long", args.long_images, args.long_steps))
           for k in range(int(args.a_seconds / args.long_every_s) + 1)]  # fmt: skip
    t = rng.expovariate(rate)
    while t < args.a_seconds:
        out.append((t, Job("short", 1, args.short_steps)))
        t += rng.expovariate(rate)
    return sorted(out, key=lambda a: a[0])


def workload_b(n: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps = rng.choice((5, 10, 20, 50))
        out.append(Job(f"steps-{steps}", rng.randint(1, 4), steps))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--policies",
        default="fifo,srpt:2,srpt:4,srpt:8,steps:2,steps:4,steps:8,budget:2,budget:4,budget:8,slowdown:0.5,slowdown:0.25",
        help="comma-separated: fifo, srpt:FILL, steps:FILL, budget:ROWS, slowdown:SHARE",
    )
    parser.add_argument("--max-defer", default="8,32", help="starvation bounds to try (steps)")
    parser.add_argument("--cost", default=",".join(f"{k}={v}" for k, v in CPU_COST.items()))
    parser.add_argument("--overhead-ms", type=float, default=1.0, help="fixed cost of every step")
    parser.add_argument("--max-rows", type=int, default=64)
    parser.add_argument("--long-steps", type=int, default=25)
    parser.add_argument("--long-images", type=int, default=4)
    parser.add_argument("--long-every-s", type=float, default=4.0)
    parser.add_argument("--short-steps", type=int, default=5)
    parser.add_argument("--a-seconds", type=float, default=600.0)
    parser.add_argument("--b-requests", type=int, default=400)
    parser.add_argument("--c-requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client-gap-ms", type=float, default=0.0, help="closed-loop clients' 0..X ms gaps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cost = {int(k): float(v) for k, v in (p.split("=") for p in args.cost.split(","))}
    solo_s = args.short_steps * step_ms(1, cost, args.overhead_ms) / 1000
    rows: list[dict[str, Any]] = []
    for policy in args.policies.split(","):
        for max_defer in [int(x) for x in args.max_defer.split(",")] if policy != "fifo" else [0]:
            per: dict[str, list[dict[str, Any]]] = {"A": [], "B": [], "C": []}
            for seed in range(args.seeds):
                per["A"].append(simulate(make(policy, args.max_rows, max_defer), workload_a(args, seed, solo_s),
                                         cost, args.overhead_ms))  # fmt: skip
                per["B"].append(simulate(make(policy, args.max_rows, max_defer), [], cost, args.overhead_ms,
                                         closed=workload_b(args.b_requests, seed), clients=args.clients,
                                         gap_ms=args.client_gap_ms, seed=seed))  # fmt: skip
                c_jobs = [Job("ddim-10x4", 4, 10)] * args.c_requests
                per["C"].append(simulate(make(policy, args.max_rows, max_defer), [], cost, args.overhead_ms,
                                         closed=c_jobs, clients=args.clients,
                                         gap_ms=args.client_gap_ms, seed=seed))  # fmt: skip
            a = per["A"]
            row = {
                "policy": policy,
                "max_defer_steps": max_defer,
                "A_short_p50_over_solo": statistics.median(r["classes"]["short"]["p50_s"] for r in a)
                / solo_s,
                "A_short_p99_over_solo": statistics.median(r["classes"]["short"]["p99_s"] for r in a)
                / solo_s,
                "A_long_p50_s": statistics.median(r["classes"]["long"]["p50_s"] for r in a),
                "A_long_p99_s": statistics.median(r["classes"]["long"]["p99_s"] for r in a),
                "A_mean_batch": statistics.median(r["mean_batch_images"] for r in a),
                "B_images_per_s": statistics.median(r["images_per_s"] for r in per["B"]),
                "B_mean_batch": statistics.median(r["mean_batch_images"] for r in per["B"]),
                "B_p99_s": {
                    c: statistics.median(r["classes"][c]["p99_s"] for r in per["B"])
                    for c in per["B"][0]["classes"]
                },
                "C_images_per_s": statistics.median(r["images_per_s"] for r in per["C"]),
            }
            rows.append(row)
    base = rows[0]
    print(f"solo short: {solo_s * 1e3:.0f} ms; ratios are against {base['policy']}")
    print("policy        defer | A short p50x p99x | A long p50/p99 s | B img/s (ratio) batch | "
          "B p99 5/10/20/50 s | C img/s (ratio)")  # fmt: skip
    for r in rows:
        b99 = "/".join(f"{r['B_p99_s'].get(f'steps-{k}', float('nan')):.1f}" for k in (5, 10, 20, 50))
        print(f"{r['policy']:13s} {r['max_defer_steps']:5d} | {r['A_short_p50_over_solo']:5.1f} "
              f"{r['A_short_p99_over_solo']:5.1f} | {r['A_long_p50_s']:5.2f} / {r['A_long_p99_s']:5.2f} | "
              f"{r['B_images_per_s']:6.2f} ({r['B_images_per_s'] / base['B_images_per_s']:.2f}) "
              f"{r['B_mean_batch']:5.1f} | {b99} | "
              f"{r['C_images_per_s']:6.2f} ({r['C_images_per_s'] / base['C_images_per_s']:.2f})")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "cost_ms_per_image": cost,
                                        "solo_short_s": solo_s, "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
