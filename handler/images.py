"""Image decoding: encoded bytes in, RGB pixels at the scale a request needs out.

Two steps per image. :func:`open_image` reads only the header: byte, pixel and decompression-bomb
limits, the format, the EXIF orientation of JPEGs and the JPEG frame. Then
:class:`ImageDecoder` decodes the batch's pixels:

- the CPU route (Pillow): JPEGs at the smallest DCT scale (1/8, 1/4, 1/2) that still covers what
  the request needs, so a 12-megapixel photo bound for a 224x224 input is decoded at 1/8 of its
  size, and a progressive JPEG at 1/8 from its DC scans alone (:func:`dc_scans`, same pixels);
  every image in a thread of a pool made once per worker (Pillow's decoders and resamplers
  release the GIL);
- the device route on CUDA workers (:mod:`handler.image_tensors`): the batch's baseline JPEGs
  decoded with nvJPEG; progressive, CMYK, arithmetic-coded and every other format, and any JPEG
  the GPU decoder rejects, go the CPU route, image by image (:func:`device_refusal` says which).

A :class:`Photo` keeps the photo's full displayed size (after EXIF orientation) whatever scale
its pixels were decoded at, so sizes, frames and maps stay those of the photo itself.
No TorchServe or torch import here.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from handler.errors import HandlerError, InvalidInput, PayloadTooLarge, UnsupportedMedia
from handler.limits import RequestLimits

__all__ = [
    "RESAMPLE",
    "image_pixels",
    "ImageDecoder",
    "ImageSource",
    "InputLayout",
    "JpegFrame",
    "Photo",
    "cover_size",
    "decode_image",
    "decode_pixels",
    "dc_scans",
    "device_refusal",
    "jpeg_frame",
    "open_image",
    "swapped",
]

_logger = logging.getLogger(__name__)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# The only parsers Image.open may try: fewer decoders facing the network, none that shells out.
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a JPEG followed by more (cameras' multi-picture files)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)
# SOF0-SOF15 less DHT (C4), JPG (C8) and DAC (CC); SOF0 (baseline) and SOF1 (extended, Huffman)
# are the sequential 8-bit frames nvJPEG's batched decoder takes.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SEQUENTIAL = (0xC0, 0xC1)
_PROGRESSIVE_HUFFMAN = 0xC2
# A marker at a segment's start: 0xFF (fill bytes allowed), then its code.
_MARKER = re.compile(rb"\xff+[^\x00\xff]")
# Most marker segments a walk in Python visits: real files have tens (a progressive one about 30),
# while 2 MB of 4-byte segments would hold Python for half a second. Past this, the walks give up
# and the file is decoded whole, on the CPU, as any file they cannot walk.
_MAX_SEGMENTS = 1000


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class JpegFrame:
    """What the JPEG markers before the first scan say about the frame.

    Attributes:
        marker: the SOF marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...).
        precision: bits per sample.
        size: ``(width, height)`` as stored.
        components: colour components (1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK).
        frames: SOF markers seen before the first scan (a well-formed file has one).
        complete: the data ends with the end-of-image marker (a truncated file does not).
        scan_at: where the first scan's marker (SOS) starts.
    """

    marker: int
    precision: int
    size: tuple[int, int]
    components: int
    frames: int
    complete: bool
    scan_at: int = 0


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """Walk a JPEG's markers up to its first scan; None when they cannot be walked."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end, sofs = 2, len(data), []
    for _ in range(_MAX_SEGMENTS):
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # no length field
            if marker == 0xD9:
                return None
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        if marker == 0xDA:
            break
        if marker in _SOF_MARKERS:
            segment = data[pos + 4 : pos + 2 + length]
            if len(segment) < 6:
                return None
            height, width = struct.unpack(">HH", segment[1:5])
            sofs.append((marker, segment[0], (width, height), segment[5]))
        pos += 2 + length
    else:
        return None
    if not sofs:
        return None
    marker, precision, size, components = sofs[0]
    complete = data[-64:].rstrip(b"\0")[-2:] == b"\xff\xd9"  # a little zero padding is common
    return JpegFrame(marker, precision, size, components, len(sofs), complete, pos)


def _scan_stops(data: bytes) -> np.ndarray:
    """Where entropy-coded data may stop, found at once (numpy): the offsets of the 0xFFs followed
    by neither a stuffed 0x00, a restart marker (both belong to the scan) nor a fill byte."""
    buf = np.frombuffer(data, np.uint8)
    ffs = np.flatnonzero(buf[:-1] == 0xFF)
    code = buf[ffs + 1]
    return ffs[(code != 0x00) & (code != 0xFF) & ((code < 0xD0) | (code > 0xD7))]


# Markers that may stand between the scans of a sequential JPEG: tables (DHT, DAC, DQT), DNL,
# DRI, the next scan (SOS), APPn and comments.
_BETWEEN_SCANS = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xDA, 0xFE, *range(0xE0, 0xF0)})


def _segments(data: bytes, pos: int, stops: np.ndarray) -> Iterator[tuple[int, int, bytes, int]]:
    """The marker segments of ``data`` from ``pos`` on, as ``(start, code, content, after)``: the
    marker at ``data[start]``, its code, the content after its length field (a scan's header
    alone), and where the next marker starts (past a scan's entropy-coded data, found in
    ``stops``, :func:`_scan_stops`). Ends after the end-of-image marker (code 0xD9, no content),
    or after one entry of code -1 where the walk breaks (no marker, a standalone marker,
    a length past the end, a scan without an end) or passes ``_MAX_SEGMENTS``."""
    end = len(data)
    for _ in range(_MAX_SEGMENTS):
        found = _MARKER.match(data, pos) if pos < end else None
        if found is None:
            break
        start, pos, code = pos, found.end(), data[found.end() - 1]
        if code == 0xD9:
            yield start, code, b"", pos
            return
        if code == 0x01 or 0xD0 <= code <= 0xD8 or pos + 2 > end:
            break  # no standalone marker belongs between segments
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            break
        content, pos = data[pos + 2 : pos + length], pos + length
        if code == 0xDA:  # the scan's entropy-coded data runs to the next stop
            at = int(np.searchsorted(stops, pos))
            if at == len(stops):
                break
            pos = int(stops[at])
        yield start, code, content, pos
    yield pos, -1, b"", pos


def scans_end_cleanly(data: bytes, scan_at: int) -> bool:
    """Whether the markers from the first scan (``scan_at``, :attr:`JpegFrame.scan_at`) on walk,
    segment by segment, to an end-of-image marker: each scan's entropy-coded data stops only at
    a marker that may come between scans.

    A stray marker inside a scan (a damaged file) makes libjpeg, and so the CPU route, refuse
    the file; nvJPEG decodes such a file without an error (seen on an H200), so the device
    route takes only files that pass this walk. About 0.5 ms for a 2 MB camera JPEG. Random
    damage to the Huffman-coded bits themselves shows no marker: both routes decode that.
    """
    for _, code, _, _ in _segments(data, scan_at, _scan_stops(data)):
        if code == 0xD9:
            return True
        if code not in _BETWEEN_SCANS:
            return False
    return False


def dc_scans(data: bytes) -> bytes | None:
    """A progressive JPEG with its AC coefficients left out: everything decoding at 1/8 scale reads.

    At 1/8 scale libjpeg computes each pixel from its block's DC coefficient alone, and a
    progressive JPEG sends the DC coefficients in scans of their own (a first scan, perhaps a
    refinement), ahead of and apart from the AC scans that hold most of the bytes and most of the
    entropy-decoding time. Every marker segment but the AC scans (``Ss > 0``) is kept, in order,
    and one AC scan per component that codes every block as all-zero (a few bytes of end-of-band
    runs) stands in for them: the decoder then sees every coefficient as known and does not
    smooth the blocks (libjpeg-turbo estimates missing AC coefficients, and even retouches DC
    ones, from neighbouring blocks), so the result decodes at 1/8 scale to the same pixels as the
    whole file.

    Returns:
        The shortened JPEG, or None where the markers cannot be walked to the end-of-image marker,
        the frame uses restart intervals, or there is no AC scan to leave out (the caller then
        decodes ``data`` as it is, and a truncated or damaged file fails as it would have).
    """
    if data[:2] != b"\xff\xd8":
        return None
    parts, dropped, frame = [data[:2]], False, None
    for start, code, segment, after in _segments(data, 2, _scan_stops(data)):
        if code == 0xD9:  # end of image
            if not dropped or frame is None:
                return None
            return b"".join([*parts, *_zero_ac_scans(*frame), b"\xff\xd9"])
        if code < 0:
            return None
        if code == 0xDD and len(segment) >= 2 and int.from_bytes(segment[:2], "big"):
            return None  # restart intervals: the stand-in scans would need restart markers
        if code == _PROGRESSIVE_HUFFMAN and len(segment) >= 6 and len(segment) >= 6 + 3 * segment[5]:
            height, width = struct.unpack(">HH", segment[1:5])
            sampling = {segment[6 + 3 * i]: segment[7 + 3 * i] for i in range(segment[5])}
            hmax, vmax = max(v >> 4 for v in sampling.values()), max(v & 15 for v in sampling.values())
            # (width, height, the components at full resolution): the AC scans that can go
            frame = (width, height, [c for c, v in sampling.items() if v == (hmax << 4 | vmax)])
        if code != 0xDA:  # tables, frame header, APPn, comments: kept as they are
            parts.append(data[start:after])
            continue
        # SOS: Ns, Ns x (Cs, Td/Ta), Ss, Se, Ah/Al, then the entropy-coded data.
        if len(segment) < 4 or len(segment) < 4 + 2 * segment[0] or frame is None:
            return None
        # Ss = 0: a DC scan. An AC scan of a subsampled component is kept too: libjpeg decodes
        # such a component at a larger DCT scale (2x2 for 4:2:0 chroma) rather than upsample it,
        # and that reads its first AC coefficients.
        scanned = {segment[1 + 2 * i] for i in range(segment[0])}
        if segment[1 + 2 * segment[0]] == 0 or not scanned <= set(frame[2]):
            parts.append(data[start:after])
        else:
            dropped = True
    return None


# The stand-in AC scans' Huffman table (AC class, table 0): the 15 end-of-band-run symbols
# EOB0..EOB14 (0x00, 0x10, ... 0xE0), 4 bits each, codes 0000..1110.
_ZERO_AC_TABLE = b"\xff\xc4" + (3 + 16 + 15).to_bytes(2, "big") + b"\x10" + bytes([0, 0, 0, 15] + [0] * 12) + bytes(
    range(0x00, 0xF0, 0x10))
_EOB_RUN_MAX = (1 << 15) - 1  # EOB14 with 14 extra bits


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _zero_ac_scans(width: int, height: int, components: list[int]) -> list[bytes]:
    """A DHT and, per full-resolution component (by id), one AC scan (coefficients 1-63, full
    precision) in which every block is all zero: end-of-band runs over the component's blocks."""
    out = [_ZERO_AC_TABLE]
    for ident in components:
        bits, nbits, blocks = 0, 0, _ceil_div(width, 8) * _ceil_div(height, 8)
        while blocks:
            run = min(blocks, _EOB_RUN_MAX)
            blocks -= run
            n = run.bit_length() - 1
            bits = (bits << (4 + n)) | (n << n) | (run - (1 << n))  # symbol n's code is n, then n bits
            nbits += 4 + n
        pad = -nbits % 8
        raw = ((bits << pad) | ((1 << pad) - 1)).to_bytes((nbits + pad) // 8, "big")
        sos = b"\xff\xda\x00\x08\x01" + bytes([ident, 0x00, 1, 63, 0x00])
        out.append(sos + raw.replace(b"\xff", b"\xff\x00"))
    return out


@dataclass
class ImageSource:
    """An image whose header passed the limits, its pixels not decoded yet.

    Attributes:
        data: the encoded bytes.
        image: the opened Pillow image (header read, pixels not loaded).
        format: Pillow's format name (JPEG, PNG, GIF, WEBP, BMP, TIFF).
        stored_size: ``(width, height)`` as stored.
        size: ``(width, height)`` as displayed, EXIF orientation applied where it is known
            from the header (JPEG); other formats are oriented once their pixels are loaded.
        orientation: the EXIF orientation (1-8) read from a JPEG header, None for other formats.
        jpeg: the JPEG frame, for JPEGs whose markers could be walked.
    """

    data: bytes
    image: Image.Image
    format: str
    stored_size: tuple[int, int]
    size: tuple[int, int]
    orientation: int | None = None
    jpeg: JpegFrame | None = None

    def reopened(self) -> ImageSource:
        """The same image opened afresh, to decode its pixels once more at another scale (a
        Pillow image decodes once, at the scale its ``draft`` chose)."""
        return replace(self, image=Image.open(io.BytesIO(self.data), formats=(self.format,)))


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation, as ``ImageOps.exif_transpose`` reads it; 1 if unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
        return value if isinstance(value, int) and value in _TRANSPOSE else 1
    except _DECODE_ERRORS + (KeyError, TypeError) as exc:
        _logger.warning("ignoring unreadable EXIF orientation: %s", exc)
        return 1


def open_image(data: bytes, limits: RequestLimits) -> ImageSource:
    """Read an image's header and check it against the limits; no pixel is decoded.

    Args:
        data: encoded image bytes.
        limits: byte and pixel bounds.

    Returns:
        The opened image, its displayed size and what the decoders need to know.

    Raises:
        PayloadTooLarge: over ``max_image_bytes`` or ``max_pixels`` (or Pillow's bomb guard).
        UnsupportedMedia: not JPEG, PNG, GIF, WebP, BMP or TIFF.
        InvalidInput: empty, zero-sized or unreadable header.
    """
    if not data:
        raise InvalidInput("image is empty", "image")
    if len(data) > limits.max_image_bytes:
        message = f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes} bytes"
        raise PayloadTooLarge(message, "image")
    # Pillow's own bomb guard stays on: its warning becomes an error, here only.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            try:
                return _checked(image, data, limits)
            except BaseException:
                image.close()
                raise
        except HandlerError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PayloadTooLarge(f"image is too large to decode safely: {exc}", "image") from exc
        except UnidentifiedImageError as exc:
            message = (
                "image is not a supported image format; send JPEG, PNG, GIF, WebP, BMP or TIFF"
            )
            raise UnsupportedMedia(message, "image") from exc
        except _DECODE_ERRORS as exc:
            raise InvalidInput(f"image data is corrupt or truncated: {exc}", "image") from exc


def _checked(image: Image.Image, data: bytes, limits: RequestLimits) -> ImageSource:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has zero size ({width}x{height})", "image")
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit "
            f"of {limits.max_pixels} pixels",
            "image",
        )
    source = ImageSource(data, image, image.format, (width, height), (width, height))
    if image.format in _JPEG_FORMATS:  # its EXIF precedes the pixels: known before decoding
        source.orientation = _orientation(image)
        source.size = swapped(source.size, source.orientation)
        source.jpeg = jpeg_frame(data)
    return source


# --------------------------------------------------------------------------- the CPU route


def image_pixels(
    image: Image.Image, size: tuple[int, int], resample: int, box: tuple[float, ...] | None = None
) -> np.ndarray:
    """An RGB image (or its ``box``) resized to ``(width, height)`` as an ``(H, W, 3)`` uint8 array."""
    full = (0.0, 0.0, float(image.width), float(image.height))
    if image.size != size or (box is not None and tuple(map(float, box)) != full):
        image = image.resize(size, resample=resample, box=box, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class Photo:
    """A decoded photo: its pixels, possibly at a reduced scale, and its full displayed size.

    Attributes:
        pixels: RGB pixels upright: a Pillow image on the host, or a ``(3, H, W)`` uint8
            tensor on the device (the device route).
        size: ``(width, height)`` of the full photo as displayed (EXIF orientation applied).
        box: the part of ``pixels`` that is the photo, ``(x0, y0, x1, y1)`` in pixels (DCT
            scaling rounds the decoded size up, so it can end inside the last pixel).
    """

    pixels: Any  # Image.Image | torch.Tensor
    size: tuple[int, int]
    box: tuple[float, float, float, float]

    @classmethod
    def of(cls, pixels) -> Photo:
        """A photo decoded at full scale."""
        width, height = pixels.size if isinstance(pixels, Image.Image) else (pixels.shape[2], pixels.shape[1])
        return cls(pixels, (width, height), (0.0, 0.0, float(width), float(height)))

    @property
    def on_device(self) -> bool:
        return not isinstance(self.pixels, Image.Image)

    def resized(self, size: tuple[int, int], resample: int) -> np.ndarray:
        """Host pixels resized to ``(width, height)`` as an ``(H, W, 3)`` uint8 array."""
        return image_pixels(self.pixels, size, resample, box=self.box)


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """8-bit copy of 16/32-bit integer or float grayscale, on the 16-bit scale (min-max
    stretching would turn a flat or dark image into noise)."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 65535.0  # float images are conventionally normalised to [0, 1]
    return Image.fromarray(np.rint(np.clip(values, 0.0, 65535.0) / 257.0).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _gray_to_8bit(image).convert("RGB")
    try:
        if mode in _ALPHA_MODES or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image if mode == "RGB" else image.convert("RGB")
    except ValueError as exc:
        raise UnsupportedMedia(f"image mode {mode} cannot be converted to RGB", "image") from exc


def _oriented_box(box: tuple[float, ...], size: tuple[int, int], method) -> tuple[float, ...]:
    """Where ``box`` of an image of ``size`` lies after ``image.transpose(method)``."""
    x0, y0, x1, y1 = box
    w, h = size
    T = Image.Transpose
    return {
        None: (x0, y0, x1, y1),
        T.FLIP_LEFT_RIGHT: (w - x1, y0, w - x0, y1),
        T.FLIP_TOP_BOTTOM: (x0, h - y1, x1, h - y0),
        T.ROTATE_180: (w - x1, h - y1, w - x0, h - y0),
        T.TRANSPOSE: (y0, x0, y1, x1),
        T.ROTATE_90: (y0, w - x1, y1, w - x0),
        T.ROTATE_270: (h - y1, x0, h - y0, x1),
        T.TRANSVERSE: (h - y1, w - x1, h - y0, w - x0),
    }[method]


def swapped(size: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """``(width, height)`` with the axes swapped when ``orientation`` turns the image by 90 degrees
    (stored to displayed and back)."""
    return (size[1], size[0]) if orientation in _SWAPS_AXES else size


def decode_pixels(source: ImageSource, need: tuple[int, int] | None = None) -> Photo:
    """Decode an opened image on the CPU, upright and RGB.

    JPEGs are decoded at the smallest DCT scale whose size still covers ``need`` in both axes.
    Animated images give their first frame, EXIF orientation is applied, transparency is
    composited on white, and 16/32-bit grayscale is scaled to 8 bits.

    Args:
        source: what :func:`open_image` returned.
        need: ``(width, height)``, as displayed, that the pixels must cover; None for full scale.

    Raises:
        InvalidInput: truncated or corrupt pixel data.
        PayloadTooLarge: Pillow's bomb guard tripped while decoding.
        UnsupportedMedia: a mode that has no RGB conversion.
    """
    image = source.image
    try:
        box: tuple[float, ...] | None = None
        if need is not None and source.format in _JPEG_FORMATS:
            want = swapped((max(1, need[0]), max(1, need[1])), source.orientation)
            drafted = image.draft(None, want)
            if drafted is not None and drafted[1][2:] != tuple(map(float, image.size)):
                box = drafted[1]
            if drafted is not None:
                image = _dc_only(source, image, want)
        image.load()
        orientation = source.orientation if source.orientation is not None else _orientation(image)
        method = _TRANSPOSE.get(orientation)
        if box is None:
            box = (0.0, 0.0, float(image.width), float(image.height))
        box = _oriented_box(box, image.size, method)
        upright = image.transpose(method) if method is not None else image
        rgb = _to_rgb(upright)
    except HandlerError:
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image is too large to decode safely: {exc}", "image") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidInput(f"image data is corrupt or truncated: {exc}", "image") from exc
    size = source.size if source.orientation is not None else (
        swapped(source.stored_size, orientation))
    return Photo(rgb, size, box)


def _dc_only(source: ImageSource, image: Image.Image, want: tuple[int, int]) -> Image.Image:
    """For a progressive JPEG drafted to 1/8 scale: the same image opened from its DC scans alone
    (:func:`dc_scans`), which decode to the same pixels without the AC scans' entropy decoding.
    ``image`` itself otherwise."""
    frame = source.jpeg
    stored = source.stored_size
    if (frame is None or frame.marker != _PROGRESSIVE_HUFFMAN or not frame.complete
            or image.size != (_ceil_div(stored[0], 8), _ceil_div(stored[1], 8))):
        return image
    try:
        short = dc_scans(source.data)
        if short is None:
            return image
        dc_image = Image.open(io.BytesIO(short), formats=("JPEG",))
        dc_image.draft(None, want)
        if dc_image.size != image.size or dc_image.mode != image.mode:
            return image
        dc_image.load()
    except _DECODE_ERRORS as exc:  # never worse than the whole file: decode that instead
        _logger.warning("decoding a progressive JPEG from its DC scans failed (%s); decoding it whole", exc)
        return image
    return dc_image


def decode_image(data: bytes, limits: RequestLimits) -> Image.Image:
    """Decode an encoded image at full scale into a loaded, upright RGB image.

    The header is checked against the limits before any pixel is decoded (see
    :func:`open_image` and :func:`decode_pixels` for what is accepted and raised).
    """
    return decode_pixels(open_image(data, limits)).pixels


# --------------------------------------------------------------------------- the batch


def device_refusal(source: ImageSource) -> str | None:
    """Why the device route does not take an image; None when nvJPEG's batched decoder may.

    The device route takes complete, 8-bit, sequential (baseline or extended Huffman) JPEGs
    in YCbCr or grey, with a header Pillow and the marker walk agree on, whose scans walk to the
    end-of-image marker (:func:`scans_end_cleanly`). The rest decodes on the CPU, which reads
    more of the format (and reports broken files the same way as before).
    """
    frame = source.jpeg
    if source.format != "JPEG":
        return f"{source.format} image"
    if frame is None:
        return "unreadable JPEG markers"
    if frame.marker not in _SEQUENTIAL:
        return "progressive JPEG" if frame.marker in (0xC2, 0xC6, 0xCA, 0xCE) else "non-baseline JPEG"
    if frame.precision != 8 or frame.frames != 1 or frame.size != source.stored_size:
        return "unusual JPEG frame"
    if source.image.mode not in ("RGB", "L") or frame.components not in (1, 3):
        return f"{source.image.mode} JPEG"
    if source.image.info.get("adobe_transform") == 0 and frame.components == 3:
        return "RGB-coded JPEG"  # Adobe's no-transform flag, which nvJPEG may not honour
    if not frame.complete:
        return "JPEG without an end marker"
    if not scans_end_cleanly(source.data, frame.scan_at):
        return "JPEG with a damaged scan"
    return None


class DeviceRoute(Protocol):
    """A decoder of JPEGs on the device (:class:`handler.image_tensors.DeviceJpegRoute`)."""

    def decode(self, sources: Sequence[ImageSource], needs: Sequence[tuple[int, int]]) -> list[Photo | None]: ...


class ImageDecoder:
    """Decodes the images of a batch, on a thread pool made once, and on the device route.

    Args:
        threads: decoding threads; 0 or 1 decode in the calling thread.
        device_route: nvJPEG route for the JPEGs it takes, or None for CPU only.
    """

    def __init__(self, threads: int = 0, device_route: DeviceRoute | None = None) -> None:
        self.threads = threads
        self.device_route = device_route
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def routes(self, sources: Sequence[ImageSource]) -> list[str]:
        """``"device"`` or ``"cpu"``: where each image is decoded."""
        if self.device_route is None:
            return ["cpu"] * len(sources)
        # The scan walk reads every byte of each JPEG (about 0.5 ms for 2 MB, in numpy, which
        # lets go of the GIL): on the pool when there is one.
        use_pool = self._pool is not None and len(sources) > 1
        refusals = self._pool.map(device_refusal, sources) if use_pool else map(device_refusal, sources)
        return ["device" if refusal is None else "cpu" for refusal in refusals]

    def decode(
        self, sources: Sequence[ImageSource], needs: Sequence[tuple[int, int] | None]
    ) -> list[Photo | HandlerError]:
        """Decode every source to cover its need; a failure is returned in its slot."""
        out: list[Photo | HandlerError | None] = [None] * len(sources)
        routes = self.routes(sources)
        cpu = [i for i, route in enumerate(routes) if route == "cpu"]
        device = [i for i, route in enumerate(routes) if route == "device"]
        pending = self._submit(cpu, sources, needs, out)  # the CPU decodes while the device does
        if device:
            photos = self.device_route.decode([sources[i] for i in device], [needs[i] for i in device])
            rejected = [i for i, photo in zip(device, photos) if photo is None]
            for i, photo in zip(device, photos):
                out[i] = photo
            pending += self._submit(rejected, sources, needs, out)
        for i, future in pending:
            out[i] = future.result()
        return out

    def _submit(self, indices, sources, needs, out) -> list:
        if self._pool is None or len(indices) < 2:
            for i in indices:
                out[i] = _result(decode_pixels, sources[i], needs[i])
            return []
        return [(i, self._pool.submit(_result, decode_pixels, sources[i], needs[i])) for i in indices]


def _result(fn, *args):
    try:
        return fn(*args)
    except HandlerError as err:
        return err


# --------------------------------------------------------------------------- the model input


@dataclass(frozen=True)
class InputLayout:
    """How a photo is placed in the model input.

    Attributes:
        input_size: ``(height, width)`` the model sees.
        resize: ``squash`` (the whole input) or ``letterbox`` (aspect kept, centred).
        resample: the resampling filter's name (a key of :data:`RESAMPLE`).
        fill: letterbox padding colour, RGB uint8.
    """

    input_size: tuple[int, int]
    resize: str = "squash"
    resample: str = "bicubic"
    fill: tuple[int, int, int] = (0, 0, 0)

    def place(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(x0, y0, w, h)``: where a photo of ``size = (width, height)`` lands in the input."""
        height, width = self.input_size
        if self.resize == "squash":
            return 0, 0, width, height
        scale = min(width / size[0], height / size[1])
        w, h = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
        return (width - w) // 2, (height - h) // 2, w, h


def cover_size(size: tuple[int, int], layout: InputLayout, frame: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(width, height)`` the decoded pixels of a photo of ``size`` must cover: its place in
    the model input and, when an overlay is drawn on it, its frame ``(height, width)``."""
    _, _, w, h = layout.place(size)
    if frame is not None:
        w, h = max(w, frame[1]), max(h, frame[0])
    return w, h
