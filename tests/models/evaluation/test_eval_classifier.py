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
    feature_network_name,
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


def test_the_feature_network_is_named_after_the_file_used(tmp_path: Path) -> None:
    """Two classifiers give two feature spaces: their FDs must not carry the same label."""
    headers = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        net = ResNetClassifier(ClassifierConfig(widths=(4, 8))).eval()
        headers[name] = save_classifier(
            tmp_path / f"{name}.safetensors", net, ClassifierHeader(name="tiny", model=net.config)
        )
    ha = headers["a"]
    name_a = feature_network_name(tmp_path / "a.safetensors", ha)
    name_b = feature_network_name(tmp_path / "b.safetensors", headers["b"])
    assert name_a == f"tiny (penultimate layer of a.safetensors, hash {ha.content_hash[:12]})"
    assert name_b.startswith("tiny (penultimate layer of b.safetensors, hash ") and name_a != name_b
    assert name_a.split(" (")[0] == "tiny"  # what bench/gpu_report.py groups reports by
    unhashed = ha.model_copy(update={"content_hash": ""})
    assert feature_network_name("a.safetensors", unhashed).endswith("a.safetensors, no content hash)")
