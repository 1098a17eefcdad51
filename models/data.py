"""Data readers (IDX, CIFAR-10 binary or python batches, image folders, scikit-learn digits) and corruptions.

Every reader returns ``Dataset(images, labels, class_names, name)`` with images as float32
[N, C, H, W] in [-1, 1]. Bad paths and malformed files raise ``UserError`` naming what is wrong.
"""

from __future__ import annotations

import gzip
import pickle  # CIFAR-10's python batches are pickles of plain dicts; read only with a restricted loader
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Dataset:
    images: torch.Tensor  # [N, C, H, W] float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64 (-1 when unlabelled)
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def to_unit(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8.astype(np.float32) / 127.5 - 1.0)


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-pad with the background value (-1) to size x size (28 -> 32 for Fashion-MNIST)."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        fits = 1 << (max(h, w) - 1).bit_length()  # the next power of two: every preset divides it
        raise UserError(
            "image_size",
            f"images are {h}x{w}, larger than the model's {size}x{size}; "
            f"train at --set model.image_size={fits} (they are centre-padded)",
        )
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top), value=-1.0)


def _open(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UserError("data_path", f"cannot read {path}: {err}") from err


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally .gz): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    path = Path(path)
    data = _open(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError("data_path", f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError("data_path", f"{path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims))
    if len(data) - header != count:
        raise UserError(
            "data_path", f"{path} holds {len(data) - header} bytes of data, its header says {count}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    raise UserError("data_path", f"{folder} has no {stem}[.gz]")


def load_idx_folder(
    folder: str | Path,
    split: str = "train",
    image_size: int = 32,
    class_names: list[str] | None = None,
    name: str = "idx",
) -> Dataset:
    """MNIST-layout folder: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("data_path", f"{folder} is not a directory")
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError("split", f"must be 'train' or 'test', got {split!r}")
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(
            "data_path", f"{folder}: images {images.shape} and labels {labels.shape} do not pair up"
        )
    x = pad_to(to_unit(images)[:, None], image_size)
    names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), names, name)


def load_fashion_mnist(
    split: str = "train", folder: str | Path | None = None, image_size: int = 32
) -> Dataset:
    folder = Path(folder) if folder else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise UserError(
            "data_path", f"{folder} not found: install Debian's dataset-fashion-mnist or pass a folder"
        )
    return load_idx_folder(folder, split, image_size, FASHION_CLASSES, "fashion-mnist")


class _PlainUnpickler(pickle.Unpickler):
    """CIFAR-10 batches hold only dicts, lists, bytes and numpy arrays: refuse every other global."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


CIFAR10_RECORD = 1 + 3 * 32 * 32
"""One record of CIFAR-10's binary version: a label byte, then 1024 red, 1024 green, 1024 blue bytes."""


def load_cifar10_bin(folder: Path, split: str = "train") -> Dataset:
    """CIFAR-10 'binary version' (cifar-10-batches-bin: data_batch_1..5.bin, test_batch.bin): raw
    bytes, nothing unpickled. Labels must be 0..9 and every file whole records."""
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    xs, ys = [], []
    for name in names:
        f = folder / name
        if not f.is_file():
            raise UserError("data_path", f"{f} not found (expected CIFAR-10 binary batches)")
        raw = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR10_RECORD:
            raise UserError("data_path", f"{f} is not whole {CIFAR10_RECORD}-byte CIFAR-10 records")
        records = raw.reshape(-1, CIFAR10_RECORD)
        if int(records[:, 0].max()) > 9:
            raise UserError("data_path", f"{f} has a label byte above 9: not a CIFAR-10 batch")
        ys.append(records[:, 0].astype(np.int64))
        xs.append(records[:, 1:].reshape(-1, 3, 32, 32))
    return Dataset(
        to_unit(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), CIFAR10_CLASSES, "cifar10"
    )


def load_cifar10(folder: str | Path, split: str = "train") -> Dataset:
    """CIFAR-10 from the binary batches (preferred: raw bytes) or the 'python version' batches
    (data_batch_1..5, test_batch, read with a restricted unpickler); user-provided data only."""
    folder = Path(folder)
    if (folder / "data_batch_1.bin").is_file() or (folder / "test_batch.bin").is_file():
        return load_cifar10_bin(folder, split)
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
    xs, ys = [], []
    for f in files:
        if not f.is_file():
            raise UserError("data_path", f"{f} not found (expected CIFAR-10 python batches)")
        try:
            with f.open("rb") as fh:
                d = _PlainUnpickler(fh, encoding="bytes").load()
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise UserError("data_path", f"{f} is not a CIFAR-10 batch: {err}") from err
        xs.append(data)
        ys.append(labels)
    return Dataset(
        to_unit(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), CIFAR10_CLASSES, "cifar10"
    )


def load_image_folder(folder: str | Path, image_size: int, channels: int) -> Dataset:
    """PNG/JPEG files; sub-folders name the classes (files directly in the folder are unlabelled)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("data_path", f"{folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError("data_path", f"{folder} holds no .png/.jpg/.jpeg files")
    classes = sorted({p.parent.name for p in files if p.parent != folder})
    index = {c: i for i, c in enumerate(classes)}
    mode = "L" if channels == 1 else "RGB"
    arrays, labels = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                arr = np.asarray(
                    im.convert(mode).resize((image_size, image_size), Image.Resampling.BICUBIC),
                    dtype=np.uint8,
                )
        except (UnidentifiedImageError, OSError) as err:
            raise UserError("data_path", f"{p} is not a readable image: {err}") from err
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        labels.append(index.get(p.parent.name, -1))
    return Dataset(to_unit(np.stack(arrays)), torch.tensor(labels), classes, folder.name)


def load_digits(image_size: int = 8) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16), for very fast tests."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    if image_size != 8:
        x = pad_to(x, image_size)
    return Dataset(x, torch.from_numpy(d.target.astype(np.int64)), [str(i) for i in range(10)], "digits")


def load_dataset(
    name: str, path: str | None = None, split: str = "train", image_size: int = 32, channels: int = 1
) -> Dataset:
    """By name: fashion-mnist | mnist | idx | cifar10 | folder | digits."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, path, image_size)
    if name in ("mnist", "idx"):
        if not path:
            raise UserError("data_path", f"dataset {name!r} needs a folder")
        return load_idx_folder(path, split, image_size, name=name)
    if name == "cifar10":
        if not path:
            raise UserError(
                "data_path", "dataset 'cifar10' needs the folder of its batches (binary or python)"
            )
        return load_cifar10(path, split)
    if name == "folder":
        if not path:
            raise UserError("data_path", "dataset 'folder' needs a folder of images")
        return load_image_folder(path, image_size, channels)
    if name == "digits":
        return load_digits(image_size)
    raise UserError(
        "dataset", f"unknown dataset {name!r}; known: fashion-mnist, mnist, idx, cifar10, folder, digits"
    )


# Corruptions: each takes images in [-1, 1] and a torch.Generator, and returns (images, mask of corrupted rows).


def gaussian_noise(
    x: torch.Tensor, sigma: float, fraction: float, generator: torch.Generator, clamp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add N(0, sigma^2) (sigma on the [0, 1] scale, so 2*sigma in [-1, 1] units) to a fraction of images.

    ``clamp`` keeps the result in [-1, 1]; on a background of -1 that half-rectifies the noise (a
    +0.8 sigma mean shift no denoiser can undo). ``clamp=False`` keeps the noise zero-mean (values may
    leave [-1, 1]): the seed-A experiments use it.
    """
    _check_fraction(fraction)
    if sigma < 0:
        raise UserError("sigma", "must be >= 0")
    mask = torch.rand(x.shape[0], generator=generator) < fraction
    noise = torch.randn(x.shape, generator=generator) * (2.0 * sigma)
    out = torch.where(mask.reshape(-1, *([1] * (x.ndim - 1))), x + noise, x)
    return (out.clamp(-1.0, 1.0) if clamp else out), mask


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by ``factor`` (32x32 padded Fashion-MNIST -> 16x16 with factor 2); 1 is a no-op."""
    return images if factor == 1 else F.avg_pool2d(images, factor)


def uniform_outliers(
    x: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a fraction of images by uniform noise in [-1, 1]."""
    _check_fraction(fraction)
    mask = torch.rand(x.shape[0], generator=generator) < fraction
    u = torch.rand(x.shape, generator=generator) * 2.0 - 1.0
    return torch.where(mask.reshape(-1, *([1] * (x.ndim - 1))), u, x), mask


def salt_and_pepper(
    x: torch.Tensor, amount: float, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set a share ``amount`` of the pixels of a fraction of images to -1 or +1 (half each)."""
    _check_fraction(fraction)
    if not 0.0 <= amount <= 1.0:
        raise UserError("amount", "must be in [0, 1]")
    mask = torch.rand(x.shape[0], generator=generator) < fraction
    hit = (torch.rand(x.shape, generator=generator) < amount) & mask.reshape(-1, *([1] * (x.ndim - 1)))
    salt = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(hit, torch.where(salt, 1.0, -1.0), x), mask


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise UserError("fraction", f"must be in [0, 1], got {fraction}")
