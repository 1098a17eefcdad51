"""Exact resume (bitwise on CPU) and the ``robustdiff train`` / ``export`` commands end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from models.checkpoint import read_header
from models.errors import UserError
from models.pipeline import Pipeline
from models.train import state as ckpt
from models.train.cli import resume_config
from models.train.config import TrainConfig
from models.train.trainer import train
from service.cli import main


def losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["update"], r["loss"]) for r in lines if "loss" in r]


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run)[1]


@pytest.mark.parametrize(
    ("method", "options", "model"),
    [
        ("standard", {}, {"dropout": 0.1}),
        ("equivariant-at", {"variant": "adversarial"}, {}),
    ],
)
def test_resume_is_bitwise(
    make_config: Callable[..., TrainConfig],
    tmp_path: Path,
    method: str,
    options: dict[str, Any],
    model: dict[str, Any],
) -> None:
    common = {"method": method, "options": options, "model": model, "checkpoint_every": 10, "log_every": 1}
    common |= {"sample_count": 2, "sample_steps": 2}
    whole = make_config(updates=20, out_dir=str(tmp_path / "whole"), **common)
    train(whole)
    first = make_config(updates=10, out_dir=str(tmp_path / "split"), **common)
    train(first)
    second = resume_config(str(tmp_path / "split"), ["updates=20"])
    train(second, resume=tmp_path / "split")
    a, b = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    assert len(losses(tmp_path / "whole")) == 20


def test_resume_refuses_changing_the_method(make_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    train(make_config(updates=2, out_dir=str(tmp_path / "r")))
    with pytest.raises(UserError) as err:
        resume_config(str(tmp_path / "r"), ["method=dro-at"])
    assert err.value.field == "method"


def test_cli_train_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "served.safetensors"
    run = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text('name = "tiny"\n')
    argv = [
        "train",
        str(config),
        "--preset",
        "tiny",
        "--dataset",
        "digits",
        "--method",
        "dro-at",
        "--updates",
        "4",
        "--batch-size",
        "8",
    ]
    argv += ["--out-dir", str(run), "--export", str(out), "--name", "tiny-dro", "--threads", "1"]
    argv += [
        "--set",
        "checkpoint_every=2",
        "--set",
        "sample_count=4",
        "--set",
        "sample_steps=2",
        "--set",
        "progress=false",
    ]
    assert main(argv) == 0
    pipe = Pipeline.from_checkpoint(out)
    assert pipe.info.name == "tiny-dro" and pipe.info.method == "dro-at"
    header = pipe.header.training
    assert header.updates == 4 and header.options["m"] == 3 and header.dataset == "digits"
    assert header.command is not None and "--set method=dro-at" in header.command
    assert header.final_loss is not None and header.wall_time_s is not None and header.hardware
    assert pipe.sample([0, 1], steps=2).shape == (2, 1, 16, 16)
    # dro-at spends m = 3 updates per minibatch: checkpoints land after updates 3 and 4 (the budget's end).
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000003.png", "step-00000004.png"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "updates_per_s", "images_per_s"} <= records[0].keys()
    again = tmp_path / "again.safetensors"
    assert main(["export", str(run), "--out", str(again), "--dtype", "float32"]) == 0
    assert read_header(again).training.updates == 4


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--method", "nope"], "method"),
        (["--method", "dro-at", "--set", "options.eta=-1"], "options.eta"),
        (["--dataset", "mnist"], "data.path"),
        (["--set", "batch_size"], "--set"),
    ],
)
def test_cli_bad_config_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], field: str
) -> None:
    run = tmp_path / "never"
    config = tmp_path / "c.toml"
    config.write_text('name = "tiny"\n')
    assert main(["train", str(config), "--out-dir", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f": {field}:" in err
    assert not run.exists()


def test_torchrun_two_cpu_ranks(tmp_path: Path) -> None:
    """DDP over gloo: both ranks finish (no collective left waiting), one checkpoint holds both RNG states."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    config = tmp_path / "c.toml"
    config.write_text('name = "model"\n')
    cmd += [
        "-m",
        "service.cli",
        "train",
        str(config),
        "--preset",
        "tiny",
        "--dataset",
        "digits",
        "--method",
        "dro-at",
    ]
    cmd += ["--updates", "4", "--batch-size", "8", "--out-dir", str(run), "--threads", "1", "--device", "cpu"]
    cmd += ["--set", "checkpoint_every=3", "--set", "sample_count=0", "--set", "progress=false"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    meta, _ = ckpt.load(run)
    assert meta["state"]["updates"] == 4 and len(meta["state"]["rng"]) == 2
    assert meta["state"]["rng"][0]["generator"] != meta["state"]["rng"][1]["generator"]
    assert Pipeline.from_checkpoint(run / "model.safetensors").header.training.updates == 4


def test_options_lists_every_field_and_the_doc_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    from models.train.methods import METHODS

    assert main(["train", "--options", "cd-at"]) == 0
    table = capsys.readouterr().out
    for key in ("ball_scale", "perturb_teacher", "teacher", "sigma_data", "alpha", "eta"):
        assert f"| `{key}` |" in table
    assert "absolute \\| noise" in table and "| `teacher` | str | required |" in table
    assert main(["train", "--options", "no-such-method"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["train", "--options", "all"]) == 0
    everything = capsys.readouterr().out
    assert all(f"## `{name}`" in everything for name in METHODS)
    doc = (Path(__file__).resolve().parents[3] / "docs" / "TRAINING_OPTIONS.md").read_text()
    assert doc.endswith(everything), "docs/TRAINING_OPTIONS.md is stale: regenerate it with --options all"
