"""The Dockerfile lints clean and keeps the properties the deployment relies on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def final_stage() -> str:
    return re.split(r"^FROM .*$", DOCKERFILE.read_text(), flags=re.M)[-1]


def test_hadolint_passes(hadolint: str) -> None:
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_stage_is_non_root_and_healthchecked() -> None:
    stage = final_stage()
    (user,) = re.findall(r"^USER\s+(\S+)", stage, flags=re.M)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, "a numeric non-root uid (Kubernetes runAsNonRoot needs one)"
    assert re.search(r"^EXPOSE\s+8000\s+9400\s*$", stage, flags=re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", stage, flags=re.M)
    assert "curl" not in stage and "wget" not in stage


def test_runtime_stage_installs_no_build_tools() -> None:
    # Everything is built in the builder stage; the runtime only copies the venv.
    stage = final_stage()
    assert "apt-get" not in stage and "pip install" not in stage
    assert "COPY --from=builder /opt/venv /opt/venv" in stage


def test_variants_select_base_and_torch_index() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, flags=re.M)
    assert "FROM python:3.11-slim AS python-cpu" in text
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS python-cuda$", text, flags=re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", text, flags=re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl$", text, flags=re.M)
    assert '--index-url "$TORCH_INDEX/$index"' in text and "index=cpu" in text
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, flags=re.M)


def test_build_context_keeps_what_the_image_copies() -> None:
    # .dockerignore is an allowlist; every COPY source from the context must be re-included.
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), flags=re.M)
    for source in (item.rstrip("/") for line in sources for item in line.split()):
        assert source in allowed, f"{source} is copied but excluded from the build context"
        assert (ROOT / source).exists(), source
    assert "models" in allowed, "the committed weights live in models/weights"
