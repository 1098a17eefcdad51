"""Image decoding and encoding with numpy and Pillow only (the API process never imports torch).

Decoding turns any accepted input (PNG, JPEG, .npy) into float32 [C, H, W] in [-1, 1] and raises
``ImageError`` naming the image and the reason for everything else; encoding is the worker's
inverse for the response.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image

MAX_PIXELS = 4096 * 4096
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageError(ValueError):
    """An input image that cannot be used; ``field`` names it (e.g. ``images[2]``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Decoded(NamedTuple):
    """One decoded image and what it was, so that a refusal can say "a PNG of mode RGBA (4 channels)"
    rather than the shape it was converted to."""

    array: np.ndarray  # float32 [C, H, W] in [-1, 1]
    source: str  # e.g. "a PNG of mode RGBA (4 channels), 28x28" or "a .npy image [3, 32, 32]"


def b64decode(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(field, "not valid base64") from None


def decode(data: bytes, field: str, npy_range: str | None) -> list[Decoded]:
    """Decode one input into one or more float32 [C, H, W] arrays in [-1, 1]."""
    if data.startswith(_NPY_MAGIC):
        return _decode_npy(data, field, npy_range)
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return [_decode_raster(data, field)]
    raise ImageError(field, "not an image (expected PNG, JPEG or .npy data)")


def _decode_raster(data: bytes, field: str) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(field, f"{img.width}x{img.height} is larger than {MAX_PIXELS} pixels")
            img.load()
    except ImageError:
        raise
    except Exception as err:  # Pillow raises many types for corrupt data; all mean the same here
        raise ImageError(field, f"corrupt or truncated image ({err})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.clip(np.asarray(img, dtype=np.float32)[None] / 65535.0, 0.0, 1.0)
    elif img.mode == "F":
        raise ImageError(field, "floating-point TIFF-style images are not accepted; send .npy instead")
    else:
        plain: Image.Image = img
        if img.mode in ("1", "LA", "La"):
            plain = img.convert("L")
        elif img.mode not in ("L", "RGB"):
            plain = img.convert("RGB")  # palette, RGBA, CMYK, YCbCr...: alpha is dropped
        arr = np.asarray(plain, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    bands, read = len(img.getbands()), arr.shape[0]
    what = "palette" if img.mode in ("P", "PA") else f"{bands} channel{'s' * (bands > 1)}"
    if img.mode in ("P", "PA") or read != bands:
        what += f", read as {'grey' if read == 1 else 'RGB'}"
    source = f"a {img.format} of mode {img.mode} ({what}), {img.width}x{img.height}"
    return Decoded(np.ascontiguousarray(arr * 2.0 - 1.0, dtype=np.float32), source)


def _decode_npy(data: bytes, field: str, npy_range: str | None) -> list[Decoded]:
    if npy_range is None:
        raise ImageError("npy_range", "required for .npy images: '0,1' or '-1,1'")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # ValueError, EOFError, OSError... for truncated or pickled data
        raise ImageError(field, f"unreadable .npy ({err})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        raise ImageError(field, f".npy dtype {getattr(arr, 'dtype', '?')} is not numeric")
    if arr.ndim not in (3, 4) or arr.size == 0:
        raise ImageError(field, f".npy shape {list(arr.shape)} is not [C,H,W] or [N,C,H,W]")
    if (arr.ndim == 4 and arr.shape[1] > 4) or (arr.ndim == 3 and arr.shape[0] > 4):
        raise ImageError(field, f".npy shape {list(arr.shape)}: expected channels first (C <= 4)")
    if arr.shape[-1] * arr.shape[-2] > MAX_PIXELS:
        raise ImageError(field, f".npy image is larger than {MAX_PIXELS} pixels")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ImageError(field, ".npy contains NaN or infinity")
    lo, hi = (0.0, 1.0) if npy_range == "0,1" else (-1.0, 1.0)
    tol = 1e-5
    if arr.min() < lo - tol or arr.max() > hi + tol:
        raise ImageError(
            field,
            f"values in [{arr.min():.4g}, {arr.max():.4g}] are outside the declared range [{npy_range}]",
        )
    arr = np.clip(arr, lo, hi)
    if npy_range == "0,1":
        arr = arr * 2.0 - 1.0
    batch = arr[None] if arr.ndim == 3 else arr
    return [Decoded(np.ascontiguousarray(x), f"a .npy image {list(x.shape)}") for x in batch]


def describe_shape(shape: tuple[int, int, int]) -> str:
    """A model's image shape in words: "grey (1 channel) 32x32"."""
    c, h, w = shape
    kind = {1: "grey (1 channel)", 3: "RGB (3 channels)", 4: "RGBA (4 channels)"}.get(c, f"{c}-channel")
    return f"{kind} {h}x{w}"


def fit(
    image: Decoded,
    shape: tuple[int, int, int],
    field: str,
    resize: bool,
    hint: str = "send resize: true to convert it",
) -> np.ndarray:
    """Check an image against the model's (C, H, W); convert it (channels, then size) only when
    ``resize`` allows, never silently. The HTTP API and ``robustdiff purify`` both call this, with
    the ``hint`` that names their own switch."""
    arr = image.array
    c, h, w = shape
    if tuple(arr.shape) == (c, h, w):
        return arr
    if not resize:
        raise ImageError(
            field, f"{image.source}, but the model takes {describe_shape(shape)} images ({hint})"
        )
    if arr.shape[0] != c:
        if arr.shape[0] == 4:
            arr = arr[:3]
        if c == 1 and arr.shape[0] == 3:
            arr = np.tensordot(_LUMA, arr, axes=1)[None]
        elif c == 3 and arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
        elif c == 4 and arr.shape[0] in (1, 3):
            rgb = np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr
            arr = np.concatenate([rgb, np.ones_like(rgb[:1])])
        if arr.shape[0] != c:
            raise ImageError(field, f"cannot convert {arr.shape[0]} channels to {c}")
    if arr.shape[1:] != (h, w):
        chans = [
            np.asarray(Image.fromarray(ch.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
            for ch in arr
        ]
        arr = np.clip(np.stack(chans), -1.0, 1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_b64(arr: np.ndarray) -> str:
    return base64.b64encode(npy_bytes(arr)).decode("ascii")


def load_npy_b64(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def png_b64(img: np.ndarray) -> str:
    """[C, H, W] float in [-1, 1] -> base64 8-bit PNG (grey, RGB or RGBA by channel count)."""
    u8 = np.clip(np.rint((img + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if u8.shape[0] == 1:
        pil = Image.fromarray(u8[0])
    elif u8.shape[0] in (3, 4):
        pil = Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)))
    else:
        raise ValueError(f"PNG needs 1, 3 or 4 channels, not {u8.shape[0]}")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")
