"""Arguments the CLI sweep found accepted or crashing: each is now one line, exit 2, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.errors import UserError
from models.evaluation.cli import check_purifier, parse_list
from models.testing import tiny_checkpoint
from service.cli import main


@pytest.fixture(scope="module")
def tiny_cm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny consistency model at 32x32, the shape of the tiny classifiers."""
    return tiny_checkpoint(
        tmp_path_factory.mktemp("cm") / "cm32.safetensors", kind="consistency", image_size=32
    )


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err + captured.out
    return err


def test_train_classifier_needs_an_explicit_out(
    tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "train-classifier", "--data", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --out" in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--threads", "-2"), "threads: must be >= 1 (or 0 for torch's default), got -2"),
        (("--widths", "32,,64"), "widths: an empty item in '32,,64'"),
        (("--out", "c.pt"), "out: c.pt: the file name must end in .safetensors"),
    ],
)
def test_bad_train_classifier_arguments_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    argv = [
        "eval",
        "train-classifier",
        "--data",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "c.safetensors"),
    ]
    assert main([*argv, *extra]) == 2
    assert message in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def _eval(command: str, model: Path, classifier: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        command,
        "--model",
        str(model),
        "--classifier",
        str(classifier),
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("quality", ("--steps", "1,,2"), "steps: an empty item in '1,,2'"),
        ("robust", ("--eps", "0.1,,0.2"), "eps: an empty item in '0.1,,0.2'"),
        ("robust", ("--eot", "1,,4"), "eot: an empty item in '1,,4'"),
        ("robust", ("--eot", "1,4,"), "eot: an empty item in '1,4,'"),
        ("corruption", ("--t-star", "0.5,,0.2"), "t-star: an empty item in '0.5,,0.2'"),
        ("corruption", ("--t-star", ","), "t-star: must not be empty"),
        ("corruption", ("--seed", "-1"), "seed: must be >= 0, got -1"),
    ],
)
def test_empty_list_items_and_a_negative_seed_are_refused(
    tiny_model: Path,
    tiny_classifier: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert main(_eval(command, tiny_model, tiny_classifier, out, *extra)) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()


def test_the_list_parser_keeps_good_lists_and_names_the_option() -> None:
    assert parse_list(" 5, 10 ,20", int, "steps") == [5, 10, 20]
    with pytest.raises(UserError, match=r"^eps: an empty item"):
        parse_list("0.1,,0.2", float, "eps")


@pytest.mark.parametrize("command", ["quality", "robust", "corruption"])
def test_an_out_that_is_a_file_is_refused_before_any_work(
    tiny_model: Path,
    tiny_classifier: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    out = tmp_path / "taken"
    out.write_text("keep me")
    assert main(_eval(command, tiny_model, tiny_classifier, out, "--data", str(tmp_path / "nowhere"))) == 2
    assert f"out: {out} is a file, not a folder" in _one_line_error(capsys)
    assert out.read_text() == "keep me"


def _robust_report(path: Path, bits: object) -> Path:
    row = {"defense": "purifier", "attack": "none", "eps": 0.0, "majority_per_image": bits}
    path.write_text(json.dumps({"results": [row]}))
    return path


def test_compare_refuses_an_out_file_and_malformed_per_image_outcomes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _robust_report(tmp_path / "good.json", "1101")
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert main(["eval", "compare", str(good), str(good), "--out", str(taken)]) == 2
    assert f"out: {taken} is a file, not a folder" in _one_line_error(capsys)
    assert taken.read_text() == "keep me"
    for bits in ("", "yes", "10x1", 1101):
        bad = _robust_report(tmp_path / "bad.json", bits)
        out = tmp_path / "cmp"
        assert main(["eval", "compare", str(good), str(bad), "--out", str(out)]) == 2
        err = _one_line_error(capsys)
        assert f"reports: {bad}: majority_per_image must be a non-empty string of 0s and 1s" in err
        assert not out.exists()


def test_the_purifier_sampler_defaults_to_the_models_own(tiny_model: Path, tiny_cm: Path) -> None:
    assert check_purifier(str(tiny_cm), None, 1, [0.5]) == "consistency"
    assert check_purifier(str(tiny_model), None, 1, [0.5]) == "ddim"
    with pytest.raises(UserError, match="is a consistency model; use 'consistency'"):
        check_purifier(str(tiny_cm), "ddim", 1, [0.5])


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "robust", "--model", "{cm}", "--classifier", "{cls}", "--out", "{out}"],
        ["eval", "corruption", "--model", "{cm}", "--classifier", "{cls}", "--out", "{out}"],
        ["eval", "train-classifier", "--purifier", "{cm}", "--out", "{out}.safetensors"],
    ],
)
def test_a_consistency_model_needs_no_sampler_option(
    tiny_cm: Path,
    tiny_classifier: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    """The checks pass (sampler included) and the run gets as far as reading the data."""
    out = tmp_path / "out"
    filled = [a.format(cm=tiny_cm, cls=tiny_classifier, out=out) for a in argv]
    assert main([*filled, "--data", str(tmp_path / "nowhere")]) == 2
    err = _one_line_error(capsys)
    assert "error: data_path:" in err and "sampler" not in err
    assert not out.exists()
