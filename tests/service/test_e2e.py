"""End to end through HTTP: the API app, the test run's real Redis and a real worker process."""

from __future__ import annotations

import base64
import io
import uuid
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def decode_npy(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def grey_png(seed: int = 0, size: int = 16) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


def test_sample_png_is_reproducible(client: TestClient) -> None:
    body = {"model": "tiny", "num_images": 2, "steps": 3, "seeds": 7}
    first = client.post("/sample", json=body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["seeds"] == [7, 8] and out["model"] == "tiny" and len(out["model_hash"]) == 64
    assert out["sampler"] == "ddim" and out["steps"] == 3
    assert set(out["timings"]) == {"queue_s", "compute_s", "total_s", "batch_images"}
    images = [decode_png(x) for x in out["images"]]
    assert images[0].shape == (16, 16) and images[0].dtype == np.uint8
    again = client.post("/sample", json=body).json()
    assert again["images"] == out["images"]


def test_sample_npy_random_seeds_returned(client: TestClient) -> None:
    r = client.post("/sample", json={"num_images": 3, "steps": 2, "format": "npy", "sampler": "ddpm"})
    assert r.status_code == 200, r.text
    out = r.json()
    arr = decode_npy(out["array"])
    assert arr.shape == (3, 1, 16, 16) and arr.dtype == np.float32
    assert arr.min() >= -1 and arr.max() <= 1
    assert len(out["seeds"]) == 3 and out["model"] == "tiny"
    same = client.post(
        "/sample",
        json={"num_images": 3, "steps": 2, "format": "npy", "sampler": "ddpm", "seeds": out["seeds"]},
    ).json()
    np.testing.assert_array_equal(decode_npy(same["array"]), arr)


def test_conditional_labels(client: TestClient) -> None:
    r = client.post("/sample", json={"model": "tiny-cond", "num_images": 2, "steps": 2, "labels": ["2", 0]})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == [2, 0]
    derived = client.post(
        "/sample", json={"model": "tiny-cond", "num_images": 2, "steps": 2, "seeds": 5}
    ).json()
    assert derived["labels"] == [5 % 3, 6 % 3]


def test_purify_json_png_and_npy_with_draws(client: TestClient) -> None:
    npy = io.BytesIO()
    np.save(npy, np.random.default_rng(1).uniform(0, 1, (2, 1, 16, 16)).astype(np.float32))
    body = {
        "model": "tiny",
        "images": [base64.b64encode(grey_png()).decode(), base64.b64encode(npy.getvalue()).decode()],
        "npy_range": "0,1",
        "strength": "light",
        "steps": 2,
        "draws": 2,
        "seeds": 100,
        "format": "npy",
    }
    r = client.post("/purify", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert decode_npy(out["array"]).shape == (3, 2, 1, 16, 16)
    assert out["seeds"] == [[100, 101], [102, 103], [104, 105]] and out["t_star"] == 0.05


def test_purify_multipart_with_resize(client: TestClient) -> None:
    rgb = png_bytes(np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    files = [("files", ("a.png", grey_png(), "image/png")), ("files", ("b.png", rgb, "image/png"))]
    data = {"model": "tiny", "t_star": "0.2", "steps": "2", "resize": "true", "seeds": "[1, 2]"}
    r = client.post("/purify", files=files, data=data)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == 2 and len(out["images"][0]) == 1
    assert decode_png(out["images"][1][0]).shape == (16, 16)
    refused = client.post("/purify", files=files, data={"model": "tiny"})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "files[1]"


def test_consistency_model_one_step(client: TestClient) -> None:
    r = client.post("/sample", json={"model": "tiny-cm", "num_images": 2, "seeds": 1})
    assert r.status_code == 200, r.text
    assert r.json()["sampler"] == "consistency" and r.json()["steps"] == 1
    p = client.post("/purify", json={"model": "tiny-cm", "images": [base64.b64encode(grey_png()).decode()]})
    assert p.status_code == 200, p.text
    wrong = client.post("/sample", json={"model": "tiny", "sampler": "consistency"})
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "sampler"
    assert "consistency model" in wrong.json()["detail"]


def test_consistency_multistep_at_chosen_times(client: TestClient) -> None:
    """times=[0.5] is the grid that steps=2 lays (1, 0.5, 0): the same images, and it is echoed."""
    body = {"model": "tiny-cm", "num_images": 2, "seeds": 8}
    by_steps = client.post("/sample", json={**body, "steps": 2}).json()
    by_times = client.post("/sample", json={**body, "times": [0.5]}).json()
    assert by_times["steps"] == 2 and by_times["times"] == [0.5] and by_steps["times"] is None
    assert by_times["images"] == by_steps["images"]
    other = client.post("/sample", json={**body, "times": [0.8, 0.3]}).json()
    assert other["steps"] == 3 and other["images"] != by_times["images"]
    image = base64.b64encode(grey_png()).decode()
    purified = client.post(
        "/purify", json={"model": "tiny-cm", "images": [image], "t_star": 0.4, "times": [0.2]}
    )
    assert purified.status_code == 200 and purified.json()["steps"] == 2, purified.text


def test_purify_default_steps_fit_a_shallow_t_star(client: TestClient) -> None:
    """DDIM lays one step per DDPM step: at t* = 0.005 of T = 1000 only 5 fit, so the default (10)
    shrinks to 5; asking for 10 explicitly is refused with a 422 that names steps."""
    image = base64.b64encode(grey_png()).decode()
    ok = client.post("/purify", json={"model": "tiny", "images": [image], "t_star": 0.005})
    assert ok.status_code == 200 and ok.json()["steps"] == 5, ok.text
    refused = client.post("/purify", json={"model": "tiny", "images": [image], "t_star": 0.005, "steps": 10})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "steps", refused.text
    assert "fit below" in refused.json()["errors"][0]["reason"]


def test_async_then_poll(client: TestClient, wait_for: Any) -> None:
    r = client.post("/sample", json={"num_images": 1, "steps": 3, "seeds": 1, "async": True})
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    assert location == f"/jobs/{r.json()['id']}"
    done = wait_for(lambda: (j := client.get(location).json())["status"] == "done" and j)
    assert done["progress"] == {"step": 3, "steps": 3}
    assert done["result"]["seeds"] == [1]
    sync = client.post("/sample", json={"num_images": 1, "steps": 3, "seeds": 1}).json()
    assert sync["images"] == done["result"]["images"]


def test_cancel_running_job(client: TestClient, wait_for: Any) -> None:
    r = client.post("/sample", json={"model": "tiny", "num_images": 8, "steps": 20, "async": True})
    location = r.headers["location"]
    wait_for(lambda: client.get(location).json()["status"] in ("running", "done"), interval=0.005)
    cancel = client.delete(location)
    assert cancel.status_code in (200, 202, 409), cancel.text
    if cancel.status_code == 409:  # finished before the cancel arrived: nothing to test on this machine
        return
    final = wait_for(lambda: (j := client.get(location).json())["status"] in ("cancelled", "done") and j)
    assert final["status"] == "cancelled"
    assert final["progress"]["step"] < 20
    assert client.delete(location).status_code in (200, 409)


def test_idempotency_key(client: TestClient) -> None:
    key = uuid.uuid4().hex
    body = {"num_images": 1, "steps": 2, "seeds": 11, "async": True}
    a = client.post("/sample", json=body, headers={"Idempotency-Key": key})
    b = client.post("/sample", json=body, headers={"Idempotency-Key": key})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    assert a.json()["created"] is True and b.json()["created"] is False
    assert b.json()["status"] in ("queued", "running", "done")  # where the job is, a JobStatus status
    sync = client.post("/sample", json={**body, "async": False}, headers={"Idempotency-Key": key})
    assert sync.status_code == 200 and sync.json()["job_id"] == a.json()["id"]  # a retry that waits
    changed = client.post("/sample", json={**body, "seeds": 12}, headers={"Idempotency-Key": key})
    assert changed.status_code == 409 and changed.json()["errors"][0]["field"] == "Idempotency-Key"
    random_seeds = {"num_images": 1, "steps": 2}
    key2 = uuid.uuid4().hex
    first = client.post("/sample", json=random_seeds, headers={"Idempotency-Key": key2}).json()
    retry = client.post("/sample", json=random_seeds, headers={"Idempotency-Key": key2}).json()
    assert retry["job_id"] == first["job_id"] and retry["seeds"] == first["seeds"]
    other = client.post("/sample", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert other.json()["id"] != a.json()["id"]


def test_two_requests_batched_equal_each_alone(client: TestClient, wait_for: Any) -> None:
    # 20 steps: the second arrives while the first has enough work left to step beside it under the
    # CPU's srpt policy (within 4x), even when an earlier test's job keeps the worker from waiting.
    bodies = [
        {"model": "tiny", "num_images": 2, "steps": 20, "seeds": [21, 22], "async": True},
        {"model": "tiny", "num_images": 3, "steps": 20, "seeds": 40, "async": True},
    ]
    locations = [client.post("/sample", json=b).headers["location"] for b in bodies]
    together = [
        wait_for(lambda loc=loc: (j := client.get(loc).json())["status"] == "done" and j) for loc in locations
    ]
    # They shared the running batch for a good part of their steps (each saw more rows than its own).
    for body, t in zip(bodies, together, strict=True):
        assert t["result"]["timings"]["batch_images"] > body["num_images"]
    for body, both in zip(bodies, together, strict=True):
        alone = client.post("/sample", json={**body, "async": False}).json()
        assert "timings" in alone, alone.get("reason")
        assert alone["timings"]["batch_images"] == body["num_images"]
        assert alone["images"] == both["result"]["images"]


def test_models_and_readiness(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"tiny", "tiny-cond", "tiny-cm"}
    assert models["tiny"]["default"] and models["tiny"]["workers"] == 1
    assert models["tiny-cm"]["kind"] == "consistency" and models["tiny-cm"]["samplers"] == ["consistency"]
    assert models["tiny-cond"]["num_classes"] == 3 and models["tiny"]["image_shape"] == [1, 16, 16]
    assert models["tiny"]["timesteps"] == 1000
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 1
    for probe in ("/healthz", "/readyz"):  # load balancers probe with HEAD too
        head = client.head(probe)
        assert head.status_code == 200 and not head.content


def test_metrics_route(client: TestClient) -> None:
    client.post("/sample", json={"num_images": 1, "steps": 1})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "robustdiff_requests_total",
        "robustdiff_request_duration_seconds_bucket",
        "robustdiff_queue_size",
        "robustdiff_dead_letter_size",
        "robustdiff_workers_alive 1.0",
        "robustdiff_worker_heartbeat_age_seconds",
        "robustdiff_failures_total",
    ):
        assert name in text, name
    assert 'route="/sample"' in text
    assert client.get("/metrics", follow_redirects=False).status_code == 200  # a route: no redirect


def test_long_dead_workers_are_forgotten(client: TestClient, redis_server: Any) -> None:
    """A kill -9'd worker never deregisters: after the retention its heartbeat series goes away."""
    import json
    import time

    import redis

    from service.fleet import DEAD_WORKER_RETENTION_S

    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    beat = {"ts": time.time() - DEAD_WORKER_RETENTION_S - 5, "models": ["tiny"], "pid": 1}
    r.hset("robustdiff:heartbeats", "ghost-worker", json.dumps(beat))
    text = client.get("/metrics").text
    assert 'worker="ghost-worker"' not in text and "robustdiff_workers_alive 1.0" in text
    assert not r.hexists("robustdiff:heartbeats", "ghost-worker")


def test_unknown_job(client: TestClient) -> None:
    assert client.get(f"/jobs/{uuid.uuid4().hex}").status_code == 404
    assert client.delete(f"/jobs/{uuid.uuid4().hex}").status_code == 404


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32))
    return buf.getvalue()


@pytest.mark.parametrize("policy", ["fifo", "srpt"])
def test_a_short_request_overtakes_a_running_long_one_with_the_same_images(
    private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any, policy: str
) -> None:
    """Step-level batching through HTTP and a real Redis: rows of different samplers, steps, kinds
    and models join a running long job (fifo) or run while its rows wait (srpt; which rows wait when
    is timing-dependent here, and tested in-process in test_scheduler.py), finish first, and equal
    each request run alone."""
    url = private_redis.url
    env = {"ROBUSTDIFF_SCHEDULER_POLICY": policy, "ROBUSTDIFF_MAX_WAIT_MS": "0"}
    spawn_worker(url, ROBUSTDIFF_FAULT_STEP_DELAY_S="0.05", **env)
    image = {"images": [base64.b64encode(_npy(np.linspace(-1, 1, 256).reshape(1, 1, 16, 16))).decode()]}
    short = [
        {"model": "tiny", "sampler": "ddim", "steps": 2, "eta": 0.5, "seeds": 7},
        {"model": "tiny", "sampler": "dpm-solver++", "steps": 3, "num_images": 2, "seeds": 8},
        {"model": "tiny-cond", "sampler": "ddpm", "steps": 3, "labels": [1], "seeds": 9},
        {"model": "tiny-cm", "sampler": "consistency", "times": [0.5], "seeds": 10},
    ]
    purify = {
        "model": "tiny",
        "steps": 2,
        "t_star": 0.3,
        "npy_range": "-1,1",
        "draws": 2,
        "seeds": 11,
        **image,
    }
    with make_client(url, default_model="tiny") as c:
        long = c.post(
            "/sample", json={"sampler": "ddpm", "steps": 20, "num_images": 3, "seeds": 1, "async": True}
        ).headers["location"]
        wait_for(lambda: c.get(long).json().get("progress", {}).get("step", 0) >= 2)
        mixed = [c.post("/sample", json={**b, "async": True}).headers["location"] for b in short]
        mixed.append(c.post("/purify", json={**purify, "async": True}).headers["location"])
        results = [
            wait_for(lambda loc=loc: (j := c.get(loc).json())["status"] == "done" and j) for loc in mixed
        ]
        long_status = c.get(long).json()
        assert long_status["status"] == "running", "the short requests waited for the long one"
        assert long_status["progress"]["step"] < 20
        for body, result in zip([*short, purify], results, strict=True):
            route = "/purify" if "images" in body else "/sample"
            alone = c.post(route, json=body).json()
            assert alone["images"] == result["result"]["images"], body
            if body["model"] == "tiny" and policy == "fifo":  # one batch per model: beside the long job's 3
                outputs = len(alone["images"]) * body.get("draws", 1)  # type: ignore[operator]
                assert result["result"]["timings"]["batch_images"] >= outputs + 3
        done = wait_for(lambda: (j := c.get(long).json())["status"] == "done" and j, 60)
        assert done["progress"] == {"step": 20, "steps": 20}
