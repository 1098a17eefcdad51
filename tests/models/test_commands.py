"""`robustdiff sample` / `purify` / `bench` from the shell: outputs written, bad input one line + exit 2."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.pipeline import Pipeline
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


def test_purify_takes_ddim_eps(ckpt: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = [
        "purify",
        "--model",
        str(ckpt),
        "--t-star",
        "0.6",
        "--steps",
        "4",
        "--seed",
        "5",
        "--ddim-eps",
        "model",
    ]
    code = main(
        [*argv, "--out", str(tmp_path / "p.png"), "--npy", str(tmp_path / "p.npy"), str(tmp_path / "x.npy")]
    )
    ref = Pipeline.from_checkpoint(ckpt).purify(
        torch.from_numpy(x), [5, 6], t_star=0.6, steps=4, ddim_eps="model"
    )
    assert code == 0 and torch.equal(torch.from_numpy(np.load(tmp_path / "p.npy")), ref)


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
    assert code == 2 and len(err) == 1 and message in err[0]  # no progress bar, no traceback


@pytest.fixture(scope="module")
def cm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cm") / "cm.safetensors", kind="consistency")


def test_times_choose_the_consistency_grid(
    cm_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--times 0.6,0.3 is three evaluations, the library's images; purify's --times lie below t*."""
    out, npy = str(tmp_path / "g.png"), tmp_path / "x.npy"
    code = main(
        ["sample", "--model", str(cm_ckpt), "-n", "3", "--times", "0.6,0.3", "--out", out, "--npy", str(npy)]
    )
    assert code == 0 and "sample (consistency, 3 steps)" in capsys.readouterr().err
    pipe = Pipeline.from_checkpoint(cm_ckpt)
    expected = pipe.sample([0, 1, 2], sampler="consistency", times=[0.6, 0.3])
    assert torch.equal(torch.from_numpy(np.load(npy)), expected)
    np.save(tmp_path / "b.npy", expected.numpy())
    for times, nfe in (("0.05", 2), ("", 1)):
        argv = ["purify", "--model", str(cm_ckpt), "--t-star", "0.1", "--times", times, "--seed", "7"]
        code = main([*argv, "--out", out, "--npy", str(npy), str(tmp_path / "b.npy")])
        assert code == 0 and f"purify (consistency, {nfe} steps)" in capsys.readouterr().err
        purified = pipe.purify(
            expected, [7, 8, 9], t_star=0.1, sampler="consistency", times=[float(times)] if times else []
        )
        assert torch.equal(torch.from_numpy(np.load(npy)), purified)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--times", "0.3,0.6"], "--times: must be strictly decreasing"),
        (["--times", "1.5"], "--times: must be in [0.001, 1.0)"),
        (["--times", "0.5,0"], "--times: must be in [0.001, 1.0)"),
        (["--times", "0.5,nan"], "--times: must be finite"),
        (["--steps", "2", "--times", "0.5,0.2"], "--steps: 2 does not match the 3 network evaluations"),
        (
            ["--sampler", "ddpm", "--eta", "0.5"],
            "--eta: only the ddim sampler uses eta; ddpm would ignore it",
        ),
        (["--sampler", "consistency"], "--sampler: 'consistency' needs a consistency model"),
        (
            ["--sampler", "ddpm", "--ddim-eps", "model"],
            "--ddim-eps: 'from-x0', or 'model' with the ddim sampler",
        ),
        (["--spacing", "trailing", "--times", "0.5"], "--spacing: give either times or a spacing, not both"),
    ],
)
def test_bad_grids_are_one_line_before_any_progress_bar(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["sample", "--model", str(ckpt), "-n", "2", "--out", str(tmp_path / "o.png"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"robustdiff sample: error: {message}")
    assert not (tmp_path / "o.png").exists()


def test_purify_times_at_or_above_t_star_are_refused(
    cm_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "b.npy", np.zeros((1, 1, 16, 16), np.float32))
    argv = [
        "purify",
        "--model",
        str(cm_ckpt),
        "--t-star",
        "0.2",
        "--times",
        "0.2",
        "--out",
        str(tmp_path / "o.png"),
    ]
    assert main([*argv, str(tmp_path / "b.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--times: must be in [0.001, 0.2)" in err[0]


def test_times_that_are_not_numbers_are_a_usage_error(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(ckpt), "--out", "o.png", "--times", "0.5,half"])
    assert exit_info.value.code == 2
    assert "argument --times: '0.5,half' is not comma-separated numbers" in capsys.readouterr().err


def test_bad_inputs_and_models(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 16, 16), np.float32))
    assert (
        main(["purify", "--model", str(ckpt), "--out", str(tmp_path / "o.png"), str(tmp_path / "wrong.npy")])
        == 2
    )
    assert (
        "a .npy image [3, 16, 16], but the model takes grey (1 channel) 16x16 images"
        in capsys.readouterr().err
    )
    assert (
        main(["sample", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o.png")]) == 2
    )
    assert "no checkpoint file" in capsys.readouterr().err


def test_unknown_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "no benchmark" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "out", "npy", "message"),
    [
        ("sample", "x.txt", None, "--out: "),
        ("sample", "folder/", None, "--out: "),
        ("purify", "p.jpg2", None, "--out: "),
        ("sample", "g.png", "x.txt", "--npy: "),
        ("purify", "g.png", "/proc/x.npy", "--npy: /proc"),
        ("sample", "g.png", "g.png", "--npy: "),
    ],
)
def test_bad_output_paths_are_refused_before_any_work(
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    out: str,
    npy: str | None,
    message: str,
) -> None:
    """A sweep found these failing only after sampling (a traceback, or the grid left without its .npy)."""
    scratch = tmp_path / "scratch"
    (scratch / "folder").mkdir(parents=True)
    np.save(tmp_path / "b.npy", np.zeros((1, 1, 16, 16), np.float32))
    argv = [command, "--model", str(ckpt), "--steps", "2", "--out", str(scratch / out)]
    if out.endswith("/"):
        argv[-1] += "/"
    if npy is not None:
        argv += ["--npy", npy if npy.startswith("/") else str(scratch / npy)]
    argv += ["-n", "1"] if command == "sample" else [str(tmp_path / "b.npy")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"robustdiff {command}: error: {message}"), err
    assert sorted(p.name for p in scratch.iterdir()) == ["folder"] and not any((scratch / "folder").iterdir())


def test_every_grid_suffix_is_written(ckpt: Path, tmp_path: Path) -> None:
    """The suffixes --out accepts are the ones save_grid really writes (grayscale through Pillow)."""
    from PIL import Image

    from models.grid import GRID_SUFFIXES, save_grid

    for suffix in GRID_SUFFIXES:
        path = save_grid(torch.zeros(2, 1, 4, 4), tmp_path / f"g{suffix}")
        with Image.open(path) as im:
            assert im.size[0] > 0
    assert (
        main(["sample", "--model", str(ckpt), "-n", "1", "--steps", "2", "--out", str(tmp_path / "g.JPG")])
        == 0
    )


def test_a_classifier_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.evaluation.classifier import (
        ClassifierConfig,
        ClassifierHeader,
        ResNetClassifier,
        save_classifier,
    )

    path = tmp_path / "cls.safetensors"
    net = ResNetClassifier(ClassifierConfig(image_size=16, widths=(4, 8)))
    save_classifier(path, net.eval(), ClassifierHeader(name="c", model=net.config, test_accuracy=None))
    assert main(["sample", "--model", str(path), "-n", "1", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"robustdiff sample: error: --model: {path} is a classifier checkpoint, not a diffusion or consistency model"
    ]
    assert not (tmp_path / "o.png").exists()


def _purify(ckpt: Path | str, tmp_path: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> int:
    out = tmp_path / "p.png"
    return main(
        ["purify", "--model", str(ckpt), "--steps", "1", "--out", str(out), *extra, *map(str, inputs)]
    )


@pytest.mark.parametrize(
    ("mode", "fmt", "size", "said"),
    [
        ("RGB", "PNG", 16, "a PNG of mode RGB (3 channels), 16x16"),
        ("RGBA", "PNG", 16, "a PNG of mode RGBA (4 channels, read as RGB), 16x16"),
        ("CMYK", "JPEG", 16, "a JPEG of mode CMYK (4 channels, read as RGB), 16x16"),
        ("L", "PNG", 14, "a PNG of mode L (1 channel), 14x14"),
    ],
)
def test_purify_converts_only_with_resize(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, fmt: str, size: int, said: str
) -> None:
    """The HTTP API's rule and words: an image of other channels or size is refused, naming what it
    is, unless --resize (resize: true over HTTP) asks for the conversion."""
    from PIL import Image

    path = tmp_path / f"x.{fmt.lower()}"
    Image.new(mode, (size, size), 0).save(path, format=fmt)
    assert _purify(ckpt, tmp_path, path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and "(use --resize to convert it)" in err, err
    assert _purify(ckpt, tmp_path, path, extra=("--resize", "--npy", str(tmp_path / "p.npy"))) == 0
    assert np.load(tmp_path / "p.npy").shape == (1, 1, 16, 16)


def test_model_names_resolve_like_the_server(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--model takes a served model's name (ROBUSTDIFF_MODELS, as GET /models lists them) as well as a path."""
    from PIL import Image

    Image.new("L", (16, 16), 0).save(tmp_path / "a.png")
    monkeypatch.setenv("ROBUSTDIFF_MODELS", f"mine={ckpt},{ckpt}")
    assert _purify("mine", tmp_path, tmp_path / "a.png") == 0
    assert _purify("tiny-diffusion", tmp_path, tmp_path / "a.png") == 0  # the name in its header
    assert _purify("theirs", tmp_path, tmp_path / "a.png") == 2
    err = capsys.readouterr().err
    assert (
        "--model: 'theirs' is neither a checkpoint file nor a served model (mine, tiny-diffusion)" in err
    ), err
