"""`robustdiff train` / `export` mistakes: one line, exit 2, no traceback, checked before any training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main

TINY = ["--preset", "tiny", "--dataset", "digits", "--updates", "2", "--batch-size", "8", "--threads", "1"]
TINY += ["--device", "cpu", "--set", "sample_count=0", "--set", "progress=false"]


@pytest.fixture(scope="module")
def run1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-update tiny run folder with one training checkpoint."""
    root = tmp_path_factory.mktemp("run")
    config = root / "c.toml"
    config.write_text('name = "tiny"\n')
    assert main(["train", str(config), *TINY, "--out-dir", str(root / "run1")]) == 0
    return root / "run1"


def one_line(capsys: pytest.CaptureFixture[str], start: str) -> str:
    """The single stderr line of a refused command, checked to begin with ``start``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start) and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("/proc/x.safetensors", "--out: /proc"),
        ("exists", "--out: "),
        ("d.safetensors", "--out: "),
        ("O/", "--out: "),
        ("x.png", "--out: "),
    ],
)
def test_export_out_is_checked_first(
    run1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str, message: str
) -> None:
    """Before: SafetensorError or IsADirectoryError tracebacks, a stray .tmp, or a file named after the folder."""
    (tmp_path / "exists").mkdir()
    (tmp_path / "d.safetensors").mkdir()
    target = out if out.startswith("/") else str(tmp_path / out) + ("/" if out.endswith("/") else "")
    assert main(["export", str(run1), "--out", target]) == 2
    one_line(capsys, f"robustdiff export: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "exists"]
    assert not any((tmp_path / "exists").iterdir()) and not any((tmp_path / "d.safetensors").iterdir())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--export", "/proc/x.safetensors"], "--export: /proc"),
        (["--export", "{tmp}/exists"], "--export: "),
        (["--export", "{tmp}/d.safetensors"], "--export: {tmp}/d.safetensors is a folder"),
        (["--export", "{tmp}/x.png"], "--export: "),
        (["--out-dir", "/proc/x"], "--out-dir: /proc/x"),
        (["--out-dir", "{tmp}/file"], "--out-dir: {tmp}/file is a file"),
    ],
)
def test_train_outputs_are_checked_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """Before: these failed only after training had finished."""
    (tmp_path / "exists").mkdir()
    (tmp_path / "d.safetensors").mkdir()
    (tmp_path / "file").write_text("")
    config = tmp_path / "c.toml"
    config.write_text('name = "tiny"\n')
    argv = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "run")]
    assert main(["train", str(config), *TINY, *argv]) == 2
    one_line(capsys, f"robustdiff train: error: {message.replace('{tmp}', str(tmp_path))}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "d.safetensors", "exists", "file"]


def test_malformed_run_folders_name_the_file(
    run1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "o.safetensors")
    bad = shutil.copytree(run1, tmp_path / "bad")
    for pointer, message in (({"checkpoint": 5}, "is malformed"), ("{", "is not readable JSON")):
        (bad / "latest.json").write_text(pointer if isinstance(pointer, str) else json.dumps(pointer))
        assert main(["export", str(bad), "--out", out]) == 2
        one_line(capsys, f"robustdiff export: error: checkpoint: {bad / 'latest.json'} {message}")
        assert main(["train", "--resume", str(bad)]) == 2
        one_line(capsys, f"robustdiff train: error: --resume: {bad / 'latest.json'} {message}")
    step = next((bad / "checkpoints").glob("step-*.json"))
    (bad / "latest.json").write_text(json.dumps({"checkpoint": str(step)}))
    step.with_suffix(".safetensors").unlink()
    assert main(["export", str(bad), "--out", out]) == 2
    assert f"{step.with_suffix('.safetensors')} is missing" in one_line(capsys, "robustdiff export: error:")
    served = run1 / "tiny.safetensors"  # a served model: not rewritten to a .json the user never gave
    assert main(["export", str(served), "--out", out]) == 2
    line = one_line(capsys, f"robustdiff export: error: checkpoint: {served} is not a run folder")
    assert "tiny.json" not in line.split("(")[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_a_moved_run_folder_still_exports(
    run1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """latest.json holds an absolute path; a copied folder falls back to its own checkpoints/."""
    moved = shutil.copytree(run1, tmp_path / "moved")
    step = json.loads((moved / "latest.json").read_text())["checkpoint"]
    (moved / "latest.json").write_text(json.dumps({"checkpoint": str(tmp_path / "gone" / Path(step).name)}))
    assert main(["export", str(moved), "--out", str(tmp_path / "o.safetensors")]) == 0
    assert (tmp_path / "o.safetensors").stat().st_size > 0


def test_train_needs_a_config(tmp_path: Path) -> None:
    """README documents `robustdiff train CONFIG`; without one it used to start 1000 updates into ./runs."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", "--updates", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[3]), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2, done.stderr[-500:]
    assert done.stderr.strip().splitlines() == [
        "robustdiff train: error: config: give a config file (TOML or YAML), or --resume RUN_DIR"
    ]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.yaml",
            'name: a\n[data]\nname = "x"\n',
            "is not valid YAML: could not find expected ':' (at line 3",
        ),
        (
            "bad.yml",
            "name: a\n  b: : c\n",
            "is not valid YAML: mapping values are not allowed here (at line 2",
        ),
        ("bad.toml", "a = \n", "is not valid TOML: Invalid value (at line 1, column 5)"),
        ("bin.yaml", "\udcff", "is not a text file"),
    ],
)
def test_unparsable_configs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["train", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    one_line(capsys, f"robustdiff train: error: config: {path} {message}")
    assert not (tmp_path / "run").exists()
