import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import HEADER_KEY, CheckpointHeader, load_checkpoint, read_header, save_checkpoint
from models.errors import CheckpointError
from models.testing import tiny_checkpoint
from models.unet import UNet, preset


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = UNet(preset("tiny"))
    header = CheckpointHeader(name="rt", model=net.cfg, class_names=["a"])
    written = save_checkpoint(tmp_path / "m.safetensors", net, header)
    loaded, got = load_checkpoint(tmp_path / "m.safetensors")
    assert got == written and got.content_hash and got.class_names == ["a"]
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_half_precision_storage_halves_the_file(tmp_path: Path) -> None:
    net = UNet(preset("tiny"))
    h = CheckpointHeader(name="h", model=net.cfg)
    save_checkpoint(tmp_path / "f32.safetensors", net, h)
    save_checkpoint(tmp_path / "f16.safetensors", net, h, torch.float16)
    assert (tmp_path / "f16.safetensors").stat().st_size < 0.6 * (tmp_path / "f32.safetensors").stat().st_size
    loaded, _ = load_checkpoint(tmp_path / "f16.safetensors")
    assert loaded.conv_in.weight.dtype == torch.float32


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "good.safetensors")


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[HEADER_KEY])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_header(tmp_path / "nope.safetensors")


def test_truncated_file(good: Path, tmp_path: Path) -> None:
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)


def test_not_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_header(bad)


def test_foreign_safetensors_without_header(tmp_path: Path) -> None:
    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not a robustdiff checkpoint"):
        read_header(p)


def test_unknown_kind(good: Path, tmp_path: Path) -> None:
    meta = _meta(good)
    meta["kind"] = "gan"
    p = tmp_path / "k.safetensors"
    _rewrite(p, load_file(str(good)), {HEADER_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"header\.kind"):
        read_header(p)


def test_wrong_shapes(good: Path, tmp_path: Path) -> None:
    tensors = load_file(str(good))
    tensors["conv_in.weight"] = torch.zeros(3, 1, 3, 3)
    p = tmp_path / "s.safetensors"
    _rewrite(p, tensors, {HEADER_KEY: json.dumps(_meta(good))})
    with pytest.raises(CheckpointError, match=r"conv_in\.weight has shape"):
        load_checkpoint(p)


def test_missing_keys(good: Path, tmp_path: Path) -> None:
    tensors = load_file(str(good))
    del tensors["conv_out.bias"]
    p = tmp_path / "m.safetensors"
    _rewrite(p, tensors, {HEADER_KEY: json.dumps(_meta(good))})
    with pytest.raises(CheckpointError, match=r"missing \['conv_out.bias'\]"):
        load_checkpoint(p)


def test_tampered_weights_fail_the_hash(good: Path, tmp_path: Path) -> None:
    tensors = load_file(str(good))
    tensors["conv_out.bias"] = tensors["conv_out.bias"] + 1
    p = tmp_path / "h.safetensors"
    _rewrite(p, tensors, {HEADER_KEY: json.dumps(_meta(good))})
    with pytest.raises(CheckpointError, match="content hash"):
        load_checkpoint(p)


def test_bad_json_and_newer_format(good: Path, tmp_path: Path) -> None:
    p = tmp_path / "j.safetensors"
    _rewrite(p, load_file(str(good)), {HEADER_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)
    meta = _meta(good)
    meta["format_version"] = 99
    _rewrite(p, load_file(str(good)), {HEADER_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match="newer robustdiff"):
        read_header(p)


def test_consistency_needs_its_settings(good: Path, tmp_path: Path) -> None:
    meta = _meta(good)
    meta["kind"] = "consistency"
    p = tmp_path / "c.safetensors"
    _rewrite(p, load_file(str(good)), {HEADER_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match="consistency"):
        read_header(p)


def test_a_failed_write_leaves_no_tmp_file(tmp_path: Path) -> None:
    """Writing onto a folder fails in os.replace; the .tmp written just before must not stay behind."""
    target = tmp_path / "exists.safetensors"
    target.mkdir()
    cfg = preset("tiny")
    with pytest.raises(OSError):
        save_checkpoint(target, UNet(cfg), CheckpointHeader(name="t", model=cfg))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.safetensors"]
