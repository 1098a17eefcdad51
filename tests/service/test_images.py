"""service.images: what a refused image is called, and conversion only when asked (exact cases)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import images


def encoded(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "source", "channels"),
    [
        (encoded("L", (28, 28)), "a PNG of mode L (1 channel), 28x28", 1),
        (encoded("RGBA", (32, 32)), "a PNG of mode RGBA (4 channels, read as RGB), 32x32", 3),
        (encoded("CMYK", (32, 32), "JPEG"), "a JPEG of mode CMYK (4 channels, read as RGB), 32x32", 3),
        (encoded("P", (8, 8)), "a PNG of mode P (palette, read as RGB), 8x8", 3),
    ],
)
def test_decoded_images_say_what_they_were(data: bytes, source: str, channels: int) -> None:
    (decoded,) = images.decode(data, "files[0]", None)
    assert decoded.source == source and decoded.array.shape[0] == channels


def test_npy_images_are_named_by_shape() -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 3, 4, 4), np.float32))
    first, second = images.decode(buf.getvalue(), "images[0]", "-1,1")
    assert first.source == second.source == "a .npy image [3, 4, 4]"


def test_fit_refuses_with_the_source_and_the_callers_hint() -> None:
    (rgba,) = images.decode(encoded("RGBA", (32, 32)), "images[1]", None)
    with pytest.raises(images.ImageError) as err:
        images.fit(rgba, (1, 32, 32), "images[1]", resize=False)
    assert err.value.field == "images[1]"
    assert err.value.reason == (
        "a PNG of mode RGBA (4 channels, read as RGB), 32x32, but the model takes grey (1 channel) 32x32 images "
        "(send resize: true to convert it)"
    )
    with pytest.raises(images.ImageError, match=r"\(use --resize to convert it\)$"):
        images.fit(rgba, (1, 32, 32), "x.png", resize=False, hint="use --resize to convert it")
    assert images.fit(rgba, (1, 16, 16), "images[1]", resize=True).shape == (1, 16, 16)
