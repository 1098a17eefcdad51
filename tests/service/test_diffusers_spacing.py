"""diffusers' timestep spacings and DDIM's eps convention over HTTP, through the test run's real
Redis and worker: the images are bitwise the library call's, bad values are a 422 naming the field."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.pipeline import Pipeline
from tests.service.test_e2e import decode_npy

SEEDS = [3, 11]


@pytest.fixture(scope="module")
def tiny(checkpoints: dict[str, Path]) -> Pipeline:
    return Pipeline.from_checkpoint(checkpoints["tiny"], "cpu")


def npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("spacing", "ddim_eps"), [("trailing", "from-x0"), ("leading", "model")])
def test_sample_with_a_diffusers_spacing_is_the_library_call(
    client: TestClient, tiny: Pipeline, spacing: str, ddim_eps: str
) -> None:
    body = {"model": "tiny", "seeds": SEEDS, "num_images": 2, "steps": 10, "format": "npy"}
    r = client.post("/sample", json={**body, "spacing": spacing, "ddim_eps": ddim_eps})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["spacing"], out["ddim_eps"], out["sampler"], out["steps"]) == (spacing, ddim_eps, "ddim", 10)
    ours = tiny.sample(SEEDS, sampler="ddim", steps=10, spacing=spacing, ddim_eps=ddim_eps)  # type: ignore[arg-type]
    np.testing.assert_array_equal(decode_npy(out["array"]), ours.numpy())
    default = client.post("/sample", json=body).json()
    assert default["spacing"] is None and default["ddim_eps"] == "from-x0"
    assert not np.array_equal(decode_npy(default["array"]), ours.numpy())  # the spacing was used


def test_purify_with_the_networks_eps_is_the_library_call(client: TestClient, tiny: Pipeline) -> None:
    images = np.random.default_rng(0).uniform(-1, 1, (2, 1, 16, 16)).astype(np.float32)
    common = {"model": "tiny", "seeds": SEEDS, "t_star": 0.6, "steps": 6, "format": "npy"}
    r = client.post(
        "/purify", json={**common, "images": [npy_b64(images)], "npy_range": "-1,1", "ddim_eps": "model"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["ddim_eps"] == "model"
    ref = tiny.purify(torch.from_numpy(images), SEEDS, t_star=0.6, steps=6, ddim_eps="model")
    np.testing.assert_array_equal(decode_npy(r.json()["array"])[:, 0], ref.numpy())
    clipped = tiny.purify(torch.from_numpy(images), SEEDS, t_star=0.6, steps=6)
    assert not torch.equal(ref, clipped)  # x0 was clipped: the two conventions differ here
    form = {k: json.dumps(v) for k, v in common.items()} | {"ddim_eps": "model", "npy_range": "-1,1"}
    files = [("files", ("x.npy", base64.b64decode(npy_b64(images)), "application/octet-stream"))]
    m = client.post("/purify", data=form, files=files)
    assert m.status_code == 200, m.text
    assert m.json()["array"] == r.json()["array"]


@pytest.mark.parametrize(
    ("route", "body", "field", "reason"),
    [
        ("/sample", {"spacing": "cosine"}, "spacing", "Input should be 'leading', 'trailing' or 'linspace'"),
        ("/sample", {"spacing": 1}, "spacing", "Input should be 'leading', 'trailing' or 'linspace'"),
        ("/sample", {"ddim_eps": "clipped"}, "ddim_eps", "Input should be 'from-x0' or 'model'"),
        (
            "/sample",
            {"spacing": "trailing", "model": "tiny-cm"},
            "spacing",
            "for diffusion samplers, not consistency",
        ),
        ("/sample", {"spacing": "leading", "times": [0.5]}, "spacing", "give either times or a spacing"),
        ("/sample", {"spacing": "leading", "steps": 1001}, "steps", "at most 1000 steps fit in T = 1000"),
        ("/sample", {"ddim_eps": "model", "sampler": "ddpm"}, "ddim_eps", "'model' with the ddim sampler"),
        ("/sample", {"ddim_eps": "model", "model": "tiny-cm"}, "ddim_eps", "'model' with the ddim sampler"),
        ("/purify", {"spacing": "trailing"}, "spacing", "for sampling from noise, not for purification"),
    ],
)
def test_bad_spacing_or_ddim_eps_is_422_naming_the_field(
    client: TestClient, route: str, body: dict[str, Any], field: str, reason: str
) -> None:
    if route == "/purify":
        zeros = np.zeros((1, 1, 16, 16), np.float32)
        body = {**body, "images": [npy_b64(zeros)], "npy_range": "-1,1"}
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert [e["field"] for e in errors] == [field] and reason in errors[0]["reason"], errors


def test_multipart_spacing_is_refused_by_name(client: TestClient) -> None:
    files = [("files", ("x.npy", base64.b64decode(npy_b64(np.zeros((1, 1, 16, 16), np.float32))), "x"))]
    r = client.post("/purify", data={"spacing": "leading", "npy_range": "-1,1"}, files=files)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "spacing", r.text
