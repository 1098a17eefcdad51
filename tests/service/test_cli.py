"""The `robustdiff` entry point: one line per error, exit code 2, for every subcommand's parser."""

from __future__ import annotations

import pytest

from service.cli import main


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["sample", "--steps", "many"], "--steps"),
        (["eval", "robust", "--model", "m.safetensors", "--threat", "l3"], "threat"),
        (["eval", "nosuch"], "invalid choice"),
        (["nosuch"], "invalid choice"),
        (["sample", "--device", "gpu"], "--device"),
    ],
)
def test_argument_errors_are_one_line(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:  # argparse's own checks exit; the commands' checks return
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err and "usage:" not in err, err


def test_an_unwritable_output_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from models.testing import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    (tmp_path / "afile").write_text("x")
    code = main(
        [
            "sample",
            "--model",
            str(ckpt),
            "-n",
            "1",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "afile" / "g.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("robustdiff sample: error:"), err
