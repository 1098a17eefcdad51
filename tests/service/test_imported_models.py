"""Diffusers folders served directly (ROBUSTDIFF_MODELS=name=FOLDER), every supported layout in one
worker: RGB PNG in and out over HTTP, through a real Redis and a real worker, and each served image
equal to the library's own sample or purification of the same folder with the same seeds (bitwise
on the CPU for the float output), class labels for the consistency model."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models.errors import UserError
from models.noise import NoiseSource
from models.pipeline import Pipeline
from models.sampling_spec import default_sampler
from models.testing import (
    CD_IMAGENET64_REDUCED,
    CD_SCHEDULER,
    DDPM_256_REDUCED,
    DDPM_CIFAR10_32,
    DDPM_SCHEDULER,
    SMALL_DDPM,
    diffusers_unet,
    write_diffusers_folder,
)
from service import images as imgs
from service.redis_server import RedisServer
from service.settings import Settings
from tests.service.conftest import WorkerProc, api_client, wait_for

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a test-only dependency (pip install -e '.[test]')"
)

OLD_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


# The 256x256 DDPM layout (block types, padding, attention at 16x16) at half the test library's widths:
# at 256x256 the cost of an evaluation is in the full-resolution levels.
DDPM_256_NARROW = {**DDPM_256_REDUCED, "block_out_channels": [8, 8, 16, 16, 32, 32], "norm_num_groups": 8}


@dataclass
class Served:
    redis: RedisServer
    folders: dict[str, Path]  # served name -> diffusers folder
    cifar: torch.nn.Module  # diffusers' own UNet2DModel behind "cifar32"


def _old_key_names(folder: Path) -> None:
    """Rewrite a saved UNet's attention weights under diffusers' pre-0.14 names."""
    path = folder / "diffusion_pytorch_model.safetensors"
    old = {}
    for key, value in load_file(str(path)).items():
        for new, legacy in OLD_NAMES.items():
            key = key.replace(new, legacy)
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(path))


def _folders(root: Path) -> tuple[dict[str, Path], torch.nn.Module]:
    """One folder per supported layout, each with its own random weights (seed) so a mix-up shows;
    and diffusers' network of the ddpm-cifar10-32 one."""
    cifar = diffusers_unet(DDPM_CIFAR10_32, seed=1, sharpen=1.0)
    cosine_v = {**DDPM_SCHEDULER, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    folders = {
        "cifar32": write_diffusers_folder(  # google/ddpm-cifar10-32's exact public config
            root / "ddpm-cifar10-32", cifar, DDPM_SCHEDULER
        ),
        "ddpm256": write_diffusers_folder(  # the 256x256 DDPM layout at reduced widths
            root / "ddpm-256", diffusers_unet(DDPM_256_NARROW, seed=2, sharpen=1.0), DDPM_SCHEDULER
        ),
        "cm64": write_diffusers_folder(  # cd_imagenet64's layout at reduced widths, 1000 classes
            root / "cd64", diffusers_unet(CD_IMAGENET64_REDUCED, seed=3, sharpen=1.0), CD_SCHEDULER
        ),
        "bare16": write_diffusers_folder(  # config.json + weights only: DDPM's linear betas
            root / "bare", diffusers_unet(SMALL_DDPM, seed=4), None, "bare"
        ),
        "old16": write_diffusers_folder(  # pre-0.14 attention names, a root scheduler_config.json
            root / "old", diffusers_unet(SMALL_DDPM, seed=5), cosine_v, "root"
        ),
    }
    _old_key_names(folders["old16"])
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    diffusers.DDIMPipeline(unet=diffusers_unet(SMALL_DDPM, seed=6), scheduler=ddim).save_pretrained(
        root / "ddim"
    )
    folders["ddim16"] = root / "ddim"
    assert json.loads((root / "ddim" / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    return folders, cifar


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One Redis and ONE worker serving every layout (its start-up and warm-up paid once)."""
    folders, cifar = _folders(tmp_path_factory.mktemp("diffusers"))
    redis = RedisServer().start()
    worker = WorkerProc(
        redis.url, [Path(f"{name}={path}") for name, path in folders.items()], tmp_path_factory.mktemp("logs")
    )
    try:
        worker.start()
        yield Served(redis, folders, cifar)
    finally:
        worker.kill()
        redis.close()


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _photo(size: int, seed: int) -> np.ndarray:
    """A smooth RGB test picture (a 256x256 one compresses to a PNG well within the body limit)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def _rgb(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


# name -> (sample request fields, purify request fields); few steps: the point is exactness, not quality
REQUESTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # diffusers' DDIMPipeline call: leading spacing, the network's eps kept after clipping x0
    "cifar32": ({"steps": 2, "spacing": "leading", "ddim_eps": "model"}, {"t_star": 0.3, "steps": 1}),
    "ddpm256": ({"steps": 1}, {"t_star": 0.3, "steps": 1}),  # the costly one: few evaluations
    # a named strength: the t* of medium's noise level on the CM's own Karras grid
    "cm64": ({"times": [0.45], "labels": [7, 998]}, {"strength": "medium", "steps": 1, "labels": [3]}),
    "ddim16": ({"steps": 3}, {"t_star": 0.4, "steps": 2}),
    "bare16": ({"steps": 3}, {"t_star": 0.4, "steps": 2}),
    "old16": ({"steps": 3}, {"t_star": 0.4, "steps": 2}),
}
SIZES = {"cifar32": 32, "ddpm256": 256, "cm64": 64, "ddim16": 16, "bare16": 16, "old16": 16}


def test_every_layout_served_equals_the_library(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = [5, 6]  # one job each: seed 5 as float32 .npy (compared bitwise), seed 6 as a PNG
    photos = {name: _photo(size, i) for i, (name, size) in enumerate(SIZES.items())}
    with api_client(served.redis.url, default_model="cifar32") as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert {n: models[n]["image_shape"] for n in SIZES} == {n: [3, s, s] for n, s in SIZES.items()}
        assert models["cm64"]["kind"] == "consistency" and models["cm64"]["num_classes"] == 1000
        assert len({models[n]["hash"] for n in SIZES}) == len(SIZES)
        # Named strengths are one noise level (sigma 0.17 / 0.34 / 0.72) at each model's own t*.
        assert models["cifar32"]["strengths"] == {"light": 0.05, "medium": 0.1, "strong": 0.2}
        assert models["cm64"]["strengths"] == {"light": 0.275, "medium": 0.325, "strong": 0.4}
        # Every job first (async), then every result: they share the worker's running batches.
        jobs: dict[tuple[str, str], str] = {}
        for name, (sample, purify) in REQUESTS.items():
            for i, fmt in enumerate(("npy", "png")):
                body = {"model": name, "seeds": [seeds[i]], "format": fmt, "async": True, "num_images": 1}
                if "labels" in sample:
                    body["labels"] = sample["labels"][i : i + 1]
                r = c.post("/sample", json={**sample, **body})
                assert r.status_code == 202, r.text
                jobs[(name, f"sample-{fmt}")] = r.headers["Location"]
            body = {"model": name, "images": [_png(photos[name])], "seeds": [9], "async": True, **purify}
            r = c.post("/purify", json=body)
            assert r.status_code == 202, r.text
            jobs[(name, "purify")] = r.headers["Location"]
        results = {}
        for key, location in jobs.items():
            job = wait_for(
                lambda loc=location: (j := c.get(loc).json())["status"] in ("done", "failed") and j, 120
            )
            assert job["status"] == "done", (key, job)
            results[key] = job["result"]

    for name, (sample, purify) in REQUESTS.items():
        pipe = Pipeline.from_checkpoint(served.folders[name], name=name)
        assert pipe.info.hash == models[name]["hash"]
        assert pipe.info.strengths == models[name]["strengths"]
        kw = {k: v for k, v in sample.items() if k != "labels"}
        sampler = default_sampler(pipe.info.kind)  # what a request naming none runs
        ours = pipe.sample(seeds, sampler=sampler, labels=sample.get("labels"), **kw)
        served_floats = torch.from_numpy(imgs.load_npy_b64(results[(name, "sample-npy")]["array"]))
        assert torch.equal(served_floats, ours[:1]), f"{name}: served sample differs from the library's"
        assert ours.std() > 0.05  # a real image, not a constant
        # The served PNG is byte for byte the encoding of the library's image: RGB, same pixels.
        served_png = results[(name, "sample-png")]["images"][0]
        assert _rgb(served_png).shape == (SIZES[name],) * 2 + (3,)
        assert served_png == imgs.png_b64(ours[1].numpy()), f"{name}: served PNG differs"

        decoded = imgs.decode(base64.b64decode(_png(photos[name])), "images[0]", None)[0].array
        kw = {k: v for k, v in purify.items() if k not in ("labels", "strength")}
        if "strength" in purify:
            kw["t_star"] = pipe.info.strengths[purify["strength"]]
        assert results[(name, "purify")]["t_star"] == kw["t_star"]  # the response says which t* ran
        image = torch.from_numpy(decoded)[None]
        purified = pipe.purify(image, [9], sampler=sampler, labels=purify.get("labels"), **kw)
        served_purified = results[(name, "purify")]["images"][0][0]
        assert _rgb(served_purified).shape == (SIZES[name],) * 2 + (3,)
        assert served_purified == imgs.png_b64(purified[0].numpy()), f"{name}: purify differs"
        assert not np.array_equal(_rgb(served_purified), photos[name])  # it did change the input

    # What is served is what diffusers computes: DDIMPipeline from the same starting noise.
    noise = NoiseSource(seeds[:1], (3, 32, 32)).initial()
    monkeypatch.setattr("diffusers.pipelines.ddim.pipeline_ddim.randn_tensor", lambda *a, **k: noise.clone())
    scheduler = diffusers.DDIMScheduler.from_config(DDPM_SCHEDULER, timestep_spacing="leading")
    theirs = diffusers.DDIMPipeline(unet=served.cifar, scheduler=scheduler)(
        batch_size=1, num_inference_steps=2, eta=0.0, output_type="np"
    ).images
    served_cifar = imgs.load_npy_b64(results[("cifar32", "sample-npy")]["array"])
    assert np.abs((served_cifar / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1) - theirs).max() < 1e-4


def test_consistency_model_labels_and_a_request_too_long_for_the_timeout(served: Served) -> None:
    with api_client(served.redis.url, default_model="bare16") as c:
        s = c.post("/sample", json={"model": "cm64", "num_images": 2, "labels": [7, 998], "seeds": 1})
        assert s.status_code == 200, s.text
        assert s.json()["labels"] == [7, 998] and s.json()["steps"] == 1
        unlabelled = c.post("/sample", json={"model": "cm64", "num_images": 1, "labels": [1000]})
        assert unlabelled.status_code == 422
        eval_s = {m["name"]: m["eval_s"] for m in c.get("/models").json()["models"]}["bare16"]
    # A synchronous request the worker's measured speed says cannot finish in time: 202 at once.
    assert eval_s > 0
    big = {"model": "bare16", "num_images": 8, "steps": 20, "seeds": 9}
    with api_client(served.redis.url, default_model="bare16", request_timeout_s=8 * 20 * eval_s / 2) as c:
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
