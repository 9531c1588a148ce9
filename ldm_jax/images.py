"""Image files and grids shared by the CLIs, evaluation and the training hooks: one place, no CLI imports."""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles (N, H, W, C) images into one image, `cols` per row (default ~sqrt(N)), `pad` white pixels apart."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, images.dtype)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_png(path: str | pathlib.Path, image: np.ndarray, params: dict[str, Any] | None = None,
             infotext: str | None = None) -> None:
    """Writes a uint8 (H, W, 3) image as PNG with `params` in its text chunk ("parameters" + "ldm_jax" JSON);
    `infotext` replaces the "parameters" line (e.g. A1111's format, `sampling.a1111_infotext`)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if params or infotext:
        info.add_text("parameters", infotext or ", ".join(f"{k}: {v}" for k, v in params.items()))
    if params:
        info.add_text("ldm_jax", json.dumps(params))
    Image.fromarray(np.asarray(image, np.uint8)).save(str(path), pnginfo=info)
