"""The step-level engine's invariant: every image is bitwise identical on the CPU to the same request
run alone, whatever joined or left the running batch around it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from models.pipeline import Pipeline
from models.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pipeline]:
    d = tmp_path_factory.mktemp("rb")
    return {
        "diffusion": Pipeline.from_checkpoint(tiny_checkpoint(d / "d.safetensors", num_classes=3)),
        "consistency": Pipeline.from_checkpoint(
            tiny_checkpoint(d / "c.safetensors", kind="consistency", seed=2)
        ),
    }


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 16, 16), generator=g) * 2 - 1


# (key, join at step, seeds, request); labels are the first class of each image for the 3-class model.
DIFFUSION_JOBS: list[tuple[str, int, list[int], dict[str, Any]]] = [
    ("ddpm-long", 0, [1, 2], {"sampler": "ddpm", "steps": 9}),
    ("ddim-eta", 0, [3], {"sampler": "ddim", "steps": 4, "eta": 0.7}),
    ("dpm", 1, [4, 5, 6], {"sampler": "dpm-solver++", "steps": 5}),
    ("purify", 2, [7, 8], {"sampler": "ddim", "steps": 3, "t_star": 0.3, "images": _images(2, 0)}),
    ("purify-dpm", 3, [9], {"sampler": "dpm-solver++", "steps": 3, "t_star": 0.5, "images": _images(1, 1)}),
    ("cancelled", 0, [10, 11], {"sampler": "ddpm", "steps": 8}),
    ("times", 4, [12], {"sampler": "ddim", "times": [0.6, 0.2]}),
]


def _alone(pipe: Pipeline, seeds: list[int], request: dict[str, Any]) -> torch.Tensor:
    args = dict(request)
    images = args.pop("images", None)
    if images is None:
        return pipe.sample(seeds, **args)
    return pipe.purify(images, seeds, **args)


def _run_mixed(
    pipe: Pipeline,
    jobs: list[tuple[str, int, list[int], dict[str, Any]]],
    leave: Callable[[int], list[str]] = lambda step: [],
    defer: Callable[[int, str], bool] = lambda step, key: False,
) -> dict[str, torch.Tensor]:
    batch = pipe.running_batch()
    finished: dict[str, torch.Tensor] = {}
    step = 0
    sizes = set()
    while step == 0 or batch.groups:
        for key, at, seeds, request in jobs:
            if at == step:
                group, x = pipe.request(key, seeds, **request)
                batch.add(group, x)
        for key in leave(step):
            batch.remove(key)
        sizes.add(batch.rows)
        keys = [g.key for g in batch.groups if not defer(step, str(g.key))]
        with torch.inference_mode():
            batch.step(keys)
        for group in [g for g in batch.groups if g.done]:
            finished[str(group.key)] = batch.remove(group.key).float().cpu()
        step += 1
    assert len(sizes) > 2  # the batch really changed shape along the way
    return finished


def test_mixed_diffusion_rows_equal_each_request_alone(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["diffusion"]
    jobs = [(k, at, seeds, {**req, "labels": [s % 3 for s in seeds]}) for k, at, seeds, req in DIFFUSION_JOBS]
    finished = _run_mixed(pipe, jobs, leave=lambda step: ["cancelled"] if step == 3 else [])
    assert sorted(finished) == sorted(k for k, *_ in jobs if k != "cancelled")
    for key, _, seeds, request in jobs:
        if key != "cancelled":
            assert torch.equal(finished[key], _alone(pipe, seeds, request)), key


def test_rows_deferred_at_some_steps_equal_each_request_alone(pipes: dict[str, Pipeline]) -> None:
    """The step policy may leave a job's rows out of an evaluation: they wait, untouched, and the image
    is still bitwise the request's alone (DPM-Solver++'s x0 history included)."""
    pipe = pipes["diffusion"]
    jobs = [(k, at, seeds, {**req, "labels": [s % 3 for s in seeds]}) for k, at, seeds, req in DIFFUSION_JOBS]
    skipped: dict[str, int] = {}

    def defer(step: int, key: str) -> bool:
        out = (step + len(key)) % 3 == 0
        skipped[key] = skipped.get(key, 0) + out
        return out

    finished = _run_mixed(pipe, jobs, leave=lambda step: ["cancelled"] if step == 3 else [], defer=defer)
    assert all(skipped[key] >= 1 for key in finished)  # every job really waited at least once
    for key, _, seeds, request in jobs:
        if key != "cancelled":
            assert torch.equal(finished[key], _alone(pipe, seeds, request)), key


def test_a_deferred_group_keeps_its_rows_and_step(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["diffusion"]
    batch = pipe.running_batch()
    for key, seeds in (("a", [1, 2]), ("b", [3]), ("c", [4, 5])):
        group, x = pipe.request(key, seeds, sampler="dpm-solver++", steps=4, labels=[0] * len(seeds))
        batch.add(group, x)
    assert batch.x is not None
    before = batch.x.clone()
    with torch.inference_mode():
        batch.step(["a", "c"])
    assert [g.step for g in batch.groups] == [1, 0, 1]
    assert torch.equal(batch.x[2:3], before[2:3])  # b's row waited
    assert not torch.equal(batch.x[:2], before[:2]) and not torch.equal(batch.x[3:], before[3:])
    with pytest.raises(KeyError, match="not running"):
        batch.step(["nobody"])


def test_mixed_consistency_rows_equal_each_request_alone(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["consistency"]
    jobs: list[tuple[str, int, list[int], dict[str, Any]]] = [
        ("one-step", 0, [1, 2], {"sampler": "consistency", "steps": 1}),
        ("multistep", 0, [3], {"sampler": "consistency", "times": [0.8, 0.4, 0.1]}),
        ("purify", 1, [4], {"sampler": "consistency", "steps": 2, "t_star": 0.4, "images": _images(1, 2)}),
        ("late", 2, [5, 6, 7], {"sampler": "consistency", "steps": 3}),
    ]
    finished = _run_mixed(pipe, jobs)
    for key, _, seeds, request in jobs:
        assert torch.equal(finished[key], _alone(pipe, seeds, request)), key


def test_request_refuses_what_sample_refuses(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["diffusion"]
    with pytest.raises(ValueError, match="eta: only the ddim sampler"):
        pipe.request("x", [1], sampler="ddpm", eta=0.5, labels=[0])
    with pytest.raises(ValueError, match="labels"):
        pipe.request("x", [1], sampler="ddim")
    with pytest.raises(ValueError, match="images: shape"):
        pipe.request("x", [1], labels=[0], images=torch.zeros(1, 3, 16, 16), t_star=0.2)
    batch = pipe.running_batch()
    group, x = pipe.request("x", [1], labels=[0], steps=2)
    batch.add(group, x)
    with pytest.raises(ValueError, match="already running"):
        batch.add(group, x)
