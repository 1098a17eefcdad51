"""Output paths are refused before any work, with the option named."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import UserError
from models.paths import output_dir, output_file


def test_good_paths_pass_and_create_nothing(tmp_path: Path) -> None:
    assert (
        output_file(tmp_path / "new" / "deeper" / "grid.png", "--out", [".png"])
        == tmp_path / "new" / "deeper" / "grid.png"
    )
    assert output_dir(tmp_path / "run", "--out-dir") == tmp_path / "run"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "suffixes", "reason"),
    [
        (lambda d: d / "grid.txt", [".png"], "must end in .png"),
        (lambda d: d, None, "is a folder"),
        (lambda d: (d / "afile").write_text("x") and d / "afile" / "x.png", None, "is a file, not a folder"),
        (lambda d: Path("/proc/x.safetensors"), None, "cannot write in /proc"),
    ],
)
def test_bad_output_files_are_refused(tmp_path: Path, make, suffixes, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError) as err:
        output_file(make(tmp_path), "--out", suffixes)
    assert err.value.field == "--out" and reason in err.value.reason


def test_bad_output_dirs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        output_dir(tmp_path / "afile", "--out")
    with pytest.raises(UserError, match="cannot write"):
        output_dir("/proc/run", "--out")
