"""Fine-tuning an imported diffusers checkpoint with adversarial training, on RGB data.

``robustdiff import-diffusers`` writes the file, ``robustdiff train CONFIG --init FILE`` starts from
it (seed B's regime: DRO adversarial fine-tuning of a pre-trained DDPM) on CIFAR-10's binary batches
and on an image folder, each written by the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, read_header
from models.testing import DDPM_CIFAR10_32, DDPM_SCHEDULER, diffusers_unet, write_diffusers_folder
from service.cli import main

pytest.importorskip("diffusers", reason="diffusers is a test-only dependency (pip install -e '.[test]')")

SMALL_CIFAR_LAYOUT = {  # ddpm-cifar10-32's blocks and padding at 32x32, narrow
    **DDPM_CIFAR10_32,
    "block_out_channels": [16, 32, 32],
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def _toml_value(v: object) -> str:
    return json.dumps(list(v) if isinstance(v, tuple) else v)


def _config(path: Path, imported: Path, data: str, data_path: Path, run: Path) -> Path:
    """A train config whose network and schedule are the imported file's (what --init requires)."""
    header = read_header(imported)
    model = {k: v for k, v in header.model.model_dump().items() if v is not None}
    schedule = header.schedule.model_dump()
    lines = [
        'name = "cifar-at"', 'preset = "ddpm-cifar10"', 'method = "dro-at"', "batch_size = 4",
        "updates = 2", 'device = "cpu"', f'out_dir = "{run}"', "sample_count = 0", "progress = false",
        "[model]", *(f"{k} = {_toml_value(v)}" for k, v in model.items()),
        "[schedule]", *(f"{k} = {_toml_value(v)}" for k, v in schedule.items()),
        "[data]", f'name = "{data}"', f'path = "{data_path}"',
        "[optim]", "warmup_updates = 0",
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("data", ["cifar10", "folder"])
def test_adversarial_finetune_of_an_imported_ddpm(tmp_path: Path, data: str) -> None:
    torch.set_num_threads(1)
    folder = write_diffusers_folder(tmp_path / "ddpm", diffusers_unet(SMALL_CIFAR_LAYOUT), DDPM_SCHEDULER)
    imported = tmp_path / "imported.safetensors"
    assert main(["import-diffusers", str(folder), "--out", str(imported), "--name", "cifar"]) == 0
    rng = np.random.default_rng(0)
    data_path = tmp_path / "data"
    data_path.mkdir()
    if data == "cifar10":
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            records = rng.integers(0, 256, (2, 3073), dtype=np.uint8)
            records[:, 0] %= 10
            (data_path / name).write_bytes(records.tobytes())
    else:
        for i in range(6):
            (data_path / f"c{i % 2}").mkdir(exist_ok=True)
            rgb = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(data_path / f"c{i % 2}" / f"{i}.png")
    run = tmp_path / "run"
    config = _config(tmp_path / "c.toml", imported, data, data_path, run)
    out = tmp_path / "tuned.safetensors"
    argv = ["train", str(config), "--init", str(imported), "--export", str(out), "--threads", "1"]
    assert main(argv) == 0
    before, _ = load_checkpoint(imported)
    after, header = load_checkpoint(out)
    assert header.training.method == "dro-at" and header.training.updates == 2
    assert header.model == read_header(imported).model  # still the imported network, now fine-tuned
    moved = [
        k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k].half().float())
    ]
    assert moved  # the updates changed the weights
