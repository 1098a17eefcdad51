from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.errors import CheckpointError
from models.evaluation.classifier import (
    ClassifierConfig,
    ClassifierHeader,
    ResNetClassifier,
    load_classifier,
    read_classifier_header,
    save_classifier,
)


def test_save_load_round_trip_keeps_weights_and_header(tmp_path: Path) -> None:
    net = ResNetClassifier(ClassifierConfig(widths=(4, 8))).eval()
    header = save_classifier(
        tmp_path / "c.safetensors", net, ClassifierHeader(name="c", model=net.config, test_accuracy=0.5)
    )
    loaded, h = load_classifier(tmp_path / "c.safetensors")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), net(x))
    assert h == header and h.kind == "classifier" and h.test_accuracy == 0.5
    assert loaded.features(x).shape == (2, 8)


def test_loader_refuses_tampered_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    net = ResNetClassifier(ClassifierConfig(widths=(4, 8)))
    save_classifier(path, net, ClassifierHeader(name="c", model=net.config))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["head.bias"] = tensors["head.bias"] + 1
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="content hash"):
        load_classifier(tmp_path / "tampered.safetensors")
    raw = json.loads(meta["robustdiff"])
    raw["kind"] = "diffusion"
    save_file(tensors, str(tmp_path / "foreign.safetensors"), metadata={"robustdiff": json.dumps(raw)})
    with pytest.raises(CheckpointError, match="not a classifier"):
        read_classifier_header(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="no classifier file"):
        read_classifier_header(tmp_path / "missing.safetensors")
