"""Bounds on one request, checked before any pixel or device allocation."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RequestLimits"]


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request.

    Attributes:
        max_image_bytes: most encoded image bytes (after base64 decoding).
        max_pixels: most ``width * height``, checked from the header before pixels are decoded.
        max_cams: most CAM classes one request may ask for.
    """

    max_image_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_cams: int = 5
