"""Config files, overrides and validation: mistakes fail before training, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.errors import UserError
from models.train.config import load_config
from models.train.trainer import load_data


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["method=nope"], "method"),
        (["method=dro-at", "options.eta=-1"], "options.eta"),
        (["method=equivariant-at", "options.r_floor=-0.1"], "options.r_floor"),
        (["method=equivariant-at", "options.variant=sideways"], "options.variant"),
        (["method=standard", "options.alpha=0.1"], "options.alpha"),
        (["data.name=mnist"], "data.path"),
        (["data.name=idx", "data.path=/nonexistent/folder"], "data.path"),
        (["data.name=digits", "batch_size=0"], "batch_size"),
        (["data.name=digits", "preset=huge"], "preset"),
        (["data.name=digits", "learning_rate=1"], "learning_rate"),
        (
            ["data.name=digits", "data.corruption.kind=gaussian", "data.corruption.fraction=2"],
            "data.corruption.fraction",
        ),
    ],
)
def test_bad_configs_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert err.value.field == field


def test_toml_yaml_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('method = "dro-at"\nbatch_size = 4\n[options]\nm = 2\n[data]\nname = "digits"\n')
    yml = tmp_path / "a.yaml"
    yml.write_text("method: dro-at\nbatch_size: 4\noptions: {m: 2}\ndata: {name: digits}\n")
    a, b = load_config(toml), load_config(yml)
    assert a == b
    assert a.options["m"] == 2 and a.options["eta"] == 0.1
    c = load_config(
        toml,
        [
            "options.m=5",
            "optim.grad_clip=null",
            "data.corruption.kind=outliers",
            "data.corruption.fraction=0.1",
        ],
    )
    assert c.options["m"] == 5 and c.optim.grad_clip is None
    assert c.data.corruption is not None and c.data.corruption.fraction == 0.1


def test_equivariant_lambda_alias() -> None:
    cfg = load_config(None, ["method=equivariant-at", "options.lambda=0.5", "data.name=digits"])
    assert cfg.options["lambda"] == 0.5


def test_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "b.toml"
    bad.write_text("method = \n")
    with pytest.raises(UserError) as err:
        load_config(bad)
    assert err.value.field == "config"
    with pytest.raises(UserError):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "salt-and-pepper"])
def test_corruption_is_applied_once_and_reproducibly(kind: str) -> None:
    clean = load_data(load_config(None, ["data.name=digits", "preset=tiny"]))
    sets = ["data.name=digits", "preset=tiny", f"data.corruption.kind={kind}", "data.corruption.fraction=0.5"]
    a, b = load_data(load_config(None, sets)), load_data(load_config(None, sets))
    assert torch.equal(a.images, b.images)
    changed = (a.images != clean.images).flatten(1).any(dim=1).float().mean().item()
    assert 0.4 < changed < 0.6
    assert float(a.images.min()) >= -1.0 and float(a.images.max()) <= 1.0


def test_the_readme_tiny_config_trains_on_fashion_mnist(tmp_path: Path) -> None:
    """models/train/configs/fmnist-tiny.toml (README: "train your own model") runs on the 28x28 data
    and exports a servable 32x32 model; a preset too small for the data says how to fix it."""
    from service.cli import main

    config = Path(__file__).resolve().parents[3] / "models/train/configs/fmnist-tiny.toml"
    out = tmp_path / "tiny.safetensors"
    args = ["train", str(config), "--updates", "2", "--out-dir", str(tmp_path / "run"), "--export", str(out)]
    assert main([*args, "--set", "progress=false", "--set", "sample_count=0", "--device", "cpu"]) == 0
    from models.pipeline import Pipeline

    assert Pipeline.from_checkpoint(out).info.image_shape == (1, 32, 32)
    with pytest.raises(
        UserError, match=r"28x28, larger than the model's 16x16; train at --set model.image_size=32"
    ):
        load_data(load_config(config, ["model.image_size=16"]))
