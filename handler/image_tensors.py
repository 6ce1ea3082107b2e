"""Images as tensors: the nvJPEG decode route of CUDA workers, the torch image operations it needs
(orientation, area reduction, antialiased resize), and the batch's tensors (the model input,
the pictures overlays are blended on) built from host and device photos alike.

The tensor operations run on any device: on the CPU they are tested against Pillow. No
TorchServe import here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from handler.images import RESAMPLE, ImageSource, InputLayout, Photo, swapped

__all__ = [
    "DeviceJpegRoute",
    "display_batch",
    "model_batch",
    "orient_tensor",
    "reduce_tensor",
    "resize_tensor",
]

_logger = logging.getLogger(__name__)

# torch's counterparts of Pillow's filters: antialiased bilinear/bicubic follow Pillow's kernels
# (bicubic a = -0.5), "nearest-exact" Pillow's pixel centres. Lanczos has none.
_DEVICE_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}
# Most decoded pixels one nvJPEG call may hold on the device (a 12 MP photo is 36 MB).
_DEVICE_CHUNK_PIXELS = 256_000_000


# --------------------------------------------------------------------------- image operations


def orient_tensor(image: torch.Tensor, orientation: int | None) -> torch.Tensor:
    """A ``(C, H, W)`` image turned as EXIF ``orientation`` says (as Pillow's transposes)."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return image.rot90(-1, (1, 2))
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return image.rot90(1, (1, 2))
    return image


def reduce_tensor(image: torch.Tensor, need: tuple[int, int]) -> torch.Tensor:
    """Area-average a ``(C, H, W)`` uint8 image by the largest integer factor that keeps it
    at least ``need = (width, height)``: the device's counterpart of DCT scaling."""
    height, width = image.shape[1:]
    factor = min(width // max(1, need[0]), height // max(1, need[1]))
    if factor < 2:
        return image
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    reduced = F.interpolate(image[None].float(), size=size, mode="area")[0]
    return reduced.round_().clamp_(0, 255).to(torch.uint8)


def resize_tensor(image: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 image resized to ``size = (width, height)`` as ``(h, w, 3)`` uint8.

    Antialiased like Pillow's resize (bilinear, bicubic); lanczos has no torch kernel and
    is resized bicubic.
    """
    width, height = size
    if tuple(image.shape[1:]) == (height, width):
        return image.permute(1, 2, 0)
    mode = _DEVICE_MODES.get(resample, "bicubic")
    x = image[None].float()
    if mode == "nearest-exact":
        x = F.interpolate(x, size=(height, width), mode=mode)
    else:
        x = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


# --------------------------------------------------------------------------- the device route


class DeviceJpegRoute:
    """Baseline JPEGs decoded in batches with nvJPEG (``torchvision.io.decode_jpeg``).

    Known traps, handled here: one corrupt image fails a whole nvJPEG batch (the batch is
    retried image by image, and the images it still rejects go to the CPU route); the decoder
    works on its own stream and writes into memory the caching allocator hands out, which
    kernels queued on the current stream may still be reading (the stream is synchronised
    before decoding; https://github.com/pytorch/vision/pull/9606 was not merged); EXIF is
    ignored by the GPU decoder (the orientation read from the header on the CPU is applied
    here). Header and pixel limits were checked on the CPU before anything reaches the device.

    Args:
        device: where the pixels are decoded.
        chunk_pixels: most decoded pixels one decoder call may hold.
        decode: ``decode(list_of_uint8_tensors) -> list_of_(3, H, W)_tensors`` (tests pass a
            CPU decoder; the default is nvJPEG on ``device``).
    """

    def __init__(self, device: torch.device | str, chunk_pixels: int = _DEVICE_CHUNK_PIXELS,
                 decode: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> None:
        self.device = torch.device(device)
        self.chunk_pixels = chunk_pixels
        if decode is None:
            from torchvision.io import ImageReadMode, decode_jpeg

            def decode(tensors):
                return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        self._decode = decode

    def check(self) -> None:
        """Decode a small JPEG, which also sets the decoder up before the first request.

        Raises:
            RuntimeError: the decoder is unavailable here or decodes wrongly.
        """
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, format="JPEG", quality=95)
        pixels = self._decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)])[0]
        colour = pixels.float().mean(dim=(1, 2)).cpu()
        if tuple(pixels.shape) != (3, 16, 16) or (colour - torch.tensor([200.0, 100.0, 50.0])).abs().max() > 8:
            raise RuntimeError(f"decoded a test JPEG wrongly: {tuple(pixels.shape)}, mean colour {colour.tolist()}")

    def _decode_or_none(self, tensor: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decode([tensor])[0]
        except RuntimeError as exc:
            _logger.info("the device decoder rejected an image (%s): CPU route", exc)
            return None

    def decode(self, sources: Sequence[ImageSource], needs: Sequence[tuple[int, int] | None]) -> list[Photo | None]:
        """Decode JPEGs on the device, upright, area-reduced to cover each ``need`` (None: full scale).

        Returns:
            One photo per source, or None where the device decoder rejected it.
        """
        out: list[Photo | None] = [None] * len(sources)
        if not sources:
            return out
        chunk: list[int] = []
        pixels = 0
        for i, source in enumerate(sources):
            w, h = source.stored_size
            if chunk and pixels + w * h > self.chunk_pixels:
                self._decode_chunk(chunk, sources, needs, out)
                chunk, pixels = [], 0
            chunk.append(i)
            pixels += w * h
        self._decode_chunk(chunk, sources, needs, out)
        return out

    def _decode_chunk(self, chunk, sources, needs, out) -> None:
        encoded = [torch.frombuffer(bytearray(sources[i].data), dtype=torch.uint8) for i in chunk]
        if self.device.type == "cuda":  # nothing queued may still read memory the decoder gets
            torch.cuda.current_stream(self.device).synchronize()
        try:
            decoded = self._decode(encoded)
        except RuntimeError as exc:  # one bad image fails the call: find it
            _logger.info("device decode of %d images failed (%s): retrying one by one", len(chunk), exc)
            decoded = [self._decode_or_none(t) for t in encoded]
        for i, pixels in zip(chunk, decoded):
            source = sources[i]
            if pixels is None:
                continue
            if pixels.shape[0] == 1:
                pixels = pixels.expand(3, -1, -1)
            need = needs[i]
            reduced = pixels if need is None else reduce_tensor(pixels, swapped(need, source.orientation))
            upright = orient_tensor(reduced, source.orientation)
            out[i] = Photo(upright, source.size, (0.0, 0.0, float(upright.shape[2]), float(upright.shape[1])))


# --------------------------------------------------------------------------- the batch's tensors


def model_batch(photos: Sequence[Photo], layout: InputLayout, device: torch.device) -> tuple[torch.Tensor, list]:
    """The batch as the model sees it: uint8 ``(N, H, W, 3)`` (on ``device`` when any photo
    is), and each photo's box inside the input as fractions ``(x0, y0, x1, y1)``."""
    height, width = layout.input_size
    resample = RESAMPLE[layout.resample]
    host = np.empty((len(photos), height, width, 3), dtype=np.uint8)
    boxes, on_device = [], []
    for j, photo in enumerate(photos):
        x0, y0, w, h = layout.place(photo.size)
        boxes.append((x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height))
        if photo.on_device:
            on_device.append(j)
        elif (w, h) == (width, height):
            host[j] = photo.resized((w, h), resample)
        else:
            host[j] = layout.fill
            host[j, y0 : y0 + h, x0 : x0 + w] = photo.resized((w, h), resample)
    batch = torch.from_numpy(host)
    if on_device:
        batch = batch.to(device, non_blocking=True)
        fill = torch.tensor(layout.fill, dtype=torch.uint8).to(device, non_blocking=True)
        for j in on_device:
            x0, y0, w, h = layout.place(photos[j].size)
            if (w, h) != (width, height):
                batch[j] = fill
            batch[j, y0 : y0 + h, x0 : x0 + w] = resize_tensor(photos[j].pixels, (w, h), layout.resample)
    return batch, boxes


def display_batch(photos: Sequence[Photo], frames: Sequence[tuple[int, int]], out_size: tuple[int, int],
                  device: torch.device) -> torch.Tensor:
    """Each photo in its frame ``(height, width)`` (bilinear), padded to ``out_size``, as a
    uint8 ``(P, H, W, 3)`` tensor on ``device``: the pictures overlays are blended on."""
    height, width = out_size
    host = np.zeros((len(photos), height, width, 3), dtype=np.uint8)
    on_device = []
    for j, (photo, (fh, fw)) in enumerate(zip(photos, frames)):
        if photo.on_device:
            on_device.append(j)
        else:
            host[j, :fh, :fw] = photo.resized((fw, fh), Image.Resampling.BILINEAR)
    canvases = torch.from_numpy(host).to(device, non_blocking=True)
    for j in on_device:
        fh, fw = frames[j]
        canvases[j, :fh, :fw] = resize_tensor(photos[j].pixels, (fw, fh), "bilinear")
    return canvases
