"""`--device` and the trainer's `device`: a device this machine lacks is one line and exit 2, up front."""

from pathlib import Path

import pytest
import torch

from models.devices import device_option, resolve_device
from models.errors import UserError
from service.cli import main

# A CUDA device that does not exist on this machine, with or without a GPU.
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_auto_and_cpu_resolve_to_devices_that_exist() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_option("auto") in ("cpu", "cuda")


@pytest.mark.parametrize(
    ("device", "reason"), [("gpu", "not one of"), ("cuda:x", "not one of"), ("", "not one of")]
)
def test_malformed_device_names_are_refused(device: str, reason: str) -> None:
    with pytest.raises(UserError) as err:
        resolve_device(device)
    assert err.value.field == "device" and reason in err.value.reason


def test_a_missing_cuda_device_is_refused() -> None:
    with pytest.raises(UserError) as err:
        resolve_device(MISSING_CUDA)
    assert err.value.field == "device" and "requested but" in err.value.reason


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--model", "m.safetensors", "--out", "o.png"],
        ["purify", "--model", "m.safetensors", "--out", "o.png", "a.png"],
        ["eval", "robust", "--model", "m.safetensors"],
        ["eval", "quality", "--model", "m.safetensors"],
        ["eval", "corruption", "--model", "m.safetensors"],
        ["eval", "train-classifier", "--out", "c.safetensors"],
    ],
)
@pytest.mark.parametrize("device", ["gpu", MISSING_CUDA])
def test_every_device_option_fails_before_any_work(
    argv: list[str], device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model path does not exist: the device is refused first, at argument parsing."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--device", device])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --device:" in err.splitlines()[-1] and "Traceback" not in err


def test_the_trainer_refuses_a_missing_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parents[2] / "models/train/configs/fmnist-cd.toml"
    code = main(["train", str(config), "--device", "gpu", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "device: 'gpu' is not one of" in err and "Traceback" not in err
