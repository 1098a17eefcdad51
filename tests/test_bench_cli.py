"""`robustdiff bench`: a script's refusal is one line with exit code 2, before any work, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.bench_cli import benchmarks
from models.testing import tiny_checkpoint
from service.cli import main


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err + captured.out
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench_host", "--repeats", "0"], "bench bench_host: error: --repeats and --threads must be >= 1"),
        (["fd_vs_updates", "--out", "{tmp}/O", "nolabel"], "error: run 'nolabel': expected LABEL=RUN_FOLDER"),
        (["fd_vs_updates", "--n", "-1", "--out", "{tmp}/O", "a=b"], "argument --n: must be >= 1, got -1"),
        (
            ["fd_vs_updates", "--n", "3", "--out", "{tmp}/O", "a=b"],
            "--n: eval quality's k-NN metrics need more",
        ),
        (["fd_vs_updates", "--steps", "1,,2", "--out", "{tmp}/O", "a=b"], "steps: an empty item in '1,,2'"),
        (["robust_vs_purifier", "--out", "{tmp}/O", "{tmp}/none"], "none: no robust.json"),
        (["eval_report", "{tmp}/none"], "eval_report.py: error: root: "),
        (["bench_consistency", "--batch", "-1"], "argument --batch: must be >= 1, got -1"),
        (["seed_a_plane", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
        (["bench_service", "--concurrency", "0"], "argument --concurrency: must be >= 1, got 0"),
        (["_toy"], "name: no benchmark '_toy'"),
        (["images16", "merge", "--out", "{tmp}/O", "{tmp}/none.json"], "images16: error: merge: "),
    ],
)
def test_bad_bench_arguments_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["bench", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    assert message in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_an_out_file_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for script in ("fd_vs_updates", "robust_vs_purifier"):
        assert main(["bench", script, "--out", str(taken), f"a={tmp_path}"]) == 2
        assert f"out: {taken} is a file, not a folder" in _one_line_error(capsys)
    assert taken.read_text() == "keep me"


def test_bench_consistency_refuses_a_diffusion_model_as_the_cm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    diffusion = tiny_checkpoint(tmp_path / "d.safetensors")
    argv = ["bench", "bench_consistency", "--cm", str(diffusion), "--diffusion", str(diffusion)]
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    assert (
        "--cm: " in (err := _one_line_error(capsys))
        and "is a diffusion model, not a consistency model" in err
    )
    assert not (tmp_path / "r.json").exists()


def test_eval_report_help_is_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "eval_report", "--help"]) == 0
    captured = capsys.readouterr()
    assert "usage:" in captured.out and "root" in captured.out and "No such file" not in captured.out
    assert "|" not in captured.out  # no half table before the arguments are read


def test_helpers_are_not_listed_as_benchmarks() -> None:
    names = benchmarks()
    assert "bench_host" in names and "eval_report" in names
    assert not [n for n in names if n.startswith("_")]
