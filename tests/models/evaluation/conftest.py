"""Tiny fixtures for the evaluation tests: a random 32x32 tiny diffusion checkpoint and tiny classifiers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.evaluation.classifier import ClassifierConfig, ClassifierHeader, ResNetClassifier, save_classifier
from models.testing import tiny_checkpoint


def make_classifier(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised, BN-in-eval classifier saved in the real format."""
    torch.manual_seed(seed)
    net = ResNetClassifier(ClassifierConfig(image_size=image_size, widths=(4, 8)))
    header = ClassifierHeader(name="tiny-classifier", model=net.config, test_accuracy=None)
    save_classifier(path, net.eval(), header)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny UNet at 32x32 so it pairs with Fashion-MNIST-shaped classifiers."""
    return tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny32.safetensors", image_size=32)


@pytest.fixture(scope="session")
def tiny_model16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("m16") / "tiny16.safetensors")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("c") / "cls.safetensors")


@pytest.fixture(scope="session")
def tiny_classifier16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("c16") / "cls16.safetensors", image_size=16)
