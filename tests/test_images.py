"""Tests of handler.images and handler.image_tensors: header checks, decoding at the scale needed
(DCT scaling), EXIF orientation, the parallel batch decoder, and the device route's logic run on
the CPU (the same torch code, with torchvision's CPU JPEG decoder standing in for nvJPEG)."""

from __future__ import annotations

import base64
import io
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encode_image as _encode
from PIL import Image, ImageFile, ImageOps

from handler.codec import extract_request
from handler.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from handler.image_tensors import (
    DeviceJpegRoute,
    display_batch,
    model_batch,
    orient_tensor,
    reduce_tensor,
    resize_tensor,
)
from handler.images import (
    RESAMPLE,
    ImageDecoder,
    InputLayout,
    Photo,
    _oriented_box,
    cover_size,
    dc_scans,
    decode_image,
    decode_pixels,
    device_refusal,
    image_pixels,
    jpeg_frame,
    open_image,
    scans_end_cleanly,
)
from handler.limits import RequestLimits

DATA = Path(__file__).parent / "data"
LIMITS = RequestLimits()
BICUBIC = Image.Resampling.BICUBIC


# --- decode_image ----------------------------------------------------------------------------


def _pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


def test_decode_png_exact_pixels(png):
    image = decode_image(png, LIMITS)
    assert (image.mode, image.size) == ("RGB", (8, 6))
    assert _pixel(image, (3, 2)) == (10, 20, 30)
    assert _pixel(image, (0, 0)) == (200, 0, 0)
    assert getattr(image, "fp", None) is None


def test_decode_real_photo():
    data = (DATA / "chelsea.jpg").read_bytes()
    with Image.open(DATA / "chelsea.jpg") as reference:
        expected = np.asarray(reference.convert("RGB"))
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_decode_round_trip_from_json_request(png):
    request = extract_request({"body": {"image": base64.b64encode(png).decode()}}, {})
    assert _pixel(decode_image(request.image_bytes, LIMITS), (3, 2)) == (10, 20, 30)


def test_truncated_jpeg():
    data = (DATA / "chelsea.jpg").read_bytes()
    with pytest.raises(InvalidInput, match="corrupt or truncated: image file is truncated") as info:
        decode_image(data[: len(data) // 2], LIMITS)
    assert (info.value.field, info.value.status) == ("image", 400)


def test_corrupted_png_idat():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = bytearray(_encode(Image.fromarray(noise)))
    start = data.index(b"IDAT") + 4
    for offset in range(100, 116):
        data[start + offset] ^= 0xFF
    with pytest.raises(InvalidInput, match="corrupt or truncated: .*data stream") as info:
        decode_image(bytes(data), LIMITS)
    assert (info.value.field, info.value.status) == ("image", 400)


@pytest.fixture
def no_pixel_load(monkeypatch):
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_decompression_bomb_png(no_pixel_load):
    data = _encode(Image.new("1", (12000, 12000)), optimize=True)  # 144 megapixels
    assert len(data) < 32 * 1024
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, LIMITS)
    assert (info.value.field, info.value.status) == ("image", 413)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global guard was left alone


def test_pixel_limit_checked_from_header(no_pixel_load):
    data = _encode(Image.new("1", (8000, 8000)), optimize=True)  # under Pillow's own guard
    with pytest.raises(PayloadTooLarge, match="8000x8000 = 64000000 pixels.*40000000") as info:
        decode_image(data, LIMITS)
    assert info.value.status == 413


def test_pixel_limit_is_configurable(png):
    with pytest.raises(PayloadTooLarge, match="8x6 = 48 pixels, over the limit of 47"):
        decode_image(png, RequestLimits(max_pixels=47))
    assert decode_image(png, RequestLimits(max_pixels=48)).size == (8, 6)


def test_over_max_image_bytes(png):
    limit = len(png) - 1
    with pytest.raises(
        PayloadTooLarge, match=f"{len(png)} bytes, over the limit of {limit}"
    ) as info:
        decode_image(png, RequestLimits(max_image_bytes=limit))
    assert (info.value.field, info.value.status) == ("image", 413)
    assert decode_image(png, RequestLimits(max_image_bytes=len(png))).size == (8, 6)


@pytest.mark.parametrize(
    "data",
    [
        b"this is not an image" * 5,
        _encode(Image.new("RGB", (4, 4)), "PPM"),  # Pillow reads it, but it is not accepted
    ],
)
def test_unknown_format(data):
    with pytest.raises(UnsupportedMedia, match="not a supported image format") as info:
        decode_image(data, LIMITS)
    assert (info.value.field, info.value.status) == ("image", 415)


def test_empty_image_bytes():
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", LIMITS)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1)])
def test_thin_images(size):
    image = decode_image(_encode(Image.new("RGB", size, (1, 2, 3))), LIMITS)
    assert (image.mode, image.size) == ("RGB", size)
    assert _pixel(image, (size[0] - 1, size[1] - 1)) == (1, 2, 3)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale(mode):
    image = decode_image(_encode(Image.new(mode, (3, 3), 77 if mode == "L" else 1)), LIMITS)
    expected = 77 if mode == "L" else 255
    assert _pixel(image, (1, 1)) == (expected,) * 3


def test_rgba_transparency_on_white():
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red
    pixels[0, 1] = (255, 0, 0, 0)  # fully transparent red
    pixels[0, 2] = (0, 0, 0, 128)  # half-transparent black
    image = decode_image(_encode(Image.fromarray(pixels, "RGBA")), LIMITS)
    assert image.mode == "RGB"
    assert _pixel(image, (0, 0)) == (255, 0, 0)
    assert _pixel(image, (1, 0)) == (255, 255, 255)
    assert _pixel(image, (2, 0)) == (127, 127, 127)


def test_gray_alpha_on_white():
    image = decode_image(_encode(Image.new("LA", (2, 2), (0, 0))), LIMITS)
    assert _pixel(image, (0, 0)) == (255, 255, 255)


def _palette_image() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    return image


def test_palette():
    image = decode_image(_encode(_palette_image()), LIMITS)
    assert (_pixel(image, (0, 0)), _pixel(image, (1, 0))) == ((0, 0, 255), (0, 255, 0))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    data = _encode(_palette_image(), fmt, transparency=0)
    image = decode_image(data, LIMITS)
    assert (_pixel(image, (0, 0)), _pixel(image, (1, 0))) == ((255, 255, 255), (0, 255, 0))


def test_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    red, green, blue = _pixel(decode_image(data, LIMITS), (8, 8))
    assert red >= 250 and green <= 5 and blue <= 5


def test_16bit_grayscale_png():
    values = np.array([[0, 255, 32768, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values))
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"
    image = decode_image(data, LIMITS)
    assert [_pixel(image, (x, 0)) for x in range(4)] == [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]


def test_32bit_integer_tiff_uses_16bit_scale():
    values = np.array([[-5, 32768, 65535, 70000]], dtype=np.int32)
    data = _encode(Image.fromarray(values, "I"), "TIFF")
    image = decode_image(data, LIMITS)
    assert [_pixel(image, (x, 0))[0] for x in range(4)] == [0, 128, 255, 255]


def test_float_tiff_in_unit_range():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    image = decode_image(_encode(Image.fromarray(values, "F"), "TIFF"), LIMITS)
    assert [_pixel(image, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 2
    assert _pixel(decode_image(data, LIMITS), (2, 2)) == (255, 0, 0)


def test_animated_webp_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((0, 255, 0), (255, 0, 0))]
    data = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert _pixel(decode_image(data, LIMITS), (4, 4)) == (0, 255, 0)


def test_exif_rotated_jpeg():
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 8, 8))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    image = decode_image(data, LIMITS)
    assert image.size == (20, 40)
    assert min(_pixel(image, (16, 3))) >= 240  # the marker is shown at the top-right
    assert max(_pixel(image, (3, 3))) <= 15
    assert max(_pixel(image, (16, 36))) <= 15


def test_zero_size_header_is_rejected():
    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + b"\0\0\0\0"
    with pytest.raises((InvalidInput, UnsupportedMedia)) as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + chunk, LIMITS)
    assert info.value.field == "image"




def test_the_header_check_decodes_no_pixel(no_pixel_load):
    exif = Image.Exif()
    exif[0x0112] = 6
    source = open_image(_encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes()), LIMITS)
    assert (source.format, source.stored_size, source.size, source.orientation) == ("JPEG", (40, 20), (20, 40), 6)
    assert source.jpeg.marker == 0xC0 and source.jpeg.complete


# --- JPEG frames and the device route's choice ------------------------------------------------


def _photo(name: str = "chelsea.jpg") -> Image.Image:
    return Image.open(DATA / name).convert("RGB")


def test_jpeg_frame_reads_the_frame_header():
    baseline = jpeg_frame(_encode(_photo(), "JPEG"))
    assert (baseline.marker, baseline.precision, baseline.size, baseline.components) == (0xC0, 8, (451, 300), 3)
    assert baseline.frames == 1 and baseline.complete
    assert jpeg_frame(_encode(_photo(), "JPEG", progressive=True)).marker == 0xC2
    assert jpeg_frame(_encode(_photo().convert("CMYK"), "JPEG")).components == 4
    assert jpeg_frame(_encode(_photo().convert("L"), "JPEG")).components == 1
    data = (DATA / "chelsea.jpg").read_bytes()
    assert not jpeg_frame(data[: len(data) // 2]).complete
    assert jpeg_frame(b"\xff\xd8\xff\xe0\x00") is None and jpeg_frame(b"not a jpeg") is None


@pytest.mark.parametrize(("data", "refusal"), [
    (lambda: _encode(_photo(), "JPEG"), None),
    (lambda: _encode(_photo().convert("L"), "JPEG"), None),
    (lambda: (DATA / "coffee.jpg").read_bytes(), None),
    (lambda: _encode(_photo(), "JPEG", progressive=True), "progressive JPEG"),
    (lambda: _encode(_photo().convert("CMYK"), "JPEG"), "CMYK JPEG"),
    (lambda: _encode(_photo(), "PNG"), "PNG image"),
    (lambda: _encode(_photo(), "WEBP"), "WEBP image"),
    (lambda: _encode(_photo(), "GIF"), "GIF image"),
    (lambda: _encode(_photo(), "TIFF"), "TIFF image"),
    (lambda: (DATA / "chelsea.jpg").read_bytes()[:20000], "JPEG without an end marker"),
    (lambda: _garbled_jpeg(), "JPEG with a damaged scan"),
])
def test_which_images_the_device_route_takes(data, refusal):
    assert device_refusal(open_image(data(), LIMITS)) == refusal


def test_the_scan_walk_passes_whole_jpegs_and_stops_at_a_stray_marker(camera):
    """nvJPEG decodes a JPEG with a stray marker in its scan (seen on an H200) where libjpeg
    refuses it: the device route takes only JPEGs whose scans walk to the end-of-image marker."""
    def walks(data: bytes) -> bool:
        return scans_end_cleanly(data, jpeg_frame(data).scan_at)

    chelsea = (DATA / "chelsea.jpg").read_bytes()
    whole = [chelsea, (DATA / "coffee.jpg").read_bytes(), _encode(camera, "JPEG", quality=92),
             _encode(_photo(), "JPEG", restart_marker_blocks=4),  # restart markers belong to the scan
             _encode(_photo(), "JPEG", progressive=True),  # many scans, tables between them
             chelsea + _encode(_photo(), "JPEG")]  # data after the end marker (as in MPO files)
    assert [walks(data) for data in whole] == [True] * len(whole)
    assert chelsea[jpeg_frame(chelsea).scan_at : jpeg_frame(chelsea).scan_at + 2] == b"\xff\xda"
    garbled = _garbled_jpeg()
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode_image(garbled, LIMITS)  # the CPU route refuses it
    at = chelsea.rindex(b"\xff\xd9") - 500
    stray = chelsea[:at] + b"\xff\xc0" + chelsea[at + 2 :]  # a frame header inside the scan
    no_end = chelsea[: chelsea.rindex(b"\xff\xd9")] + b"\0" * 4
    assert [walks(data) for data in (garbled, stray, no_end)] == [False, False, False]


def test_the_decoder_routes_only_with_a_device_route():
    sources = [open_image(_encode(_photo(), "JPEG"), LIMITS), open_image(_encode(_photo(), "PNG"), LIMITS)]
    assert ImageDecoder(0).routes(sources) == ["cpu", "cpu"]
    assert ImageDecoder(0, DeviceJpegRoute("cpu", decode=_cpu_decode)).routes(sources) == ["device", "cpu"]


# --- decoding at the scale needed --------------------------------------------------------------


@pytest.fixture(scope="module")
def camera() -> Image.Image:
    """A camera-sized photo with sensor-like noise (an upscaled photo alone compresses too well)."""
    from devkit.camera_photos import camera_pixels

    return camera_pixels(_photo(), (2016, 1008))


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("progressive", [False, True])
def test_dct_scaling_decodes_a_fraction_and_resizes_like_the_full_decode(camera, progressive):
    data = _encode(camera, "JPEG", quality=92, progressive=progressive)
    full = decode_image(data, LIMITS)
    photo = decode_pixels(open_image(data, LIMITS), (224, 224))
    assert photo.size == (2016, 1008) and photo.pixels.size == (504, 252)  # 1/4 still covers 224
    assert photo.box == (0.0, 0.0, 504.0, 252.0)
    for size in ((224, 224), (224, 112), (300, 150)):
        fast, slow = photo.resized(size, BICUBIC), image_pixels(full, size, BICUBIC)
        assert _mean_abs(fast, slow) < 1.0, size
        assert np.abs(fast.astype(int) - slow).max() <= 12, size
    # A larger need gets a larger scale: a 512-px overlay frame needs at least 512 x 256.
    assert decode_pixels(open_image(data, LIMITS), (512, 256)).pixels.size == (1008, 504)
    assert decode_pixels(open_image(data, LIMITS), (2016, 1008)).pixels.size == (2016, 1008)


def _without_dc_path(monkeypatch, data: bytes, need: tuple[int, int]) -> Photo:
    import handler.images

    with monkeypatch.context() as patch:
        patch.setattr(handler.images, "_dc_only", lambda source, image, want: image)
        return decode_pixels(open_image(data, LIMITS), need)


def _progressive_cases(camera: Image.Image) -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    odd = camera.resize((2017, 1009))
    return {
        "4:2:0": _encode(camera, "JPEG", quality=92, progressive=True),
        "4:2:0, quality 60, optimized": _encode(camera, "JPEG", quality=60, progressive=True, optimize=True),
        "4:2:2": _encode(camera, "JPEG", quality=90, progressive=True, subsampling=1),
        "4:4:4": _encode(camera, "JPEG", quality=90, progressive=True, subsampling=0),
        "gray": _encode(camera.convert("L"), "JPEG", quality=90, progressive=True),
        "CMYK": _encode(camera.convert("CMYK"), "JPEG", quality=90, progressive=True),
        "EXIF-rotated, odd size": _encode(odd, "JPEG", quality=90, progressive=True, exif=exif.tobytes()),
    }


def test_a_progressive_jpeg_at_one_eighth_decodes_from_its_dc_scans_to_the_same_pixels(camera, monkeypatch):
    """At 1/8 scale only DC coefficients (and subsampled chroma's first AC ones) are read: the
    progressive JPEG is decoded without its other AC scans, to exactly the pixels of the whole
    file, whatever its subsampling, colour space or orientation."""
    import handler.images

    shortened = []
    monkeypatch.setattr(handler.images, "dc_scans", lambda data: shortened.append(dc_scans(data)) or shortened[-1])
    for name, data in _progressive_cases(camera).items():
        got = decode_pixels(open_image(data, LIMITS), (120, 120))  # 1/8 of 2016x1008 covers it
        assert shortened and shortened.pop() is not None and not shortened, name  # taken once
        assert len(dc_scans(data)) < len(data) / 2, name
        want = _without_dc_path(monkeypatch, data, (120, 120))
        assert got.pixels.size == want.pixels.size and max(got.pixels.size) <= 253, name  # 1/8 scale
        assert (got.size, got.box) == (want.size, want.box), name
        np.testing.assert_array_equal(np.asarray(got.pixels), np.asarray(want.pixels), err_msg=name)


def test_the_dc_path_is_taken_only_where_it_is_exact(camera, monkeypatch, caplog):
    import handler.images

    progressive = _encode(camera, "JPEG", quality=92, progressive=True)
    calls = []
    real = handler.images.dc_scans
    monkeypatch.setattr(handler.images, "dc_scans", lambda data: calls.append(1) or real(data))
    # A larger scale reads AC coefficients: the whole file is decoded.
    assert decode_pixels(open_image(progressive, LIMITS), (512, 256)).pixels.size == (1008, 504)
    # Baseline JPEGs hold every coefficient in one scan: nothing to leave out.
    assert dc_scans(_encode(camera, "JPEG", quality=92)) is None
    decode_pixels(open_image(_encode(camera, "JPEG", quality=92), LIMITS), (224, 224))
    assert calls == []
    # Restart intervals: the stand-in scans would need restart markers, so no short cut.
    restarts = _encode(camera, "JPEG", quality=92, progressive=True, restart_marker_blocks=4)
    assert dc_scans(restarts) is None
    np.testing.assert_array_equal(np.asarray(decode_pixels(open_image(restarts, LIMITS), (120, 120)).pixels),
                                  np.asarray(_without_dc_path(monkeypatch, restarts, (120, 120)).pixels))
    # A truncated progressive JPEG fails as it did: the short cut never hides missing data.
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode_pixels(open_image(progressive[: len(progressive) * 2 // 3], LIMITS), (120, 120))
    assert dc_scans(progressive[: len(progressive) * 2 // 3]) is None
    # Should the shortened file fail to decode, the whole file is decoded instead, after a warning.
    monkeypatch.setattr(handler.images, "dc_scans", lambda data: data[: len(data) // 20])
    with caplog.at_level(logging.WARNING, logger="handler.images"):
        photo = decode_pixels(open_image(progressive, LIMITS), (120, 120))
    np.testing.assert_array_equal(np.asarray(photo.pixels),
                                  np.asarray(_without_dc_path(monkeypatch, progressive, (120, 120)).pixels))
    assert "decoding it whole" in caplog.text


def test_an_odd_sized_jpeg_keeps_its_exact_extent(camera):
    """4031x2015 at 1/8 decodes to 504x252 pixels of which the photo covers 503.875x251.875."""
    data = _encode(camera.resize((4031, 2015)), "JPEG", quality=92)
    photo = decode_pixels(open_image(data, LIMITS), (224, 224))
    assert photo.pixels.size == (504, 252) and photo.box == (0.0, 0.0, 4031 / 8, 2015 / 8)
    full = decode_image(data, LIMITS)
    assert _mean_abs(photo.resized((224, 224), BICUBIC), image_pixels(full, (224, 224), BICUBIC)) < 1.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_after_dct_scaling(camera, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = camera.resize((2017, 1009))  # odd sizes: the partial last pixel must follow the turn
    data = _encode(stored, "JPEG", quality=92, exif=exif.tobytes())
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    source = open_image(data, LIMITS)
    assert source.size == want.size
    photo = decode_pixels(source, (200, 200))
    assert photo.size == want.size and photo.pixels.size[0] < want.size[0]
    size = (want.size[0] // 9, want.size[1] // 9)
    assert _mean_abs(photo.resized(size, BICUBIC), image_pixels(want, size, BICUBIC)) < 1.0


@pytest.mark.parametrize("method", [None, *Image.Transpose])
def test_oriented_box_follows_pillows_transposes(method):
    image = Image.new("L", (10, 8), 0)
    image.paste(255, (0, 0, 7, 5))  # the box (0, 0, 7, 5) of a 10x8 image
    turned = image.transpose(method) if method is not None else image
    assert _oriented_box((0, 0, 7, 5), (10, 8), method) == turned.getbbox()


def test_a_multi_picture_jpeg_is_scaled_too_and_decoded_on_the_cpu(camera):
    buf = io.BytesIO()
    camera.save(buf, "MPO", save_all=True, append_images=[camera.rotate(90)], quality=90)
    source = open_image(buf.getvalue(), LIMITS)
    assert source.format == "MPO" and device_refusal(source) == "MPO image"
    photo = decode_pixels(source, (224, 224))
    assert photo.size == (2016, 1008) and photo.pixels.size == (504, 252)


def test_non_jpeg_images_are_decoded_at_full_scale():
    data = _encode(_photo().resize((1800, 1200)), "PNG")
    photo = decode_pixels(open_image(data, LIMITS), (100, 100))
    assert photo.pixels.size == (1800, 1200) == photo.size


def test_exif_orientation_of_a_png_is_applied_after_loading():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = _encode(Image.new("RGB", (30, 10), (1, 2, 3)), "PNG", exif=exif)
    source = open_image(data, LIMITS)
    assert source.orientation is None and source.size == (30, 10)  # not known before loading
    photo = decode_pixels(source, (5, 5))
    assert photo.size == (10, 30) == photo.pixels.size


def test_cover_size_follows_the_layout_and_the_frame():
    squash, letterbox = InputLayout((224, 224)), InputLayout((224, 224), "letterbox")
    assert cover_size((4032, 2016), squash) == (224, 224)
    assert cover_size((4032, 2016), letterbox) == (224, 112)
    assert cover_size((2016, 4032), letterbox) == (112, 224)
    assert cover_size((4032, 2016), letterbox, frame=(256, 512)) == (512, 256)
    assert cover_size((100, 50), squash, frame=(50, 100)) == (224, 224)


# --- the batch decoder --------------------------------------------------------------------------


def _garbled_jpeg() -> bytes:
    """A JPEG whose scan holds markers that are none: both libjpeg and torchvision refuse it."""
    data = bytearray(_encode(_photo(), "JPEG"))
    start = data.index(b"\xff\xda")
    data[start + 200 : start + 260] = b"\xff" * 60
    return bytes(data)


def _batch_sources() -> list:
    images = [_encode(_photo(), "JPEG"), _encode(_photo("coffee.jpg"), "PNG"),
              (DATA / "chelsea.jpg").read_bytes()[:20000], _garbled_jpeg(),
              _encode(_photo("astronaut.jpg"), "JPEG", progressive=True)]
    return [open_image(data, LIMITS) for data in images]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_a_batch_decodes_each_image_alone_serial_or_parallel(threads):
    decoder = ImageDecoder(threads)
    try:
        out = decoder.decode(_batch_sources(), [(224, 224)] * 5)
    finally:
        decoder.close()
    assert [type(o).__name__ for o in out] == ["Photo", "Photo", "InvalidInput", "InvalidInput", "Photo"]
    assert "truncated" in out[2].message and "broken data stream" in out[3].message
    assert [o.size for o in (out[0], out[1], out[4])] == [(451, 300), (600, 400), (512, 512)]
    want = decode_image((DATA / "chelsea.jpg").read_bytes(), LIMITS)
    assert _mean_abs(out[0].resized((224, 224), BICUBIC), image_pixels(want, (224, 224), BICUBIC)) < 2.0


# --- the device route, run on the CPU -----------------------------------------------------------


def _cpu_decode(tensors):
    """torchvision's CPU JPEG decoder in nvJPEG's place: like it, one bad image fails the call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(list(tensors), mode=ImageReadMode.RGB)


def test_the_device_route_decodes_reduces_and_turns_like_the_cpu_route(camera):
    exif = Image.Exif()
    exif[0x0112] = 6
    datas = [_encode(camera, "JPEG", quality=92),
             _encode(camera.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif.tobytes()),
             _encode(_photo().convert("L"), "JPEG")]
    sources = [open_image(d, LIMITS) for d in datas]
    photos = DeviceJpegRoute("cpu", decode=_cpu_decode).decode(sources, [(224, 224)] * 3)
    assert [p.on_device for p in photos] == [True] * 3
    assert [p.size for p in photos] == [(2016, 1008), (2016, 1008), (451, 300)]
    assert tuple(photos[0].pixels.shape) == (3, 252, 504)  # area-reduced by 4, still covering 224
    assert tuple(photos[1].pixels.shape) == (3, 252, 504)  # upright again
    assert tuple(photos[2].pixels.shape) == (3, 300, 451)
    for photo, data in zip(photos, datas):
        want = image_pixels(decode_image(data, LIMITS), (224, 224), BICUBIC)
        assert _mean_abs(resize_tensor(photo.pixels, (224, 224), "bicubic").numpy(), want) < 1.5


def test_one_bad_image_fails_the_device_batch_and_only_itself(camera):
    calls = []

    def decode(tensors):
        calls.append(len(tensors))
        return _cpu_decode(tensors)

    sources = [open_image(_encode(_photo(), "JPEG"), LIMITS), open_image(_garbled_jpeg(), LIMITS),
               open_image((DATA / "coffee.jpg").read_bytes(), LIMITS)]
    # Its header looks fine; its scan does not, so the batch decoder never sends it to the device
    # (nvJPEG decodes it: see test_the_scan_walk_...). Handed to the route anyway, it shows the
    # route's answer to any image its decoder rejects.
    assert [device_refusal(s) for s in sources] == [None, "JPEG with a damaged scan", None]
    route = DeviceJpegRoute("cpu", decode=decode)
    photos = route.decode(sources, [(224, 224)] * 3)
    assert calls == [3, 1, 1, 1]  # the batch failed, then one by one
    assert [p is None for p in photos] == [False, True, False]
    # Through the batch decoder it goes the CPU route, which answers 400.
    decoder = ImageDecoder(2, DeviceJpegRoute("cpu", decode=_cpu_decode))
    out = decoder.decode([open_image(_encode(_photo(), "JPEG"), LIMITS), open_image(_garbled_jpeg(), LIMITS),
                          open_image(_encode(_photo(), "PNG"), LIMITS)], [(224, 224)] * 3)
    decoder.close()
    assert out[0].on_device and isinstance(out[1], InvalidInput) and not out[2].on_device


def test_an_image_the_device_rejects_but_the_cpu_reads_is_decoded_on_the_cpu():
    data = _encode(_photo(), "JPEG")

    def refuse_all(tensors):
        raise RuntimeError("nvjpeg: unsupported (injected)")

    decoder = ImageDecoder(0, DeviceJpegRoute("cpu", decode=refuse_all))
    (photo,) = decoder.decode([open_image(data, LIMITS)], [(224, 224)])
    assert not photo.on_device and photo.size == (451, 300)


def test_the_device_route_holds_a_bounded_number_of_pixels_per_call():
    sizes = []

    def decode(tensors):
        sizes.append(len(tensors))
        return _cpu_decode(tensors)

    sources = [open_image(_encode(_photo(), "JPEG"), LIMITS) for _ in range(5)]  # 135,300 pixels each
    DeviceJpegRoute("cpu", chunk_pixels=300_000, decode=decode).decode(sources, [(64, 64)] * 5)
    assert sizes == [2, 2, 1]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_tensor_equals_pillows_transpose(orientation):
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(image))
    got = orient_tensor(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), orientation)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)


def test_reduce_tensor_averages_blocks_and_keeps_the_need_covered():
    image = torch.arange(2 * 8 * 12, dtype=torch.float32).reshape(2, 8, 12).to(torch.uint8)
    reduced = reduce_tensor(image, (3, 2))
    assert tuple(reduced.shape) == (2, 2, 3)  # factor 4
    assert int(reduced[0, 0, 0]) == round(float(image[0, :4, :4].float().mean()))
    assert reduce_tensor(image, (7, 2)) is image  # factor 1: untouched


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "nearest"])
def test_resize_tensor_is_close_to_pillow(resample):
    image = _photo()
    got = resize_tensor(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), (160, 120), resample)
    want = image_pixels(image, (160, 120), RESAMPLE[resample])
    assert got.shape == (120, 160, 3)
    assert _mean_abs(got.numpy(), want) < (1.0 if resample != "nearest" else 0.01)


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
def test_model_and_display_batches_mix_host_and_device_photos(resize):
    layout = InputLayout((96, 96), resize, "bicubic", (10, 20, 30))
    host = Photo.of(_photo())
    dev = Photo.of(torch.from_numpy(np.asarray(_photo()).copy()).permute(2, 0, 1))
    batch, boxes = model_batch([host, dev], layout, torch.device("cpu"))
    assert batch.shape == (2, 96, 96, 3)
    assert _mean_abs(batch[0].numpy(), batch[1].numpy()) < 1.0
    if resize == "squash":
        assert boxes == [(0.0, 0.0, 1.0, 1.0)] * 2
    else:  # 451x300 fits as 96x64, 16 rows of the mean colour above and below
        assert layout.place((451, 300)) == (0, 16, 96, 64)
        assert boxes == [(0.0, 16 / 96, 1.0, 80 / 96)] * 2
        for rows in (slice(0, 16), slice(80, 96)):
            assert batch[:, rows].reshape(-1, 3).unique(dim=0).tolist() == [[10, 20, 30]]
        want = image_pixels(_photo(), (96, 64), BICUBIC)
        assert _mean_abs(batch[0, 16:80].numpy(), want) == 0.0
    shown = display_batch([host, dev], [(100, 150), (50, 75)], (100, 150), torch.device("cpu"))
    assert shown.shape == (2, 100, 150, 3)
    assert int(shown[1, 50:].max()) == 0 and int(shown[1, :, 75:].max()) == 0  # padding
    np.testing.assert_array_equal(shown[0].numpy(), image_pixels(_photo(), (150, 100), Image.Resampling.BILINEAR))
    small = image_pixels(_photo(), (75, 50), Image.Resampling.BILINEAR)
    assert _mean_abs(shown[1, :50, :75].numpy(), small) < 1.5


def test_the_marker_walks_give_up_on_a_file_of_countless_tiny_segments(monkeypatch):
    """2 MB of 4-byte segments would hold each marker walk in Python for about half a second:
    past 1,000 segments the walks give up, and the file is decoded whole on the CPU route. The
    segments each walk visits are counted (a time limit would depend on the machine's load)."""
    import handler.images as images

    walked = []
    segments = images._segments

    def counted(*args):
        walked.append(0)
        for segment in segments(*args):
            walked[-1] += 1
            yield segment

    monkeypatch.setattr(images, "_segments", counted)
    chelsea = (DATA / "chelsea.jpg").read_bytes()
    scan_at = jpeg_frame(chelsea).scan_at
    end = chelsea.rindex(b"\xff\xd9")
    tiny = b"\xff\xfe\x00\x02" * 500_000  # empty comments
    after_scan = chelsea[:end] + tiny + chelsea[end:]  # between the scan and the end marker
    before_scan = chelsea[:2] + tiny + chelsea[2:]
    progressive = _encode(_photo(), "JPEG", progressive=True)
    progressive = progressive[:2] + tiny + progressive[2:]
    assert not scans_end_cleanly(after_scan, scan_at)
    assert jpeg_frame(before_scan) is None
    assert dc_scans(progressive) is None
    assert walked and max(walked) <= images._MAX_SEGMENTS + 1, walked  # not the file's 500,000
    monkeypatch.undo()
    photo = decode_pixels(open_image(after_scan, LIMITS), (224, 224))  # the CPU route reads it
    assert photo.size == (451, 300)
    assert device_refusal(open_image(after_scan, LIMITS)) == "JPEG with a damaged scan"
