"""``robustdiff train --init``: start from a served model's weights, bitwise; refuse what does not fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointHeader, read_tensors, save_checkpoint
from models.train.config import TrainConfig
from models.train.trainer import Trainer, train
from models.unet import UNet, preset
from service.cli import main


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_init_starts_bitwise_from_the_served_weights(
    make_config: Callable[..., TrainConfig], tmp_path: Path, dtype: str
) -> None:
    served = tmp_path / "served.safetensors"
    train(make_config(updates=3, export_path=str(served), export_dtype=dtype, out_dir=str(tmp_path / "a")))
    saved = read_tensors(served, "file")
    cfg = make_config(method="dro-at", seed=5, out_dir=str(tmp_path / "b"))
    trainer = Trainer(cfg, init=served)
    for name, module in (("net", trainer.net), ("ema", trainer.ema)):
        state = module.state_dict()
        assert state.keys() == saved.keys()
        for k, v in saved.items():  # float16 widens to float32 exactly
            assert torch.equal(state[k], v.to(torch.float32)), f"{name}.{k}"
    assert not trainer.opt.state  # a fresh optimizer: no moments yet
    fresh = Trainer(cfg).net.state_dict()  # without --init the same seed gives the random init
    assert not all(torch.equal(fresh[k], saved[k].float()) for k in saved)
    result = trainer.run()
    assert result.updates == 4 and result.final_loss is not None


def _write(path: Path, preset_name: str, kind: str = "diffusion") -> Path:
    """A served file with a random network of ``preset_name`` and the header ``kind``."""
    header = CheckpointHeader(name="x", model=preset(preset_name), kind=kind)  # type: ignore[arg-type]
    if kind == "consistency":
        from models.checkpoint import ConsistencyConfig

        header = header.model_copy(update={"consistency": ConsistencyConfig()})
    save_checkpoint(path, UNet(preset(preset_name)), header)
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "missing.safetensors", "no checkpoint file"),
        (lambda d: _write(d / "big.safetensors", "fmnist-cpu"), "does not match the config's"),
        (lambda d: _write(d / "cm.safetensors", "tiny", "consistency"), "is a consistency checkpoint"),
        (
            lambda d: (d / "junk.safetensors").write_bytes(b"not a file") and d / "junk.safetensors",
            "safetensors",
        ),
    ],
)
def test_init_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], Path], words: str
) -> None:
    source = make(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text('name = "tiny"\npreset = "tiny"\nprogress = false\n[data]\nname = "digits"\n')
    run = tmp_path / "run"
    argv = ["train", str(config), "--init", str(source), "--out-dir", str(run), "--updates", "1"]
    assert main([*argv, "--batch-size", "8", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--init:" in err and words in err, err
    assert not (run / "checkpoints").exists()
