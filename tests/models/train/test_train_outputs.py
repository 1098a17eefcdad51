"""Where `robustdiff train` and `export` write: the run folder, and a served file only when named.

`robustdiff train models/train/configs/fmnist-dro-at.toml --out-dir /tmp/x` once replaced the
committed models/weights/fmnist-dro-at.safetensors (mode 0600) because the config named it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from models.train.config import load_config
from service.cli import main

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "models" / "train" / "configs").glob("*.toml"))
TINY_TOML = """name = "tiny"
preset = "tiny"
batch_size = 8
updates = 2
device = "cpu"
checkpoint_every = 1000
sample_count = 0
progress = false
[data]
name = "digits"
[optim]
lr = 1e-3
warmup_updates = 1
"""


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_committed_configs_never_write_the_served_weights(config: Path) -> None:
    export = load_config(config, []).export_path
    assert export is None or (ROOT / "models" / "weights") not in (ROOT / export).resolve().parents


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_over_an_existing_file_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    served = tmp_path / "served.safetensors"
    served.write_bytes(b"the committed weights")
    before = digest(served)
    argv = ["train", str(config), "--out-dir", str(tmp_path / "run"), "--export", str(served)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--export" in err and "--force" in err
    assert digest(served) == before and not (tmp_path / "run").exists()  # refused before any work
    old = os.umask(0o077)  # the umask that once left a served file unreadable by the container's user
    try:
        assert main([*argv, "--force"]) == 0
    finally:
        os.umask(old)
    assert digest(served) != before and stat.S_IMODE(served.stat().st_mode) == 0o644
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.toml", "served.safetensors", "run"}
    again = tmp_path / "again.safetensors"
    assert main(["export", str(tmp_path / "run"), "--out", str(served)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--out", str(again)]) == 0
    assert stat.S_IMODE(again.stat().st_mode) == 0o644


def test_a_run_without_export_writes_only_its_folder(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    assert main(["train", str(config), "--out-dir", str(tmp_path / "run")]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.toml", "run"}
    assert (tmp_path / "run" / "tiny.safetensors").is_file()


def test_the_training_seed_reaches_the_served_header_and_the_models_listing(tmp_path: Path) -> None:
    """The trainer's end and `robustdiff export` both write the header with served_header."""
    from models.checkpoint import read_header
    from models.pipeline import Pipeline
    from models.train.config import build
    from models.train.export import served_header, write_served
    from models.unet import UNet
    from service.worker import model_entry

    cfg = build({"name": "tiny", "preset": "tiny", "seed": 17, "data": {"name": "digits"}})
    header = served_header(cfg, updates=2, command=None, hardware=None, wall_s=None, final_loss=None)
    served = write_served(tmp_path / "served.safetensors", UNet(cfg.model_config_()), header)
    assert read_header(served).training.seed == 17
    entry = model_entry(Pipeline.from_checkpoint(served))
    assert entry.seed == 17 and '"seed":17' in entry.model_dump_json()  # what GET /models lists
