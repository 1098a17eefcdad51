"""The CPU thread policy: one torch thread per worker, passive OpenMP waiting, one worker per core."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.serve import Supervisor
from service.threads import default_workers, set_thread_env

ROOT = Path(__file__).resolve().parents[2]


def test_thread_env_defaults_to_one_thread_and_passive_waiting() -> None:
    env: dict[str, str] = {}
    set_thread_env(env)
    assert env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"ROBUSTDIFF_TORCH_THREADS": "2", "OMP_NUM_THREADS": "8", "OMP_WAIT_POLICY": "ACTIVE"}
    set_thread_env(env)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2" and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {"ROBUSTDIFF_TORCH_THREADS": "0"}
    set_thread_env(env)
    assert "OMP_NUM_THREADS" not in env  # 0: torch's own default


def test_serve_starts_one_worker_per_core_on_a_cpu() -> None:
    cores = os.cpu_count() or 1
    assert default_workers("cpu", 1) == cores
    assert default_workers("cpu", 2) == max(1, cores // 2)
    assert default_workers("cuda", 1) == default_workers("cuda:1", 1) == 1


def test_each_supervised_worker_gets_the_thread_policy_and_its_own_metrics_port() -> None:
    sup = Supervisor(3, {"ROBUSTDIFF_TORCH_THREADS": "1"}, metrics_port=9400)
    envs = [sup._worker_env(i) for i in range(3)]
    assert [e["ROBUSTDIFF_WORKER_METRICS_PORT"] for e in envs] == ["9400", "9401", "9402"]
    assert all(e["OMP_NUM_THREADS"] == "1" and e["OMP_WAIT_POLICY"] == "PASSIVE" for e in envs)
    assert "ROBUSTDIFF_WORKER_METRICS_PORT" not in Supervisor(2, {})._worker_env(1)  # 0: disabled


@pytest.mark.parametrize(("threads", "expected"), [("1", "1 PASSIVE"), ("2", "2 PASSIVE")])
def test_the_worker_command_sets_threads_before_torch_loads(threads: str, expected: str) -> None:
    """`robustdiff worker` puts the policy in its environment before importing torch: the probe
    replaces the worker module's run and reports what torch and OpenMP saw."""
    probe = (
        "import importlib, sys, service.cli as cli\n"
        "assert 'torch' not in sys.modules\n"
        "def run(args):\n"
        "    import os, torch\n"
        "    print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])\n"
        "    return 0\n"
        "def load(name):\n"
        "    module = importlib.import_module(name)\n"
        "    module.run = run\n"
        "    return module\n"
        "cli.importlib = type('I', (), {'import_module': staticmethod(load)})\n"
        "sys.exit(cli.main(['worker']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "ROBUSTDIFF_"))}
    env.update(PYTHONPATH=str(ROOT), ROBUSTDIFF_TORCH_THREADS=threads)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
