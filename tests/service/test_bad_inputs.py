"""Every bad input is a 4xx whose JSON body names the field and the reason; none is a 5xx."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(shape: tuple[int, ...] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def noise_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


TRUNCATED = noise_png()[:120]
GOOD = npy(np.zeros((1, 16, 16), np.float32))
NAN = np.zeros((1, 16, 16), np.float32)
NAN[0, 3, 3] = np.nan
INF = np.zeros((1, 16, 16), np.float32)
INF[0, 0, 0] = np.inf


def purify(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "steps": 2, **fields}


# (id, method, path, kwargs for the client, expected status, expected field)
CASES: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("not an image", "POST", "/purify", {"json": purify(images=[b64(b"hello world")])}, 422, "images[0]"),
    ("bad base64", "POST", "/purify", {"json": purify(images=["***"])}, 422, "images[0]"),
    ("truncated png", "POST", "/purify", {"json": purify(images=[b64(TRUNCATED)])}, 422, "images[0]"),
    ("wrong shape", "POST", "/purify", {"json": purify(images=[b64(png((8, 8)))])}, 422, "images[0]"),
    ("wrong channels", "POST", "/purify", {"json": purify(images=[b64(png((16, 16, 3)))])}, 422, "images[0]"),
    (
        "npy nan",
        "POST",
        "/purify",
        {"json": purify(images=[b64(npy(NAN))], npy_range="-1,1")},
        422,
        "images[0]",
    ),
    (
        "npy inf",
        "POST",
        "/purify",
        {"json": purify(images=[b64(npy(INF))], npy_range="-1,1")},
        422,
        "images[0]",
    ),
    (
        "npy out of range",
        "POST",
        "/purify",
        {"json": purify(images=[b64(npy(np.full((1, 16, 16), 1.5, np.float32)))], npy_range="0,1")},
        422,
        "images[0]",
    ),
    (
        "npy below 0 for [0,1]",
        "POST",
        "/purify",
        {"json": purify(images=[b64(npy(np.full((1, 16, 16), -0.5, np.float32)))], npy_range="0,1")},
        422,
        "images[0]",
    ),
    ("npy range missing", "POST", "/purify", {"json": purify(images=[b64(GOOD)])}, 422, "npy_range"),
    (
        "npy range invalid",
        "POST",
        "/purify",
        {"json": purify(images=[b64(GOOD)], npy_range="0,255")},
        422,
        "npy_range",
    ),
    (
        "npy truncated",
        "POST",
        "/purify",
        {"json": purify(images=[b64(GOOD[:60])], npy_range="-1,1")},
        422,
        "images[0]",
    ),
    (
        "npy object dtype",
        "POST",
        "/purify",
        {"json": purify(images=[b64(GOOD.replace(b"<f4", b"|O8"))], npy_range="-1,1")},
        422,
        "images[0]",
    ),
    (
        "npy 2-d",
        "POST",
        "/purify",
        {"json": purify(images=[b64(npy(np.zeros((16, 16))))], npy_range="-1,1")},
        422,
        "images[0]",
    ),
    ("no images", "POST", "/purify", {"json": purify(images=[])}, 422, "images"),
    ("too many images", "POST", "/purify", {"json": purify(images=[b64(png())] * 9)}, 422, "images"),
    ("too many draws", "POST", "/purify", {"json": purify(images=[b64(png())] * 2, draws=5)}, 422, "draws"),
    (
        "t_star out of range",
        "POST",
        "/purify",
        {"json": purify(images=[b64(png())], t_star=1.5)},
        422,
        "t_star",
    ),
    ("t_star zero", "POST", "/purify", {"json": purify(images=[b64(png())], t_star=0)}, 422, "t_star"),
    (
        "unknown strength",
        "POST",
        "/purify",
        {"json": purify(images=[b64(png())], strength="max")},
        422,
        "strength",
    ),
    (
        "t_star and strength",
        "POST",
        "/purify",
        {"json": purify(images=[b64(png())], t_star=0.1, strength="light")},
        422,
        "strength",
    ),
    (
        "purify labels on unconditional",
        "POST",
        "/purify",
        {"json": purify(images=[b64(png())], labels=[1])},
        422,
        "labels",
    ),
    (
        "purify conditional needs labels",
        "POST",
        "/purify",
        {"json": purify(images=[b64(png())], model="tiny-cond")},
        422,
        "labels",
    ),
    (
        "multipart without files",
        "POST",
        "/purify",
        {
            "content": b'--xx\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n--xx--\r\n',
            "headers": {"content-type": "multipart/form-data; boundary=xx"},
        },
        422,
        "files",
    ),
    (
        "multipart not an image",
        "POST",
        "/purify",
        {"files": [("files", ("x.png", b"GIF89a...", "image/png"))]},
        422,
        "files[0]",
    ),
    (
        "multipart truncated",
        "POST",
        "/purify",
        {"files": [("files", ("x.png", TRUNCATED, "image/png"))]},
        422,
        "files[0]",
    ),
    (
        "multipart broken body",
        "POST",
        "/purify",
        {"content": b"--xx\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=xx"}},
        422,
        "files",
    ),
    ("unknown model", "POST", "/sample", {"json": {"model": "nope"}}, 422, "model"),
    ("unknown sampler", "POST", "/sample", {"json": {"sampler": "euler"}}, 422, "sampler"),
    ("consistency on diffusion", "POST", "/sample", {"json": {"sampler": "consistency"}}, 422, "sampler"),
    (
        "ddim on consistency",
        "POST",
        "/sample",
        {"json": {"model": "tiny-cm", "sampler": "ddim"}},
        422,
        "sampler",
    ),
    ("steps zero", "POST", "/sample", {"json": {"steps": 0}}, 422, "steps"),
    ("times not decreasing", "POST", "/sample", {"json": {"times": [0.3, 0.6]}}, 422, "times"),
    ("times at 1", "POST", "/sample", {"json": {"times": [1.0]}}, 422, "times[0]"),
    ("times and steps disagree", "POST", "/sample", {"json": {"times": [0.5], "steps": 3}}, 422, "steps"),
    (
        "times too many",
        "POST",
        "/sample",
        {"json": {"times": [0.9 - i / 100 for i in range(25)]}},
        422,
        "steps",
    ),
    (
        "times above t_star",
        "POST",
        "/purify",
        {"json": purify(images=[b64(GOOD)], npy_range="-1,1", t_star=0.2, times=[0.3])},
        422,
        "times",
    ),
    ("eta on ddpm", "POST", "/sample", {"json": {"sampler": "ddpm", "eta": 0.5}}, 422, "eta"),
    (
        "t_star below one step",
        "POST",
        "/purify",
        {"json": purify(images=[b64(GOOD)], npy_range="-1,1", t_star=0.0005)},
        422,
        "t_star",
    ),
    ("steps over max", "POST", "/sample", {"json": {"steps": 21}}, 422, "steps"),
    ("steps not int", "POST", "/sample", {"json": {"steps": "many"}}, 422, "steps"),
    ("too many images (sample)", "POST", "/sample", {"json": {"num_images": 9}}, 422, "num_images"),
    ("num_images zero", "POST", "/sample", {"json": {"num_images": 0}}, 422, "num_images"),
    ("eta out of range", "POST", "/sample", {"json": {"eta": 2}}, 422, "eta"),
    (
        "eta nan",
        "POST",
        "/sample",
        {"content": b'{"eta": NaN}', "headers": {"content-type": "application/json"}},
        422,
        "eta",
    ),
    ("seed negative", "POST", "/sample", {"json": {"seeds": -1}}, 422, "seeds"),
    ("seed negative in a list", "POST", "/sample", {"json": {"seeds": [-1]}}, 422, "seeds[0]"),
    ("number as a string", "POST", "/sample", {"json": {"num_images": "4"}}, 422, "num_images"),
    ("boolean as a string", "POST", "/sample", {"json": {"async": "yes"}}, 422, "async"),
    (
        "compressed body",
        "POST",
        "/sample",
        {"content": b"\x1f\x8b", "headers": {"content-type": "application/json", "content-encoding": "gzip"}},
        415,
        "content-encoding",
    ),
    (
        "multipart field twice",
        "POST",
        "/purify",
        {"files": [("files", GOOD)], "data": {"model": "tiny", "npy_range": "-1,1", "steps": ["2", "3"]}},
        422,
        "steps",
    ),
    (
        "multipart seed negative",
        "POST",
        "/purify",
        {"files": [("files", GOOD)], "data": {"model": "tiny", "npy_range": "-1,1", "seeds": "-1"}},
        422,
        "seeds",
    ),
    ("seed float", "POST", "/sample", {"json": {"seeds": [1.5]}}, 422, "seeds[0]"),
    ("seeds count", "POST", "/sample", {"json": {"num_images": 2, "seeds": [1, 2, 3]}}, 422, "seeds"),
    ("seed too large", "POST", "/sample", {"json": {"seeds": 2**64}}, 422, "seeds"),
    ("labels on unconditional", "POST", "/sample", {"json": {"labels": 1}}, 422, "labels"),
    (
        "label out of range",
        "POST",
        "/sample",
        {"json": {"model": "tiny-cond", "labels": 3}},
        422,
        "labels[0]",
    ),
    (
        "label unknown name",
        "POST",
        "/sample",
        {"json": {"model": "tiny-cond", "labels": "cat"}},
        422,
        "labels[0]",
    ),
    ("unknown field", "POST", "/sample", {"json": {"num_imagez": 2}}, 422, "num_imagez"),
    ("bad format", "POST", "/sample", {"json": {"format": "gif"}}, 422, "format"),
    (
        "malformed json",
        "POST",
        "/sample",
        {"content": b'{"steps": 2', "headers": {"content-type": "application/json"}},
        422,
        "body",
    ),
    ("json not an object", "POST", "/sample", {"json": [1, 2]}, 422, "body"),
    ("empty body", "POST", "/sample", {"content": b""}, 422, "body"),
    (
        "wrong content type",
        "POST",
        "/sample",
        {"content": b"steps=2", "headers": {"content-type": "text/plain"}},
        415,
        "content-type",
    ),
    ("body too large", "POST", "/purify", {"json": purify(images=["A" * 300_000])}, 413, "body"),
    (
        "idempotency key too long",
        "POST",
        "/sample",
        {"json": {"steps": 1, "async": True}, "headers": {"Idempotency-Key": "k" * 300}},
        422,
        "Idempotency-Key",
    ),
    ("unknown job", "GET", "/jobs/0123456789abcdef0123456789abcdef", {}, 404, "job_id"),
    ("malformed job id", "GET", "/jobs/not-a-job!", {}, 404, "job_id"),
    ("dot-dot job path", "GET", "/jobs/..%2f..", {}, 404, "path"),
    ("cancel unknown job", "DELETE", "/jobs/deadbeef", {}, 404, "job_id"),
    ("unknown route", "GET", "/nope", {}, 404, "path"),
    ("wrong method", "PUT", "/sample", {}, 405, "path"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "field"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any], status: int, field: str
) -> None:
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["errors"][0]["field"] == field, body
    assert body["errors"][0]["reason"] and body["detail"] and body["error"]
    # one reason per problem: a union's other members ("a list", "an integer") add nothing
    assert not any("should be a valid" in e["reason"] for e in body["errors"][1:]), body


def test_a_union_value_gets_the_reason_of_its_own_type(client: TestClient) -> None:
    """A seed below 0 is refused for being below 0, not for not being a list (multipart sends one
    seed as a bare number)."""
    r = client.post(
        "/purify", files=[("files", GOOD)], data={"model": "tiny", "npy_range": "-1,1", "seeds": "-1"}
    )
    assert r.json()["errors"] == [{"field": "seeds", "reason": "Input should be greater than or equal to 0"}]
    r = client.post("/sample", json={"seeds": [-1]})
    assert r.json()["errors"] == [
        {"field": "seeds[0]", "reason": "Input should be greater than or equal to 0"}
    ]


def test_media_types_are_case_insensitive(client: TestClient) -> None:
    r = client.post(
        "/sample", content=b'{"steps": 1, "seeds": 3}', headers={"content-type": "Application/JSON"}
    )
    assert r.status_code == 200, r.text


def test_large_content_length_refused_before_reading(client: TestClient) -> None:
    r = client.post(
        "/sample", content=b"{}", headers={"content-length": str(10**9), "content-type": "application/json"}
    )
    assert r.status_code == 413


def test_queue_full_is_429_with_retry_after(private_redis: Any, client: TestClient, make_client: Any) -> None:
    models = client.get("/models").json()["models"]
    import json

    import redis

    r = redis.Redis.from_url(private_redis.url)
    # A registry and no worker. eval_s 0: no run-time estimate, so the synchronous request below waits
    # out its timeout (a busy machine's measured eval_s would otherwise turn it into a 202 at once).
    r.hset("robustdiff:models", mapping={m["name"]: json.dumps({**m, "eval_s": 0.0}) for m in models})
    with make_client(private_redis.url, max_queue_depth=2, request_timeout_s=0.3) as c:
        for _ in range(2):
            assert c.post("/sample", json={"model": "tiny", "async": True}).status_code == 202
        full = c.post("/sample", json={"model": "tiny", "async": True})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["errors"][0]["field"] == "queue"
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["workers"] == 0
    with make_client(private_redis.url, max_queue_depth=10, request_timeout_s=0.3) as c:
        slow = c.post("/sample", json={"model": "tiny"})
        assert slow.status_code == 504 and slow.headers["location"].startswith("/jobs/")


def test_api_keys(client: TestClient, redis_server: Any, make_client: Any) -> None:
    with make_client(redis_server.url, api_keys=["k1", "k2"]) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/readyz").status_code == 200
        denied = c.get("/models")
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert denied.json()["errors"][0]["field"] == "Authorization"
        assert c.get("/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.post("/sample", json={}, headers={"Authorization": "Basic k1"}).status_code == 401


def _encoded(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt", "said"),
    [
        ("RGBA", "PNG", "a PNG of mode RGBA (4 channels, read as RGB), 16x16"),
        ("CMYK", "JPEG", "a JPEG of mode CMYK (4 channels, read as RGB), 16x16"),
    ],
)
def test_an_image_of_another_mode_is_named_by_its_mode(
    client: TestClient, mode: str, fmt: str, said: str
) -> None:
    """Not "shape [3, 16, 16]", the shape it had after conversion: the mode and channels it was sent in."""
    r = client.post("/purify", json=purify(images=[b64(_encoded(mode, fmt))]))
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert error["field"] == "images[0]" and said in error["reason"], error
    assert "grey (1 channel) 16x16" in error["reason"] and "resize: true" in error["reason"], error
    converted = client.post("/purify", json=purify(images=[b64(_encoded(mode, fmt))], resize=True, seeds=[1]))
    assert converted.status_code == 200, converted.text


def test_too_many_files_names_the_field_and_the_limit(client: TestClient) -> None:
    """One file over ROBUSTDIFF_MAX_IMAGES (8 in these tests) stops the multipart parser; the answer
    says so, not "malformed multipart body (400: Too many files...)"."""
    files = [("files", (f"{i}.png", png(), "image/png")) for i in range(9)]
    r = client.post("/purify", files=files, data={"model": "tiny", "steps": "2"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [
        {
            "field": "files",
            "reason": "more than the maximum of 8 files (ROBUSTDIFF_MAX_IMAGES) in one request",
        }
    ]
    fields = {f"x{i}": "1" for i in range(70)}
    r = client.post("/purify", files=files[:1], data=fields)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body", r.text
    assert "64 form fields" in r.json()["errors"][0]["reason"]
