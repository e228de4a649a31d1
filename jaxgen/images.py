"""Image grids: arrays in [-1, 1] written as PNG files."""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map images in [-1, 1] to uint8 [0, 255], clipping values outside the range."""
    images = np.asarray(images, dtype=np.float32)
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, *, padding: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile images [N, H, W, C] into one [rows*(H+p)+p, ncols*(W+p)+p, C] uint8 image, row by row."""
    images = to_uint8(images)
    if images.ndim != 4:
        raise ValueError(f"make_grid expects images of shape [N, H, W, C], got {images.shape}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), 255, np.uint8)
    for i in range(n):
        row, col = divmod(i, ncols)
        top = padding + row * (h + padding)
        left = padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, ncols: int, *, upscale: int = 4) -> pathlib.Path:
    """Write images [N, H, W, C] in [-1, 1] as one PNG grid with `ncols` columns and return its path."""
    grid = make_grid(images, ncols, upscale=upscale)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
