import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from models.grid import save_grid
from models.pipeline import Pipeline
from models.samplers import Cancelled
from models.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return Pipeline.from_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp("p") / "tiny.safetensors"))


def test_info(pipe: Pipeline) -> None:
    assert pipe.info.kind == "diffusion" and pipe.info.image_shape == (1, 16, 16)
    assert pipe.info.samplers == ["ddpm", "ddim", "dpm-solver++"] and len(pipe.info.hash) == 64
    assert pipe.info.timesteps == pipe.schedule.T == 1000
    assert json.loads(json.dumps(dataclasses.asdict(pipe.info)))["timesteps"] == 1000


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"times": [0.3, 0.6]}, "times: must be strictly decreasing"),
    ({"times": [0.5, 0.5]}, "times: must be strictly decreasing"),
    ({"times": [1.0]}, r"times: must be in \[0.001, "),  # the start (1, or t*) itself
    ({"times": [0.05, 0.0005]}, r"times: must be in \[0.001, "),  # below 1/T
    ({"times": [0.5, float("nan")]}, "times: must be finite"),
    ({"times": [float("inf")]}, "times: must be finite"),
    (
        {"times": [0.05, 0.02], "steps": 2},
        "steps: 2 does not match the 3 network evaluations that times gives",
    ),
    ({"times": [], "steps": 10}, "steps: 10 does not match the 1 network evaluations"),
    ({"sampler": "ddpm", "eta": 0.5}, "eta: only the ddim sampler uses eta; ddpm would ignore it"),
    ({"sampler": "dpm-solver++", "eta": 1.0}, "eta: only the ddim sampler uses eta"),
    ({"sampler": "ddim", "eta": -1.0}, "eta: must be a finite number >= 0"),
    ({"sampler": "ddim", "eta": float("nan")}, "eta: must be a finite number >= 0"),
    ({"steps": 0}, "steps: must be >= 1"),
]


@pytest.mark.parametrize(("kwargs", "message"), REFUSED)
def test_bad_grids_are_refused_by_sample_and_purify(
    pipe: Pipeline, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        pipe.sample([1], **kwargs)
    with pytest.raises(ValueError, match=f"^{message}"):
        pipe.purify(torch.zeros(1, 1, 16, 16), [1], t_star=0.1, **kwargs)
    with pytest.raises(ValueError, match=f"^{message}"):
        pipe.grid(kwargs.get("sampler", "ddim"), **{k: v for k, v in kwargs.items() if k != "sampler"})


def test_purify_times_must_lie_below_t_star(pipe: Pipeline) -> None:
    x = torch.zeros(1, 1, 16, 16)
    for times in ([0.1], [0.2, 0.05]):
        with pytest.raises(ValueError, match=r"^times: must be in \[0.001, 0.1\)"):
            pipe.purify(x, [1], t_star=0.1, times=times)
    assert pipe.purify(x, [1], t_star=0.1, times=[0.099, 0.001]).shape == (1, 1, 16, 16)
    assert len(pipe.grid("ddim", times=[0.05], t_star=0.1)) == 3
    with pytest.raises(ValueError, match=r"^t_star: must be in"):
        pipe.purify(x, [1], t_star=float("nan"), times=[])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_unet_images_do_not_depend_on_the_batch(pipe: Pipeline, sampler: str) -> None:
    batch = pipe.sample([1, 2, 3, 4, 5, 6, 7, 8], sampler=sampler, steps=3)
    alone = pipe.sample([4], sampler=sampler, steps=3)
    assert batch.shape == (8, 1, 16, 16) and torch.equal(batch[3], alone[0])
    assert float(batch.abs().max()) <= 1.0


def test_purify_is_seeded_and_validated(pipe: Pipeline) -> None:
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    a = pipe.purify(x, [5, 6], t_star=0.1, steps=2)
    b = pipe.purify(x[1:], [6], t_star=0.1, steps=2)
    assert torch.equal(a[1], b[0])
    with pytest.raises(ValueError, match="t_star"):
        pipe.purify(x, [5, 6], t_star=0.0)
    with pytest.raises(ValueError, match="steps"):
        pipe.purify(x, [5, 6], t_star=0.01, steps=50)
    with pytest.raises(ValueError, match="shape"):
        pipe.purify(torch.zeros(1, 3, 16, 16), [1])
    with pytest.raises(ValueError, match="NaN"):
        pipe.purify(torch.full((1, 1, 16, 16), float("nan")), [1])


def test_sampler_must_fit_the_model_kind(pipe: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sampler"):
        pipe.sample([1], sampler="consistency", steps=1)
    cm = Pipeline.from_checkpoint(tiny_checkpoint(tmp_path / "cm.safetensors", kind="consistency"))
    assert cm.info.samplers == ["consistency"]
    assert cm.sample([1, 2], sampler="consistency", steps=1).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="sampler"):
        cm.sample([1], sampler="ddim", steps=1)


def test_gpu_dtype_is_validated_and_ignored_on_the_cpu(tmp_path: Path) -> None:
    path = tiny_checkpoint(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="gpu_dtype"):
        Pipeline.from_checkpoint(path, gpu_dtype="float8")
    assert Pipeline.from_checkpoint(path, gpu_dtype="bfloat16").dtype == torch.float32


def test_labels_and_seeds_are_checked(pipe: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unconditional"):
        pipe.sample([1], labels=[0])
    with pytest.raises(ValueError, match="seeds"):
        pipe.sample([-1])
    cond = Pipeline.from_checkpoint(tiny_checkpoint(tmp_path / "c.safetensors", num_classes=3))
    assert cond.sample([1, 2], labels=[0, 2], steps=2).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="labels"):
        cond.sample([1], labels=[5], steps=2)


def test_warmup_on_cpu_runs_one_small_batch(pipe: Pipeline) -> None:
    assert pipe.warmup(64) == [1]


def test_cancel(pipe: Pipeline) -> None:
    with pytest.raises(Cancelled):
        pipe.sample([1], steps=5, cancel=lambda: True)


def test_readme_example_writes_a_png_grid(tmp_path: Path) -> None:
    """The README's Python example, verbatim in spirit: a fresh tiny model, a grid, a PNG."""
    pipe = Pipeline.from_checkpoint(tiny_checkpoint(tmp_path / "tiny.safetensors"))
    images = pipe.sample(list(range(16)), sampler="ddim", steps=5)
    path = save_grid(images, tmp_path / "grid.png")
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 64 and im.mode == "L"
