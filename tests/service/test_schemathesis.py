"""schemathesis against the live API (a real socket, Redis and worker): every check, every phase, valid
and invalid data, bounded to a few hundred cases. The full run is bench/fuzz_service.py, with the
same command and settings (tests/service/schemathesis.toml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.service.conftest import serve_api

ROOT = Path(__file__).resolve().parents[2]


def _fuzz_service() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_service", ROOT / "bench" / "fuzz_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schemathesis_finds_nothing(redis_server: Any, worker: Any, tmp_path: Path) -> None:
    with serve_api(redis_server.url, default_model="tiny") as base:
        run = _fuzz_service().run_schemathesis(
            base, max_examples=2, seed=7, report_dir=tmp_path, timeout_s=300
        )
    assert run["failures"] == [] and run["errors"] == [], run["output_tail"]
    assert run["schemathesis_exit_code"] == 0, run["output_tail"]
    assert run["status_5xx"] == 0
    assert run["warnings"]["unresolvable_reference"] == []  # every part of the schema was exercised
    assert {name: p["status"] for name, p in run["phases"].items()} == dict.fromkeys(
        ("examples", "coverage", "fuzzing", "stateful"), "success"
    )
    assert run["operations"]["tested"] == run["operations"]["total"] == 10
    assert run["test_cases"]["generated"] >= 200
    answered = run["requests_per_operation"]
    for op in ("POST /sample", "POST /purify", "GET /jobs/{job_id}"):
        assert answered[op].get("2xx", 0) > 0, (op, answered[op])  # valid requests reached the worker
