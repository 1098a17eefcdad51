"""Rows per CPU network call scale down with the image size (ROBUSTDIFF_CPU_MICRO_BATCH_PIXELS), which
bounds a worker's memory at 256x256; an image's bytes do not depend on it."""

from pathlib import Path

import pytest
import torch

from models.errors import UserError
from models.pipeline import DEFAULT_MICRO_BATCH_PIXELS, CpuOptions, Pipeline, rows_per_call
from models.testing import tiny_checkpoint
from service.settings import Settings, load_settings


@pytest.mark.parametrize(
    ("size", "rows"), [(28, 16), (32, 16), (64, 16), (96, 7), (128, 4), (256, 1), (512, 1)]
)
def test_rows_per_call_by_image_size(size: int, rows: int) -> None:
    assert rows_per_call(16, DEFAULT_MICRO_BATCH_PIXELS, size, size) == rows


def test_rows_per_call_edges() -> None:
    assert rows_per_call(4, 10**12, 256, 256) == 4  # the row cap still applies
    assert rows_per_call(16, 1, 32, 32) == 1  # never fewer than one row
    assert rows_per_call(16, 3 * 32 * 32, 32, 32) == 3
    assert Settings().cpu_micro_batch_pixels == DEFAULT_MICRO_BATCH_PIXELS == CpuOptions().micro_batch_pixels
    with pytest.raises(ValueError, match="micro_batch_pixels"):
        CpuOptions(micro_batch_pixels=0).check()
    with pytest.raises(UserError) as err:
        load_settings(cpu_micro_batch_pixels=0)
    assert err.value.field == "ROBUSTDIFF_CPU_MICRO_BATCH_PIXELS"


def test_the_pipeline_calls_the_network_with_that_many_rows(tmp_path: Path) -> None:
    path = tiny_checkpoint(tmp_path / "t.safetensors")
    default = Pipeline.from_checkpoint(path)
    _, h, w = default.info.image_shape
    narrow = Pipeline.from_checkpoint(path, cpu=CpuOptions(micro_batch_pixels=3 * h * w))
    calls: list[int] = []
    real = narrow.net.forward

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args)

    narrow.net.forward = spy  # type: ignore[method-assign]
    seeds = [4, 8, 15, 16, 23, 42, 7]
    out = narrow.sample(seeds, steps=2)
    assert calls == [3, 3, 1] * 2
    assert torch.equal(out, default.sample(seeds, steps=2))  # bitwise: rows per call change no image
