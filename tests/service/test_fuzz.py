"""Hypothesis fuzzing of request bodies: whatever arrives, the API never answers 5xx."""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
SAMPLE_FIELDS = {
    "model": st.sampled_from(["tiny", "tiny-cm", "tiny-cond", "x", ""]) | JSON,
    "sampler": st.sampled_from(["ddpm", "ddim", "dpm-solver++", "consistency", "DDIM"]) | JSON,
    "steps": st.integers(-2, 3) | JSON,
    "eta": st.floats(-1, 2) | JSON,
    "times": st.lists(st.floats(-0.5, 1.5), max_size=3) | JSON,
    "seeds": st.integers(-5, 2**64) | st.lists(st.integers(-1, 2**63), max_size=4) | JSON,
    "format": st.sampled_from(["png", "npy", "jpg"]) | JSON,
    "num_images": st.integers(-1, 3) | JSON,
    "labels": st.integers(-1, 4)
    | st.sampled_from(["0", "2", "dog"])
    | st.lists(st.integers(-1, 4), max_size=3),
    "async": st.booleans() | JSON,
}
IMAGE = (
    st.sampled_from(
        [
            "",
            "AAAA",
            base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30).decode(),
            base64.b64encode(b"\x93NUMPY\x01\x00").decode(),
            base64.b64encode(b"\xff\xd8\xff\xe0" + b"\x00" * 20).decode(),
        ]
    )
    | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
    | st.text(max_size=30)
)
PURIFY_FIELDS = {
    **SAMPLE_FIELDS,
    "images": st.lists(IMAGE, max_size=3) | JSON,
    "npy_range": st.sampled_from(["0,1", "-1,1", "0,255"]) | JSON,
    "t_star": st.floats(-1, 2) | JSON,
    "strength": st.sampled_from(["light", "medium", "strong", "max"]) | JSON,
    "draws": st.integers(-1, 3) | JSON,
    "resize": st.booleans() | JSON,
}
PURIFY_FIELDS.pop("num_images")


def bodies(fields: dict[str, Any]) -> st.SearchStrategy[Any]:
    structured = st.fixed_dictionaries({}, optional=fields)
    return structured | JSON


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=bodies(SAMPLE_FIELDS))
def test_sample_never_5xx(client: TestClient, body: Any) -> None:
    if isinstance(body, dict) and not body.get("async"):
        body.setdefault("steps", 1)  # valid requests run for real; keep them cheap
    r = client.post("/sample", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    assert r.status_code in (200, 202) or r.json()["errors"]


@FUZZ
@given(body=bodies(PURIFY_FIELDS))
def test_purify_never_5xx(client: TestClient, body: Any) -> None:
    if isinstance(body, dict) and not body.get("async"):
        body.setdefault("steps", 1)
    r = client.post("/purify", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    assert r.status_code in (200, 202) or r.json()["errors"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    raw=st.binary(max_size=200),
    ctype=st.sampled_from(["application/json", "multipart/form-data; boundary=b", "text/plain", ""]),
)
def test_raw_bytes_never_5xx(client: TestClient, raw: bytes, ctype: str) -> None:
    for path in ("/sample", "/purify"):
        r = client.post(path, content=raw, headers={"content-type": ctype} if ctype else {})
        assert r.status_code < 500, (path, raw, r.text)
