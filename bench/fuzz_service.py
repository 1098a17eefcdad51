"""Fuzzing: schemathesis against the live service's /openapi.json, every check and every phase.

    python bench/fuzz_service.py --max-examples 150 --seed 1 --out bench/results/fuzz_service.json

Everything runs on loopback: a private Redis, the API (`robustdiff serve --workers 0`) and one worker
on a tiny checkpoint, one torch thread each. schemathesis generates valid and invalid data (`--mode
all`) in its examples, coverage, fuzzing and stateful phases with `--checks all`, narrowed only as
tests/service/schemathesis.toml says and why. Writes a JSON summary: requests per operation and
status class (from schemathesis' HAR record), failures, errors, warnings, duration, the command, the
machine and the date. Exits non-zero when schemathesis found a failure. The CI version of this run
is tests/service/test_schemathesis.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import ROOT, Stack, machine, tiny_model

CONFIG = ROOT / "tests" / "service" / "schemathesis.toml"
PHASES = "examples,coverage,fuzzing,stateful"


def schemathesis_command(schema_url: str, max_examples: int, seed: int, report_dir: Path) -> list[str]:
    """The one schemathesis invocation of both the bench and the CI test."""
    return [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        schema_url,
        "--checks",
        "all",
        "--phases",
        PHASES,
        "--mode",
        "all",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--request-timeout",
        "60",
        "--report",
        "json,har",
        "--report-json-path",
        str(report_dir / "run.json"),
        "--report-har-path",
        str(report_dir / "requests.har"),
    ]


def requests_per_operation(har: Path, paths: list[str]) -> dict[str, dict[str, int]]:
    """HTTP requests schemathesis sent, by "METHOD /path/{template}" and status class ("2xx", ...)."""
    templates = [(p, re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$")) for p in paths]
    out: dict[str, Counter[str]] = {}
    for entry in json.loads(har.read_text())["log"]["entries"]:
        path = re.sub(r"^[a-z]+://[^/]+", "", entry["request"]["url"]).split("?")[0]
        name = next((p for p, rx in templates if rx.match(path)), "(paths not in the schema)")
        key = f"{entry['request']['method']} {name}"
        out.setdefault(key, Counter())[f"{entry['response']['status'] // 100}xx"] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def run_schemathesis(
    base: str, max_examples: int, seed: int, report_dir: Path, timeout_s: float
) -> dict[str, Any]:
    """Run it against ``base`` and summarise what it did and found (its terminal output in output.log)."""
    cmd = schemathesis_command(f"{base}/openapi.json", max_examples, seed, report_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with (report_dir / "output.log").open("wb") as log:
        proc = subprocess.run(
            cmd, cwd=report_dir, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False
        )
    wall = time.perf_counter() - t0
    report = json.loads((report_dir / "run.json").read_text())
    paths = list(httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"])
    per_op = requests_per_operation(report_dir / "requests.har", paths)
    output = (report_dir / "output.log").read_text(errors="replace")
    return {
        "schemathesis_exit_code": proc.returncode,
        "schemathesis_version": report["schemathesis_version"],
        "command": shlex.join(["schemathesis", *cmd[1:]])
        .replace(base, "http://127.0.0.1:PORT")
        .replace(f"{ROOT}/", ""),
        "max_examples_per_operation_and_phase": max_examples,
        "seed": seed,
        "phases": report["phases"],
        "operations": report["operations"],
        "test_cases": report["test_cases"],
        "failures": report["failures"],
        "errors": report["errors"],
        "warnings": report["warnings"],
        "requests_per_operation": per_op,
        "requests_total": sum(sum(v.values()) for v in per_op.values()),
        "status_5xx": sum(v.get("5xx", 0) for v in per_op.values()),
        "duration_s": round(wall, 1),
        "output_tail": output[-6000:] if proc.returncode else "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-examples", type=int, default=150, help="per operation and phase")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=1800, help="longest the schemathesis run may take")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_service.json")
    args = p.parse_args()
    result: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="robustdiff-fuzz-") as tmp:
        folder = Path(tmp)
        stack = Stack(tiny_model(folder), folder, ROBUSTDIFF_MAX_STEPS="50")
        try:
            stack.start_worker()
            stack.start_api()
            stack.wait_ready()
            result["service"] = {"ROBUSTDIFF_MAX_STEPS": 50, "ROBUSTDIFF_MAX_IMAGES": 8, "model": "tiny"}
            result["run"] = run_schemathesis(stack.base, args.max_examples, args.seed, folder, args.timeout_s)
            result["api_alive_after"] = stack.api is not None and stack.api.poll() is None
            result["worker_alive_after"] = all(w.poll() is None for w in stack.workers)
        finally:
            stack.close()
    result["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    run = result["run"]
    print(
        f"{run['test_cases']['generated']} cases, {run['requests_total']} requests, "
        f"{len(run['failures'])} failures, {run['status_5xx']} 5xx in {run['duration_s']} s; wrote {args.out}"
    )
    sys.exit(0 if run["schemathesis_exit_code"] == 0 and not run["failures"] else 1)


if __name__ == "__main__":
    main()
