"""Settings from the environment, the torch-free API import, and `robustdiff serve` as users run it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from models.errors import UserError
from service.redis_server import free_port
from service.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_csv(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("ROBUSTDIFF_"):
            monkeypatch.delenv(key)
    s = load_settings()
    assert (s.redis_url, s.device, s.worker_metrics_port, s.default_model) == (
        "",
        "auto",
        "auto",
        "fmnist-dro-at",
    )
    monkeypatch.setenv("ROBUSTDIFF_API_KEYS", " a, b ,,")
    monkeypatch.setenv("ROBUSTDIFF_MODELS", "x=/a.safetensors,/b.safetensors")
    monkeypatch.setenv("robustdiff_device", "cuda:1")
    s = load_settings()
    assert (
        s.api_keys == ["a", "b"]
        and s.models == ["x=/a.safetensors", "/b.safetensors"]
        and s.device == "cuda:1"
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ROBUSTDIFF_MAX_IMAGES", "many"),
        ("ROBUSTDIFF_MAX_IMAGES", "0"),
        ("ROBUSTDIFF_DEVICE", "tpu"),
        ("ROBUSTDIFF_LOG_LEVEL", "LOUD"),
        ("ROBUSTDIFF_WORKER_METRICS_PORT", "70000"),
        ("ROBUSTDIFF_HEARTBEAT_S", "-1"),
        ("ROBUSTDIFF_REDIS_URL", "garbage"),
        ("ROBUSTDIFF_REDIS_URL", "http://127.0.0.1:6379"),
    ],
)
def test_bad_env_names_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(UserError) as err:
        load_settings()
    assert err.value.field == var


def test_inconsistent_settings_refused() -> None:
    with pytest.raises(UserError, match="MAX_BATCH_IMAGES"):
        load_settings(max_images=64, max_batch_images=8)
    with pytest.raises(UserError, match="RECLAIM_IDLE_MS"):
        load_settings(reclaim_idle_ms=1000, heartbeat_s=2)


def test_every_setting_is_documented() -> None:
    assert all(f.description for f in Settings.model_fields.values())


def test_api_import_does_not_import_torch() -> None:
    code = "import sys, service.api, service.serve; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


def _get(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _start_serve(
    checkpoints: dict[str, Path], log_path: Path, **env: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`robustdiff serve` with the private Redis and one worker, once it answers /readyz."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    full.update({
        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ROBUSTDIFF_MODELS": str(checkpoints["tiny"]),
        "ROBUSTDIFF_WORKER_METRICS_PORT": "0", "ROBUSTDIFF_DEVICE": "cpu", "ROBUSTDIFF_HEARTBEAT_S": "0.5",
        "ROBUSTDIFF_WORKERS": "1", **env,
    })  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=ROOT, env=full,
            stdout=log, stderr=log,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    _wait_ready(proc, base, log_path)
    return proc, base


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _get(f"{base}/readyz")[0] == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"not ready within {timeout} s: {log_path.read_text()[-2000:]}")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_embedded_redis_and_worker(checkpoints: dict[str, Path], tmp_path: Path, stop: int) -> None:
    """Serve, answer a request, and on Ctrl-C or SIGTERM (what Docker and Kubernetes send) stop the
    worker and the private Redis too: SIGTERM once ended the process before its cleanup ran."""
    metrics_port = str(free_port())
    log_path = tmp_path / "serve.log"
    proc, base = _start_serve(checkpoints, log_path, ROBUSTDIFF_WORKER_METRICS_PORT=metrics_port)
    try:
        status, out = _get(f"{base}/sample", {"steps": 2, "seeds": 5})
        assert status == 200 and out["model"] == "tiny" and out["seeds"] == [5]
        # The worker counts an image just after publishing its result, so the counter may lag the answer.
        want = b'robustdiff_images_generated_total{model="tiny"} 1.0'
        deadline = time.monotonic() + 5
        while want not in (text := urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
    finally:
        proc.send_signal(stop)
        assert proc.wait(60) == 0, log_path.read_text()
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    assert not children.strip()
    redis_url = re.search(r"started a private Redis at (\S+)", log_path.read_text())
    assert redis_url is not None
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(redis_url.group(1), socket_connect_timeout=1).ping()


def test_serve_restarts_its_private_redis_with_the_accepted_jobs(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A crash of the private Redis must not disable the service for good nor lose accepted jobs:
    serve restarts it on the same port from its append-only file, and the job still completes."""
    log_path = tmp_path / "serve.log"
    proc, base = _start_serve(
        checkpoints, log_path, ROBUSTDIFF_FAULT_STEP_DELAY_S="0.5", ROBUSTDIFF_RECLAIM_IDLE_MS="1500"
    )
    try:
        status, job = _get(f"{base}/sample", {"steps": 6, "seeds": 7, "async": True})
        assert status == 202
        redis_pid = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "-f", "redis-server"], capture_output=True, text=True
        ).stdout.split()
        assert len(redis_pid) == 1
        os.kill(int(redis_pid[0]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, out = _get(f"{base}{job['location']}")
            except OSError:
                status, out = 0, {}
            if status == 200 and out["status"] in ("done", "failed"):
                break
            time.sleep(0.3)
        assert status == 200 and out["status"] == "done", out
        assert "restarting it with its jobs" in log_path.read_text()
        _wait_ready(proc, base, log_path)
        status, again = _get(f"{base}/sample", {"steps": 6, "seeds": 7})
        assert status == 200 and again["images"] == out["result"]["images"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()


def test_default_models_are_the_servable_committed_checkpoints() -> None:
    """`make serve` serves models/weights: every diffusion/consistency file, never the classifier."""
    from service.settings import WEIGHTS_DIR, checkpoint_kind, load_settings

    models = load_settings().models
    names = [Path(m).stem for m in models]
    assert names[0] == "fmnist-dro-at" and "fmnist-classifier" not in names
    assert checkpoint_kind(WEIGHTS_DIR / "fmnist-classifier.safetensors") == "classifier"
    assert all(checkpoint_kind(Path(m)) in ("diffusion", "consistency") for m in models)


def _serve_env(**env: str) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    full.update({
        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ROBUSTDIFF_WORKER_METRICS_PORT": "0",
        "ROBUSTDIFF_DEVICE": "cpu", "ROBUSTDIFF_HEARTBEAT_S": "0.5", "ROBUSTDIFF_WORKERS": "1", **env,
    })  # fmt: skip
    return full


def _assert_no_private_redis_left(log: str) -> None:
    """The private Redis serve started (if any) is gone: no process on its port, nothing answers."""
    found = re.search(r"started a private Redis at redis://127\.0\.0\.1:(\d+)/0", log)
    if found is None:
        return
    port = found.group(1)
    left = subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{port}"], capture_output=True, text=True)
    assert not left.stdout.strip(), log
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=int(port), socket_connect_timeout=1).ping()


@pytest.mark.parametrize(
    ("argv", "env", "name"),
    [
        (["--host", "999.1.1.1"], {}, "--host"),
        (["--port", "IN_USE"], {}, "--port"),
        (["--workers", "-1"], {}, "--workers"),
        ([], {"ROBUSTDIFF_REDIS_URL": "garbage"}, "ROBUSTDIFF_REDIS_URL"),
        ([], {"ROBUSTDIFF_MODELS": "/nonexistent.safetensors"}, "ROBUSTDIFF_MODELS"),
    ],
)
def test_serve_refuses_bad_input_before_starting_anything(
    checkpoints: dict[str, Path], argv: list[str], env: dict[str, str], name: str
) -> None:
    """Each once started the private Redis first (and left it running), hung, or printed a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = str(taken.getsockname()[1])
        argv = [in_use if a == "IN_USE" else a for a in argv]
        if "--port" not in argv:
            argv += ["--port", str(free_port())]
        full = _serve_env(**{"ROBUSTDIFF_MODELS": str(checkpoints["tiny"]), **env})
        proc = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", *argv],
            cwd=ROOT, env=full, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], proc.stderr  # one line: no Redis was even started
    _assert_no_private_redis_left(proc.stderr)


def test_serve_stops_its_children_whatever_way_uvicorn_fails(checkpoints: dict[str, Path]) -> None:
    """With the up-front check bypassed, uvicorn's own bind failure must still end serve non-zero
    with the worker and the private Redis stopped: it once hung in the API's shutdown for good."""
    code = (
        "import sys, service.serve as s; from service.cli import main; s.check_listen = lambda h, p: None; "
        "sys.exit(main(['serve', '--host', '999.1.1.1', '--port', sys.argv[1]]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(free_port())], cwd=ROOT,
        env=_serve_env(ROBUSTDIFF_MODELS=str(checkpoints["tiny"])), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, None), err
    assert "started a private Redis" in err and "Traceback" not in err, err
    _assert_no_private_redis_left(err)


def test_serve_exits_2_when_every_worker_has_a_configuration_error(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A checkpoint only the worker can find bad (here truncated) once left an API answering 503
    forever; serve now stops everything and exits 2 with the worker's reason."""
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(checkpoints["tiny"].read_bytes()[:200])
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
        cwd=ROOT, env=_serve_env(ROBUSTDIFF_MODELS=str(broken)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("robustdiff serve: error: worker: ROBUSTDIFF_MODELS:") and broken.name in last, (
        last
    )
    _assert_no_private_redis_left(proc.stderr)


def test_serve_warns_when_its_redis_is_unreachable(tmp_path: Path) -> None:
    """It once said nothing at all, leaving the user to wonder why every request got 503."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
            cwd=ROOT, env=_serve_env(ROBUSTDIFF_REDIS_URL=url), stdout=log, stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "startup complete" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    text = log_path.read_text()
    assert f"Redis at {url} is unreachable" in text and "Traceback" not in text, text
