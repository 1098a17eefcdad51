"""/docs works on an offline host: Swagger UI's assets come from this process, and a real headless
browser that can reach nothing but loopback renders every operation."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import serve_api


@pytest.fixture
def live_api(redis_server: Any) -> Iterator[str]:
    with serve_api(redis_server.url) as base:
        yield base


@pytest.mark.parametrize("page_path", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(live_api: str, page_path: str) -> None:
    """Before: /docs and /redoc pulled their scripts and CSS from cdn.jsdelivr.net (blank pages offline)."""
    page = httpx.get(f"{live_api}{page_path}").text
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", page) + re.findall(
        r"url: ?'([^']+)'", page
    )
    assert urls, page
    for url in urls:
        assert url.startswith("/"), f"{url} is not served by the API"
        assert httpx.get(f"{live_api}{url}").status_code == 200, url


def test_a_browser_with_no_outside_network_renders_every_operation(live_api: str, tmp_path: Path) -> None:
    shot = tmp_path / "docs.png"
    common = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # every host name but loopback fails to resolve: a request outside would leave the page blank
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=15000",
        "--window-size=1280,1400",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", f"{live_api}/docs"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for path in ["/sample", "/purify", "/jobs/{job_id}", "/models", "/readyz"]:
        assert f'data-path="{path}"' in dom, f"{path} not rendered"
    assert dom.count('class="opblock opblock-') >= 8
    subprocess.run(
        [*common, f"--screenshot={shot}", f"{live_api}/docs"], capture_output=True, timeout=120, check=True
    )
    assert shot.stat().st_size > 10_000
