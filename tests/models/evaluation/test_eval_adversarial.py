"""Stored adversarial examples: an interrupted or extended attack continues and ends bit for bit the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import models.evaluation.robust as robust
from models.data import FASHION_MNIST_DIR
from models.errors import UserError
from models.evaluation.adversarial import AdversarialStore
from service.cli import main

needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
STORED = "adversarial/pgd-eot-linf-eps0.05-eot2.safetensors"


def _run(model: Path, classifier: Path, out: Path, n: int, *extra: str) -> int:
    args = ["eval", "robust", "--model", str(model), "--classifier", str(classifier), "--out", str(out)]
    args += ["--n", str(n), "--batch-size", "2", "--eps", "0.05", "--attacks", "none,pgd-eot", "--eot", "2"]
    args += ["--attack-steps", "1,2", "--draws", "2", "--steps", "2", "--sanity-eps", "0", *extra]
    return main(args)


def _results(out: Path) -> list[dict[str, Any]]:
    drop = ("attack_wall_s", "resumed_images", "latency_s_per_purification", "purifier_wall_s")
    rows = json.loads((out / "robust.json").read_text())["results"]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


class _Counting:
    """Wraps robust.pgd: counts the batches attacked, and fails on call ``fail_at`` like a killed job."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at, self.pgd = 0, fail_at, robust.pgd

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.pgd(*args, **kwargs)


@pytest.fixture(scope="module")
def whole(tiny_model: Path, tiny_classifier: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted attack on 4 images (2 batches): what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("whole")
    assert _run(tiny_model, tiny_classifier, out, 4) == 0
    return out


@needs_data
def test_an_interrupted_attack_resumes_bitwise(
    tiny_model: Path, tiny_classifier: Path, whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = tmp_path / "parts"
    killed = _Counting(fail_at=2)
    monkeypatch.setattr(robust, "pgd", killed)
    assert _run(tiny_model, tiny_classifier, parts, 4) == 130  # Ctrl-C / a killed job
    assert load_file(parts / STORED)["clean"].shape[0] == 2  # the first batch survived the kill
    again = _Counting()
    monkeypatch.setattr(robust, "pgd", again)
    assert _run(tiny_model, tiny_classifier, parts, 4) == 0
    assert again.calls == 1  # only the second batch was attacked
    a, b = load_file(whole / STORED), load_file(parts / STORED)
    assert a.keys() == b.keys() == {"clean", "adv_1", "adv_2"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _results(parts) == _results(whole)
    pgd_row = next(
        r for r in json.loads((parts / "robust.json").read_text())["results"] if r["attack"] == "pgd-eot"
    )
    assert pgd_row["resumed_images"] == 2


@needs_data
def test_more_images_extend_a_finished_attack(
    tiny_model: Path, tiny_classifier: Path, whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grown = tmp_path / "grown"
    assert _run(tiny_model, tiny_classifier, grown, 2) == 0
    counting = _Counting()
    monkeypatch.setattr(robust, "pgd", counting)
    assert _run(tiny_model, tiny_classifier, grown, 4) == 0
    assert counting.calls == 1
    a, b = load_file(whole / STORED), load_file(grown / STORED)
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_data
def test_other_attack_settings_are_refused_not_mixed(
    tiny_model: Path, tiny_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    assert _run(tiny_model, tiny_classifier, out, 2) == 0
    assert _run(tiny_model, tiny_classifier, out, 2, "--seed", "1") != 0
    err = capsys.readouterr().err
    assert "holds an attack with other settings (seed)" in err and "Traceback" not in err
    assert _run(tiny_model, tiny_classifier, out, 2, "--draws", "3") == 0  # evaluation only: reused


def test_a_store_refuses_other_clean_images(tmp_path: Path) -> None:
    settings = {"attack_steps": [1], "seed": 0}
    store = AdversarialStore(tmp_path / "a.safetensors", settings, batch=2)
    x = torch.zeros(2, 1, 4, 4)
    store.add(x, {1: x + 0.1}, {"finite": True}, 0.5)
    again = AdversarialStore(tmp_path / "a.safetensors", settings, batch=2)
    assert again.wall_s == 0.5 and again.resume(x) == 2
    with pytest.raises(UserError, match=r"data: .* was attacked on other images"):
        AdversarialStore(tmp_path / "a.safetensors", settings, batch=2).resume(torch.ones(2, 1, 4, 4))
