"""Response forms of a map: the low-res grid, a grey heatmap PNG, a colour overlay JPEG.

The pixels are computed on the device by the engine (:mod:`handler.cam`); this module turns
host arrays into JSON-ready values, and on CUDA workers encodes overlay JPEGs on the device.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["grid_values", "png_base64", "jpeg_base64", "DeviceJpegEncoder"]

_logger = logging.getLogger(__name__)


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


class DeviceJpegEncoder:
    """Overlay JPEGs encoded on the device with nvJPEG (``torchvision.io.encode_jpeg``): only
    the compressed bytes cross to the host, not the pixels.

    The encoder reads its input on a stream of its own without waiting for the current one, so
    the images are made contiguous first and the current stream is synchronised before encoding.

    Args:
        device: where the images are.
        encode: ``encode(list_of_(3, H, W)_uint8, quality) -> list_of_byte_tensors`` (tests
            pass a CPU encoder; the default is nvJPEG).
    """

    def __init__(self, device: torch.device | str,
                 encode: Callable[[list[torch.Tensor], int], list[torch.Tensor]] | None = None) -> None:
        self.device = torch.device(device)
        if encode is None:
            from torchvision.io import encode_jpeg

            def encode(images, quality):
                return encode_jpeg(images, quality=quality)
        self._encode = encode

    def check(self) -> None:
        """Encode a small image, which also sets the encoder up before the first request.

        Raises:
            RuntimeError: the encoder is unavailable here or encodes wrongly.
        """
        image = torch.full((3, 16, 16), 128, dtype=torch.uint8, device=self.device)
        data = self._encode([image], 90)[0].cpu().numpy().tobytes()
        with Image.open(io.BytesIO(data)) as decoded:
            if decoded.format != "JPEG" or decoded.size != (16, 16):
                raise RuntimeError(f"encoded a test image wrongly: {decoded.format} {decoded.size}")

    def encode(self, images: Sequence[torch.Tensor], quality: int) -> list[torch.Tensor] | None:
        """``(H, W, 3)`` uint8 images to JPEG byte tensors on the device; None if it failed
        (the caller encodes on the CPU instead)."""
        chw = [image.permute(2, 0, 1).contiguous() for image in images]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return list(self._encode(chw, quality))
        except RuntimeError as exc:
            _logger.warning("device JPEG encoding failed (%s): encoding on the CPU", exc)
            return None
