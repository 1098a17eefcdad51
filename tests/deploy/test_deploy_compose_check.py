"""deploy/compose-check.sh (on demand, minutes) stays well formed; its checker talks to loopback only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "compose-check.sh"
CHECKER = ROOT / "deploy" / "compose_check.py"


def test_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: apt-get install shellcheck (make system-deps installs it)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "api", ["http://10.0.0.1:8000", "http://192.168.1.2:8000", "http://example.org:8000"]
)
def test_checker_refuses_addresses_off_loopback(api: str) -> None:
    # Refused while parsing its arguments, before any request is sent.
    result = subprocess.run(
        [sys.executable, str(CHECKER), "--api", api, "--prometheus", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "only loopback addresses are checked" in result.stderr, result.stderr


def test_checker_finds_the_pngs_of_an_answer(compose_check: ModuleType) -> None:
    png = compose_check.PNG_B64 + "AAAA"
    answer = {"images": [[png, png]], "model": "m", "seeds": [1], "other": "iVBOR"}
    assert compose_check.pngs(answer) == [png, png]
