"""The client examples in README.md and docs/CLIENT_GUIDE.md run against a live `robustdiff serve`.

Each fenced block followed by a ``<!-- run -->`` line is run in document order: Python blocks in
one namespace per document (so later blocks use the ``client`` an earlier one made), shell blocks
with bash -euo pipefail, all in one scratch folder, with ``localhost:8000`` pointed at a server
started for this test (a private Redis and one worker serving the committed fmnist-dro-at and
fmnist-cd). ``<!-- run expect="TEXT" -->`` also requires TEXT in the block's output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "models" / "weights"
DOCS = ["README.md", "docs/CLIENT_GUIDE.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
MARK = re.compile(r"<!-- run(?: expect=\"((?:[^\"\\]|\\.)*)\")? -->")


def runnable_blocks(doc: str) -> list[tuple[str, str, str | None]]:
    """(language, code, expected text) of every block marked to run, in order."""
    text = (ROOT / doc).read_text()
    out = []
    for fence in FENCE.finditer(text):
        mark = MARK.match(text, fence.end())
        if mark is not None:
            assert fence.group(1) in ("python", "bash"), f"{doc}: cannot run a {fence.group(1)!r} block"
            expect = mark.group(1).replace('\\"', '"') if mark.group(1) else None
            out.append((fence.group(1), fence.group(2), expect))
    return out


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTDIFF_")}
    env.update({
        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ROBUSTDIFF_DEVICE": "cpu",
        "ROBUSTDIFF_MODELS": f"{WEIGHTS / 'fmnist-dro-at.safetensors'},{WEIGHTS / 'fmnist-cd.safetensors'}",
        "ROBUSTDIFF_WORKER_METRICS_PORT": "0", "ROBUSTDIFF_HEARTBEAT_S": "0.5",
    })  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        )  # fmt: skip
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://{base}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.mark.parametrize("doc", DOCS)
def test_marked_examples_run(
    doc: str, live_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = runnable_blocks(doc)
    assert len(blocks) >= 4, f"{doc}: the client examples are no longer marked <!-- run -->"
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "__docs__"}
    # As in the documents: `python` and `robustdiff` are the checkout's .venv (activated).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for i, (lang, code, expect) in enumerate(blocks):
        code = code.replace("localhost:8000", live_server)
        where = f"{doc}, block {i + 1} ({lang}):\n{code}"
        if lang == "python":
            exec(compile(code, f"{doc}[{i + 1}]", "exec"), scope)
            continue
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=120, env=env
        )
        assert done.returncode == 0, f"{where}\n{done.stdout}\n{done.stderr}"
        assert expect is None or expect in done.stdout, f"{where}\nexpected {expect!r} in:\n{done.stdout}"
        assert '"error":"internal"' not in done.stdout, f"{where}\n{done.stdout}"
