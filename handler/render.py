"""Response forms of a map: the low-res grid, a grey heatmap PNG, a colour overlay JPEG.

The pixels are computed on the device by the engine (:mod:`handler.cam`); this module only
turns host arrays into JSON-ready values.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

__all__ = ["grid_values", "png_base64", "jpeg_base64", "image_pixels"]


def grid_values(grid: np.ndarray, decimals: int = 3) -> list[list[float]]:
    """A low-res ``(h, w)`` map as nested lists of rounded floats in [0, 1]."""
    return np.round(grid.astype(np.float64), decimals).tolist()


def png_base64(grey: np.ndarray) -> str:
    """An ``(H, W)`` uint8 array as a base64 8-bit grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey), mode="L").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_base64(rgb: np.ndarray, quality: int = 85) -> str:
    """An ``(H, W, 3)`` uint8 array as a base64 JPEG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_pixels(image: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """An RGB image resized to ``(width, height)`` as an ``(H, W, 3)`` uint8 array."""
    if image.size != size:
        image = image.resize(size, resample=resample, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)
