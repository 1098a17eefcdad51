"""Diffusers folders served directly (ROBUSTDIFF_MODELS=name=FOLDER): RGB PNG in and out over HTTP,
through a real Redis and a real worker, class labels for the consistency model."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.errors import UserError
from models.testing import (
    CD_IMAGENET64_REDUCED,
    CD_SCHEDULER,
    DDPM_SCHEDULER,
    SMALL_DDPM,
    diffusers_unet,
    write_diffusers_folder,
)
from service.settings import Settings

pytest.importorskip("diffusers", reason="diffusers is a test-only dependency (pip install -e '.[test]')")


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _rgb(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_diffusers_folders_served_over_http(
    tmp_path: Path, private_redis: Any, spawn_worker: Any, make_client: Any, wait_for: Any
) -> None:
    ddpm = write_diffusers_folder(tmp_path / "ddpm", diffusers_unet(SMALL_DDPM, sharpen=1.0), DDPM_SCHEDULER)
    cm = write_diffusers_folder(
        tmp_path / "cm", diffusers_unet(CD_IMAGENET64_REDUCED, sharpen=1.0), CD_SCHEDULER
    )
    spawn_worker(private_redis.url, models=[Path(f"ddpm16={ddpm}"), Path(f"cm64={cm}")])
    with make_client(private_redis.url, default_model="ddpm16") as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert models["ddpm16"]["image_shape"] == [3, 16, 16] and models["cm64"]["kind"] == "consistency"
        assert models["cm64"]["num_classes"] == 1000

        r = c.post("/sample", json={"model": "ddpm16", "num_images": 2, "steps": 3, "seeds": 4})
        assert r.status_code == 200, r.text
        assert [_rgb(img).shape for img in r.json()["images"]] == [(16, 16, 3)] * 2

        photo = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        p = c.post("/purify", json={"model": "ddpm16", "images": [_png(photo)], "t_star": 0.1, "steps": 2})
        assert p.status_code == 200, p.text
        assert _rgb(p.json()["images"][0][0]).shape == (16, 16, 3)

        s = c.post("/sample", json={"model": "cm64", "num_images": 2, "labels": [7, 998], "seeds": 1})
        assert s.status_code == 200, s.text
        assert s.json()["labels"] == [7, 998] and s.json()["steps"] == 1
        assert [_rgb(img).shape for img in s.json()["images"]] == [(64, 64, 3)] * 2
        big = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        q = c.post("/purify", json={"model": "cm64", "images": [_png(big)], "labels": 3, "t_star": 0.5})
        assert q.status_code == 200, q.text
        assert _rgb(q.json()["images"][0][0]).shape == (64, 64, 3)
        unlabelled = c.post("/sample", json={"model": "cm64", "num_images": 1, "labels": [1000]})
        assert unlabelled.status_code == 422

    # A synchronous request the worker's measured speed says cannot finish in time: 202 at once.
    eval_s = models["ddpm16"]["eval_s"]
    assert eval_s > 0
    big = {"model": "ddpm16", "num_images": 8, "steps": 20, "seeds": 9}
    with make_client(private_redis.url, default_model="ddpm16", request_timeout_s=8 * 20 * eval_s / 2) as c:
        r = c.post("/sample", json=big)
        assert r.status_code == 202, r.text
        assert "exceeds" in r.json()["reason"] and r.headers["Location"] == r.json()["location"]
        done = wait_for(lambda: (j := c.get(r.headers["Location"]).json())["status"] == "done" and j, 60)
        assert len(done["result"]["images"]) == 8
        assert c.post("/sample", json={**big, "num_images": 1, "steps": 1}).status_code == 200


def test_a_pickle_only_folder_is_refused_before_serving(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    diffusers_unet(SMALL_DDPM).save_pretrained(folder, safe_serialization=False)  # type: ignore[operator]
    with pytest.raises(UserError, match="import-diffusers") as err:
        Settings(models=[str(folder)]).model_files()
    assert err.value.field == "ROBUSTDIFF_MODELS"
    with pytest.raises(UserError, match="not a diffusers model"):
        Settings(models=[str(tmp_path)]).model_files()
