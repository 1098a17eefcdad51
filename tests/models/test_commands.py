"""`robustdiff sample` / `purify` / `bench` from the shell: outputs written, bad input one line + exit 2."""

from pathlib import Path

import numpy as np
import pytest

from models.testing import tiny_checkpoint
from service.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny.safetensors")


def test_sample_writes_grid_and_npy(ckpt: Path, tmp_path: Path) -> None:
    code = main(
        [
            "sample",
            "--model",
            str(ckpt),
            "-n",
            "4",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "g.png"),
            "--npy",
            str(tmp_path / "x.npy"),
        ]
    )
    assert code == 0 and (tmp_path / "g.png").stat().st_size > 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (4, 1, 16, 16) and np.abs(x).max() <= 1


def test_purify_reads_png_and_npy(ckpt: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", np.zeros((2, 1, 16, 16), np.float32))
    out = tmp_path / "p.png"
    code = main(
        [
            "purify",
            "--model",
            str(ckpt),
            "--steps",
            "2",
            "--out",
            str(out),
            "--npy",
            str(tmp_path / "p.npy"),
            str(tmp_path / "a.png"),
            str(tmp_path / "b.npy"),
        ]
    )
    assert code == 0 and np.load(tmp_path / "p.npy").shape == (3, 1, 16, 16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--sampler", "euler"], "--sampler"),
        (["--t-star", "0"], "--t-star"),
        (["--seed", "-3"], "--seed"),
    ],
)
def test_bad_purify_arguments(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    np.save(tmp_path / "b.npy", np.zeros((1, 1, 16, 16), np.float32))
    code = main(
        ["purify", "--model", str(ckpt), "--out", str(tmp_path / "o.png"), *argv, str(tmp_path / "b.npy")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_bad_inputs_and_models(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 16, 16), np.float32))
    assert (
        main(["purify", "--model", str(ckpt), "--out", str(tmp_path / "o.png"), str(tmp_path / "wrong.npy")])
        == 2
    )
    assert "the model takes (1, 16, 16)" in capsys.readouterr().err
    assert (
        main(["sample", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o.png")]) == 2
    )
    assert "no checkpoint file" in capsys.readouterr().err


def test_unknown_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "no benchmark" in capsys.readouterr().err
