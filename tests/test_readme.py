"""The README is the user's entry point: its commands and its settings table must stay true."""

import re
from pathlib import Path

from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`(ROBUSTDIFF_[A-Z_]+)`", README))
    expected = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert expected <= documented, sorted(expected - documented)


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in README and "make serve" in README
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_python_example_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    block = re.search(r"```python\n(.*?)```", README, re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)  # a scratch checkout root: the example reads the committed weights
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights").symlink_to(ROOT / "models" / "weights")
    scope: dict[str, object] = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert tuple(scope["two"].shape) == (16, 1, 32, 32)  # type: ignore[attr-defined]
