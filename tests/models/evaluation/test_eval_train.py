"""`eval train-classifier`: fine-tuning from a classifier, and training on a purifier's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import UserError
from models.evaluation.classifier import (
    ClassifierConfig,
    ResNetClassifier,
    load_classifier,
    read_classifier_header,
    train_classifier,
)
from models.testing import write_idx
from service.cli import main

TINY = ClassifierConfig(widths=(4, 8))


@pytest.fixture()
def idx_folder(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped IDX folder: 64 training and 8 test images, labels 0-9."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (64, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 64))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 8))
    return folder


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_the_purifier_sees_the_requested_share_of_every_batch() -> None:
    seen: list[int] = []

    def purify(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seen.append(x.shape[0])
        return torch.zeros_like(x)

    data = _data(256)
    train_classifier(TINY, data, epochs=2, batch_size=32, purify=purify, purify_fraction=0.25)
    assert 0.15 < sum(seen) / 512 < 0.35
    seen.clear()
    train_classifier(TINY, data, epochs=1, batch_size=32, purify=purify, purify_fraction=1.0)
    assert seen == [32] * 8


def test_what_the_purifier_returns_is_what_the_classifier_trains_on() -> None:
    def poisoned(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.full_like(x, float("nan"))

    net = train_classifier(TINY, _data(32), epochs=1, batch_size=32, purify=poisoned, purify_fraction=1.0)
    assert torch.isnan(net.head.weight).all()
    net = train_classifier(
        TINY, _data(32), epochs=1, batch_size=32, purify=lambda x, g: x, purify_fraction=1.0
    )
    assert torch.isfinite(net.head.weight).all()


def test_fine_tuning_starts_from_init_and_leaves_it_untouched() -> None:
    torch.manual_seed(123)  # not the trainer's seed, so a fresh net differs from it
    init = ResNetClassifier(TINY).eval()
    before = {k: v.clone() for k, v in init.state_dict().items()}
    tuned = train_classifier(TINY, _data(), epochs=1, batch_size=32, lr=1e-6, init=init)
    assert all(torch.equal(v, before[k]) for k, v in init.state_dict().items())
    head = tuned.state_dict()["head.weight"]
    assert not torch.equal(head, before["head.weight"])
    assert torch.allclose(head, before["head.weight"], atol=1e-4)
    fresh = train_classifier(TINY, _data(), epochs=1, batch_size=32, lr=1e-6)
    assert not torch.allclose(fresh.state_dict()["head.weight"], before["head.weight"], atol=1e-2)


def test_bad_fine_tuning_arguments_are_refused() -> None:
    with pytest.raises(UserError, match="purify-fraction"):
        train_classifier(TINY, _data(), epochs=1, purify_fraction=0.0)
    with pytest.raises(UserError, match="architecture differs"):
        train_classifier(TINY, _data(), epochs=1, init=ResNetClassifier(ClassifierConfig(widths=(4,))))


def test_purifier_aware_fine_tuning_end_to_end(
    tiny_model: Path,
    tiny_classifier: Path,
    idx_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "tuned.safetensors"
    argv = ["eval", "train-classifier", "--data", str(idx_folder), "--init", str(tiny_classifier)]
    argv += ["--purifier", str(tiny_model), "--purify-t-star", "0.2", "--purify-steps", "2"]
    argv += [
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--train-n",
        "48",
        "--purified-eval-n",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    header = read_classifier_header(out)
    assert header.fine_tuned_from == read_classifier_header(tiny_classifier).content_hash
    assert header.purifier is not None and header.purifier["t_star"] == 0.2 and header.purifier["steps"] == 2
    assert header.purifier["fraction"] == 0.5 and header.purifier["model"] == tiny_model.name
    assert header.model == read_classifier_header(tiny_classifier).model
    assert header.purified_test_accuracy == printed["purified_test_accuracy"]
    assert header.purified_test_accuracy is not None and header.purified_test_accuracy * 4 == round(
        header.purified_test_accuracy * 4
    )
    load_classifier(out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--purify-fraction", "0"), "purify-fraction: must be in (0, 1]"),
        (("--purify-steps", "500"), "steps: at most 400 steps fit below t*=0.4"),
        (("--purify-sampler", "consistency"), "sampler: 'consistency' is not available for diffusion models"),
        (("--train-n", "-1"), "train-n: must be >= 0"),
        (("--widths", "8,x"), "widths: expected a comma-separated list of int"),
    ],
)
def test_bad_train_classifier_arguments_fail_before_any_work(
    tiny_model: Path,
    idx_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "c.safetensors"
    argv = ["eval", "train-classifier", "--data", str(idx_folder), "--purifier", str(tiny_model)]
    assert main([*argv, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_widths_and_init_together_are_refused(
    tiny_classifier: Path, idx_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "train-classifier", "--data", str(idx_folder), "--init", str(tiny_classifier)]
    assert main([*argv, "--widths", "4,8", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "widths: the architecture comes from --init" in capsys.readouterr().err


def test_a_purifier_whose_images_the_classifier_cannot_take_is_refused(
    tiny_model16: Path, idx_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "train-classifier", "--data", str(idx_folder), "--purifier", str(tiny_model16)]
    assert main([*argv, "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "classifier: expects images 1x32x32, the model makes 1x16x16" in capsys.readouterr().err
