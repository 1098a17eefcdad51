"""`eval train-classifier`: fine-tuning, training on a purifier's outputs, adversarial training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import UserError
from models.evaluation.classifier import (
    AdversarialTraining,
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


def test_adversarial_images_stay_in_the_ball_and_raise_the_loss() -> None:
    torch.manual_seed(0)
    net = ResNetClassifier(TINY).train()
    x, y = _data(16)
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    for threat, eps in (("linf", 0.05), ("l2", 0.5)):
        adv = AdversarialTraining(eps, steps=4, threat=threat).perturb(
            net, x, y, torch.Generator().manual_seed(0)
        )
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(1) if threat == "linf" else delta.norm(dim=1)
        assert (size <= 2 * eps + 1e-5).all() and adv.min() >= -1 and adv.max() <= 1
        with torch.no_grad():
            net.eval()
            clean_loss = torch.nn.functional.cross_entropy(net(x), y)
            adv_loss = torch.nn.functional.cross_entropy(net(adv), y)
            net.train()
        assert adv_loss > clean_loss
    assert net.training
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())  # BatchNorm stats too


def test_the_classifier_trains_on_the_adversarial_images_of_the_purified_batch() -> None:
    seen: list[torch.Tensor] = []

    class Recording(AdversarialTraining):
        def perturb(
            self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
        ) -> torch.Tensor:
            seen.append(x.clone())
            return torch.full_like(x, float("nan"))

    purified = 7.0
    net = train_classifier(
        TINY,
        _data(64),
        epochs=1,
        batch_size=16,
        purify=lambda x, g: torch.full_like(x, purified),
        purify_fraction=1.0,
        adversarial=Recording(0.1),
    )
    assert len(seen) == 4 and all(bool((batch == purified).all()) for batch in seen)
    assert torch.isnan(net.head.weight).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eps": 0.0}, "adversarial-eps"),
        ({"eps": 0.1, "steps": 0}, "adversarial-steps"),
        ({"eps": 0.1, "step_size": -1.0}, "adversarial-step-size"),
        ({"eps": 0.1, "threat": "l1"}, "adversarial-threat"),
    ],
)
def test_bad_adversarial_training_settings_are_refused(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(UserError, match=field):
        AdversarialTraining(**kwargs)  # type: ignore[arg-type]


def test_adversarial_training_end_to_end(
    idx_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "robust.safetensors"
    argv = ["eval", "train-classifier", "--data", str(idx_folder), "--widths", "4,8", "--epochs", "1"]
    argv += ["--batch-size", "16", "--adversarial-eps", "0.1", "--adversarial-steps", "2", "--out", str(out)]
    assert main(argv) == 0  # 4 updates: also the one-cycle schedule's degenerate length
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    header = read_classifier_header(out)
    assert header.adversarial == {"eps": 0.1, "steps": 2, "step_size": None, "threat": "linf"}
    assert header.test_accuracy == printed["test_accuracy"] and header.purifier is None
    load_classifier(out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--purify-fraction", "0"), "purify-fraction: must be in (0, 1]"),
        (("--purify-steps", "500"), "steps: at most 400 steps fit below t*=0.4"),
        (("--purify-sampler", "consistency"), "sampler: 'consistency' needs a consistency model"),
        (("--train-n", "-1"), "train-n: must be >= 0"),
        (("--widths", "8,x"), "widths: expected a comma-separated list of int"),
        (("--adversarial-eps", "-0.1"), "adversarial-eps: must be >= 0"),
        (("--adversarial-eps", "0.1", "--adversarial-steps", "0"), "adversarial-steps: must be >= 1"),
        (
            ("--adversarial-eps", "0.1", "--adversarial-threat", "l1"),
            "adversarial-threat: unknown threat 'l1'",
        ),
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
