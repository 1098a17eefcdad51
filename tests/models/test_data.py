import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import (
    FASHION_MNIST_DIR,
    downsample,
    gaussian_noise,
    load_cifar10,
    load_dataset,
    load_digits,
    load_idx_folder,
    load_image_folder,
    read_idx,
    salt_and_pepper,
    uniform_outliers,
)
from models.errors import UserError
from models.testing import write_idx


@pytest.fixture()
def idx_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 1, 0]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28)), gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([2, 2]), gz=False)
    return tmp_path


def test_idx_folder(idx_folder: Path) -> None:
    ds = load_idx_folder(idx_folder, "train", image_size=32)
    assert ds.images.shape == (5, 1, 32, 32) and ds.labels.tolist() == [0, 1, 2, 1, 0]
    assert float(ds.images.min()) >= -1 and float(ds.images.max()) <= 1
    assert torch.all(ds.images[:, :, :2] == -1)  # padded with the background value
    assert len(load_idx_folder(idx_folder, "test")) == 2


def test_idx_errors(idx_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(UserError, match="unsigned-byte IDX"):
        read_idx(bad)
    good = (idx_folder / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "short").write_bytes(good[:-7])
    with pytest.raises(UserError, match="header says"):
        read_idx(tmp_path / "short")
    with pytest.raises(UserError, match="not a directory"):
        load_idx_folder(tmp_path / "missing")
    with pytest.raises(UserError, match="split"):
        load_idx_folder(idx_folder, "valid")


def test_cifar_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with (tmp_path / name).open("wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}, f)
    ds = load_cifar10(tmp_path, "train")
    assert ds.images.shape == (15, 3, 32, 32) and ds.class_names[1] == "automobile"
    assert len(load_cifar10(tmp_path, "test")) == 3


def write_cifar10_bin(folder: Path, per_file: int = 3, seed: int = 0) -> np.ndarray:
    """CIFAR-10's binary layout (label byte + R, G, B planes); returns the test batch's pixels [N, 3, 32, 32]."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, (per_file, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
    return pixels.reshape(-1, 3, 32, 32)


def test_cifar_binary_batches_are_raw_bytes(tmp_path: Path) -> None:
    pixels = write_cifar10_bin(tmp_path)
    assert len(load_cifar10(tmp_path, "train")) == 15
    test = load_cifar10(tmp_path, "test")
    # Channel planes in R, G, B order, exactly the bytes (x / 127.5 - 1).
    assert torch.equal(test.images, torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0))
    raw = (tmp_path / "test_batch.bin").read_bytes()
    assert test.labels.tolist() == [raw[i * 3073] for i in range(3)]
    (tmp_path / "test_batch.bin").write_bytes(raw[:-1])
    with pytest.raises(UserError, match="whole 3073-byte"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch.bin").write_bytes(b"\x0a" + raw[1:])
    with pytest.raises(UserError, match="label byte above 9"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(UserError, match=r"data_batch_3\.bin not found"):
        load_cifar10(tmp_path, "train")


def test_cifar_refuses_foreign_pickles(tmp_path: Path) -> None:
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": Path("/"), b"labels": []}, f)
    with pytest.raises(UserError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path, "test")


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / cls / "a.png")
    ds = load_image_folder(tmp_path, 16, 3)
    assert (
        ds.images.shape == (2, 3, 16, 16)
        and ds.class_names == ["cats", "dogs"]
        and ds.labels.tolist() == [0, 1]
    )
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(UserError, match="not a readable image"):
        load_image_folder(tmp_path, 16, 3)


def test_digits_and_dispatch() -> None:
    ds = load_digits(16)
    assert ds.images.shape == (1797, 1, 16, 16)
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="needs a folder"):
        load_dataset("mnist")


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (installed by .ci/run)"
)
def test_fashion_mnist() -> None:
    ds = load_dataset("fashion-mnist", split="test")
    assert ds.images.shape == (10_000, 1, 32, 32) and ds.class_names[9] == "Ankle boot"


def test_gaussian_noise_statistics() -> None:
    x = torch.zeros(4000, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    out, mask = gaussian_noise(x, sigma=0.1, fraction=0.9, generator=g)
    assert abs(float(mask.float().mean()) - 0.9) < 0.02
    assert abs(float(out[mask].std()) - 0.2) < 0.005  # sigma on the [0, 1] scale is 2*sigma in [-1, 1]
    assert torch.equal(out[~mask], x[~mask])


def test_unclamped_noise_is_zero_mean_where_the_clamp_is_biased() -> None:
    """On a -1 background the clamp half-rectifies the noise (mean shift 2 sigma / sqrt(2 pi)); unclamped it is zero-mean."""
    x = torch.full((2000, 1, 8, 8), -1.0)
    sigma = 0.2
    out, _ = gaussian_noise(x, sigma, 1.0, torch.Generator().manual_seed(0), clamp=False)
    shift = out - x
    se = 2 * sigma / math.sqrt(shift.numel())
    assert abs(float(shift.mean())) < 4 * se and float(out.min()) < -1.0
    assert abs(float(shift.std()) - 2 * sigma) < 0.005
    clamped, _ = gaussian_noise(x, sigma, 1.0, torch.Generator().manual_seed(0))
    assert abs(float((clamped - x).mean()) - 2 * sigma / math.sqrt(2 * math.pi)) < 4 * se
    assert float(clamped.min()) == -1.0


def test_downsample_averages_blocks() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(downsample(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert downsample(x, 1) is x


def test_outliers_and_salt_and_pepper() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2000, 1, 8, 8)
    out, mask = uniform_outliers(x, 0.1, g)
    assert abs(float(mask.float().mean()) - 0.1) < 0.03
    assert abs(float(out[mask].var()) - 1 / 3) < 0.02  # U(-1, 1)
    sp, _ = salt_and_pepper(x, amount=0.2, fraction=1.0, generator=g)
    hit = sp != 0
    assert abs(float(hit.float().mean()) - 0.2) < 0.01
    assert abs(float((sp[hit] > 0).float().mean()) - 0.5) < 0.03
    with pytest.raises(UserError, match="fraction"):
        gaussian_noise(x, 0.1, 1.5, g)
    with pytest.raises(UserError, match="amount"):
        salt_and_pepper(x, 2.0, 0.5, g)
