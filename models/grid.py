"""PNG grids of images: what users look at after training, sampling and purification."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from models.errors import UserError

# What ``save_grid`` writes: formats Pillow saves from both grayscale and RGB in every build; the
# suffix picks the format, so anything else is refused when the arguments are read, not after sampling.
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """One uint8 array [H', W', C] tiling the batch, nrow images per row."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = (
            arr[i]
        )
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    """Write the tiled batch, upscaled ``scale`` times so small images stay visible."""
    from PIL import Image

    if Path(path).suffix.lower() not in GRID_SUFFIXES:  # callers check first; this keeps Pillow's error out
        raise UserError("out", f"{path}: the file name must end in {' or '.join(GRID_SUFFIXES)}")
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
