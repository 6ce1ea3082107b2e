"""Tests of handler.codec: request forms, image decoding and option validation."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from handler.codec import (
    CAM_METHODS,
    OPTION_NAMES,
    OUTPUT_FORMS,
    CamSelection,
    CodecLimits,
    LabelIndex,
    Options,
    RawRequest,
    decode_image,
    extract_request,
    parse_defaults,
    parse_options,
)
from handler.errors import (
    InvalidInput,
    InvalidOption,
    PayloadTooLarge,
    UnsupportedMedia,
)

DATA = Path(__file__).parent / "data"
LABELS = [
    "tench, Tinca tinca",
    "goldfish, Carassius auratus",
    "crane",
    "tabby, tabby cat",
    "Egyptian cat",
    "crane",
    "tiger cat",
    "Cardigan, Cardigan Welsh corgi",
    "cardigan",
    "tiger, Panthera tigris",
]
NUM_CLASSES = len(LABELS)
LIMITS = CodecLimits()


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def png() -> bytes:
    pixels = np.zeros((6, 8, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[2, 3] = (10, 20, 30)
    return _encode(Image.fromarray(pixels))


@pytest.fixture
def labels() -> LabelIndex:
    return LabelIndex(LABELS, NUM_CLASSES)


def _parse(raw: dict, labels: LabelIndex | None = None, **limits) -> Options:
    index = labels or LabelIndex(LABELS, NUM_CLASSES)
    return parse_options(raw, Options(), index, NUM_CLASSES, CodecLimits(**limits))


def _rejects(raw: dict, field: str, match: str, labels: LabelIndex | None = None) -> None:
    with pytest.raises(InvalidOption, match=match) as info:
        _parse(raw, labels)
    assert info.value.field == field
    assert info.value.status == 400


# --- extract_request -------------------------------------------------------------------------


def test_public_constants():
    assert OPTION_NAMES == ("topk", "cam_classes", "cam_method", "outputs")
    assert CAM_METHODS == ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
    assert OUTPUT_FORMS == ("map", "heatmap", "overlay")
    assert Options() == Options(5, CamSelection("top", 1, ()), "gradcam", ("map",))


@pytest.mark.parametrize("key", ["body", "data"])
def test_raw_body(png, key):
    request = extract_request({key: png}, {})
    assert request == RawRequest(png, {}, "raw")


def test_raw_body_bytearray_and_no_headers(png):
    assert extract_request({"body": bytearray(png)}, None) == RawRequest(png, {}, "raw")


def test_raw_body_options_from_headers(png):
    headers = {
        "TopK": " 3 ",
        "CAM_Method": "layercam",
        "outputs": "overlay,map",
        "Content-Type": "image/png",
        "X-Request-Id": "abc",
        "Authorization": "secret",
    }
    request = extract_request({"body": png}, headers)
    assert request.options == {"topk": "3", "cam_method": "layercam", "outputs": "overlay,map"}
    assert request.image_bytes == png
    assert request.source == "raw"


def test_json_dict_body(png):
    body = {"image": base64.b64encode(png).decode(), "topk": 3, "outputs": ["map", "overlay"]}
    request = extract_request({"body": body}, {"Content-Type": "application/json"})
    assert request == RawRequest(png, {"topk": 3, "outputs": ["map", "overlay"]}, "json")


@pytest.mark.parametrize("as_str", [False, True])
def test_json_as_bytes_or_text(png, as_str):
    text = "  \n" + json.dumps({"image": base64.b64encode(png).decode(), "cam_classes": [1, 2]})
    body = text if as_str else text.encode()
    request = extract_request({"body": body}, {})
    assert request == RawRequest(png, {"cam_classes": [1, 2]}, "json")


def test_json_data_url_with_newlines(png):
    encoded = base64.b64encode(png).decode()
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    body = {"image": "data:image/png;base64," + wrapped}
    assert extract_request({"body": body}, {}).image_bytes == png


def test_json_urlsafe_base64_without_padding():
    payload = bytes(range(256)) * 3 + b"\xfb\xff"
    encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    assert "-" in encoded or "_" in encoded
    assert extract_request({"body": {"image": encoded}}, {}).image_bytes == payload


def test_body_options_win_over_headers(png):
    body = {"image": base64.b64encode(png).decode(), "topk": 4}
    request = extract_request({"body": body}, {"topk": "2", "cam_method": "hirescam"})
    assert request.options == {"topk": 4, "cam_method": "hirescam"}


def test_multipart_str_and_bytes_fields(png):
    item = {"image": png, "topk": b" 3 ", "outputs": "overlay ", "CAM_CLASSES": "tabby"}
    request = extract_request(item, {"cam_method": "xgradcam"})
    assert request == RawRequest(
        png,
        {"cam_method": "xgradcam", "topk": "3", "outputs": "overlay", "cam_classes": "tabby"},
        "multipart",
    )


@pytest.mark.parametrize("alias", ["file", "data"])
def test_multipart_image_aliases(png, alias):
    request = extract_request({alias: png, "topk": "1"}, {})
    assert request == RawRequest(png, {"topk": "1"}, "multipart")


def test_multipart_image_as_base64_text(png):
    request = extract_request({"image": base64.b64encode(png).decode(), "topk": "2"}, {})
    assert request.image_bytes == png


@pytest.mark.parametrize("item", [{"body": b""}, {"body": None}, {}, {"body": ""}])
def test_empty_body(item):
    with pytest.raises(InvalidInput, match="empty request body") as info:
        extract_request(item, {})
    assert (info.value.field, info.value.status) == ("body", 400)


def test_text_body():
    with pytest.raises(InvalidInput, match="text, not an image") as info:
        extract_request({"body": "a picture of a cat"}, {"Content-Type": "text/plain"})
    assert info.value.field == "body"


@pytest.mark.parametrize("body", [b'{"image": "abc"', '{"image": }', b"{\xff\xfe}"])
def test_invalid_json(body):
    with pytest.raises(InvalidInput, match="JSON") as info:
        extract_request({"body": body}, {})
    assert (info.value.field, info.value.status) == ("body", 400)


def test_json_error_names_the_position():
    with pytest.raises(InvalidInput, match=r"not valid JSON: .*line 1 column"):
        extract_request({"body": b'{"image": "abc",}'}, {})


@pytest.mark.parametrize("body", [{"topk": 3}, {"image": 5}, {"image": "  "}, b'{"img": "x"}'])
def test_json_without_image(body):
    with pytest.raises(InvalidInput, match="'image' as a base64 string") as info:
        extract_request({"body": body}, {})
    assert info.value.field == "image"


def test_json_without_image_names_the_keys():
    with pytest.raises(InvalidInput, match=r"keys received: img, topk"):
        extract_request({"body": {"img": "x", "topk": 1}}, {})


@pytest.mark.parametrize(
    ("body", "kind"), [([1, 2], "list"), (5, "int"), (b"[1, 2]", "list"), ("[]", "list")]
)
def test_non_dict_json(body, kind):
    with pytest.raises(InvalidInput, match=f"must be an object.*got {kind}") as info:
        extract_request({"body": body}, {})
    assert info.value.field == "body"


@pytest.mark.parametrize("image", ["abc$%^&", "a", "data:image/png,abc", "===="])
def test_invalid_base64(image):
    with pytest.raises(InvalidInput) as info:
        extract_request({"body": {"image": image}}, {})
    assert (info.value.field, info.value.status) == ("image", 400)
    assert "base64" in info.value.message or "empty" in info.value.message


def test_unknown_option_in_json(png):
    body = {"image": base64.b64encode(png).decode(), "top_k": 3}
    with pytest.raises(InvalidOption, match="unknown option 'top_k'.*topk, cam_classes") as info:
        extract_request({"body": body}, {})
    assert (info.value.field, info.value.status) == ("top_k", 400)


def test_unknown_option_in_multipart(png):
    with pytest.raises(InvalidOption, match="unknown option 'colour'") as info:
        extract_request({"image": png, "colour": b"red"}, {})
    assert info.value.field == "colour"


def test_unknown_headers_are_ignored(png):
    request = extract_request({"body": png}, {"top_k": "3", "X-Outputs": "map"})
    assert request.options == {}


def test_multipart_without_image():
    with pytest.raises(
        InvalidInput, match=r"no 'image' field \(fields received: topk, outputs\)"
    ) as info:
        extract_request({"topk": b"3", "outputs": b"map"}, {})
    assert (info.value.field, info.value.status) == ("image", 400)


def test_multipart_with_two_images(png):
    with pytest.raises(InvalidInput, match="several image fields") as info:
        extract_request({"image": png, "file": png}, {})
    assert info.value.field == "image"


def test_multipart_non_utf8_option(png):
    with pytest.raises(InvalidOption, match="not UTF-8") as info:
        extract_request({"image": png, "outputs": b"\xff\xfe"}, {})
    assert info.value.field == "outputs"


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
        decode_image(png, CodecLimits(max_pixels=47))
    assert decode_image(png, CodecLimits(max_pixels=48)).size == (8, 6)


def test_over_max_image_bytes(png):
    limit = len(png) - 1
    with pytest.raises(
        PayloadTooLarge, match=f"{len(png)} bytes, over the limit of {limit}"
    ) as info:
        decode_image(png, CodecLimits(max_image_bytes=limit))
    assert (info.value.field, info.value.status) == ("image", 413)
    assert decode_image(png, CodecLimits(max_image_bytes=len(png))).size == (8, 6)


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


# --- LabelIndex ------------------------------------------------------------------------------


def test_label_index_resolves_ids_and_synonyms(labels):
    assert labels.resolve("7") == 7
    assert labels.resolve(" 0 ") == 0
    assert labels.resolve("tabby") == 3
    assert labels.resolve("TABBY CAT") == 3
    assert labels.resolve("tabby,tabby   cat") == 3
    assert labels.resolve("Panthera tigris") == 9


def test_label_index_ambiguous(labels):
    with pytest.raises(InvalidOption, match="'crane' is ambiguous: it names classes 2, 5") as info:
        labels.resolve("crane")
    assert info.value.field == "cam_classes"


def test_label_index_unknown_suggests(labels):
    with pytest.raises(InvalidOption, match="unknown class name 'tabbby'; did you mean 'tabby'"):
        labels.resolve("tabbby")


@pytest.mark.parametrize("token", ["10", "-1", "99999999999999999999999"])
def test_label_index_id_out_of_range(labels, token):
    with pytest.raises(InvalidOption, match="out of range; ids go from 0 to 9") as info:
        labels.resolve(token)
    assert (info.value.field, info.value.status) == ("cam_classes", 400)


def test_label_index_without_names():
    index = LabelIndex(None, 4)
    assert index.resolve("3") == 3
    with pytest.raises(InvalidOption, match="no class names, ids go from 0 to 3"):
        index.resolve("cat")


def test_label_index_length_mismatch():
    with pytest.raises(ValueError, match="3 names but the model has 4 classes"):
        LabelIndex(["a", "b", "c"], 4)


# --- parse_options ---------------------------------------------------------------------------


def test_missing_options_keep_defaults(labels):
    defaults = Options(topk=2, cam_classes=CamSelection("none"), outputs=("overlay",))
    assert parse_options({}, defaults, labels, NUM_CLASSES, LIMITS) == defaults
    assert parse_options({"topk": None}, defaults, labels, NUM_CLASSES, LIMITS) == defaults
    parsed = parse_options({"topk": "4"}, defaults, labels, NUM_CLASSES, LIMITS)
    assert parsed == Options(4, CamSelection("none"), "gradcam", ("overlay",))


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("3", 3), (" 3 ", 3), ("10", 10)])
def test_topk_valid(value, expected):
    assert _parse({"topk": value}).topk == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (True, "must be an integer, got True"),
        (2.5, "must be an integer, got 2.5"),
        ("abc", "must be an integer, got 'abc'"),
        ("3.0", "must be an integer"),
        (0, "between 1 and 10, got 0"),
        ("-2", "between 1 and 10, got -2"),
        (11, "between 1 and 10, got 11"),
        ("1" * 40, "between 1 and 10"),
    ],
)
def test_topk_invalid(value, match):
    _rejects({"topk": value}, "topk", match)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("top1", CamSelection("top", 1)),
        (" TOP3 ", CamSelection("top", 3)),
        ("top5", CamSelection("top", 5)),
        ("none", CamSelection("none")),
        ("3", CamSelection("ids", class_ids=(3,))),
        ("3, 1,3", CamSelection("ids", class_ids=(3, 1))),
        (4, CamSelection("ids", class_ids=(4,))),
        ([0, "goldfish", "1"], CamSelection("ids", class_ids=(0, 1))),
        ("Tabby Cat", CamSelection("ids", class_ids=(3,))),
        ("tabby, tabby cat", CamSelection("ids", class_ids=(3,))),
        ("tabby, tabby cat, tiger cat", CamSelection("ids", class_ids=(3, 6))),
        ("Cardigan, Cardigan Welsh corgi", CamSelection("ids", class_ids=(7,))),
        ("Cardigan Welsh corgi, 0", CamSelection("ids", class_ids=(7, 0))),
        (["tench, Tinca tinca", 2], CamSelection("ids", class_ids=(0, 2))),
        ("0,0,0,0,0,0,1", CamSelection("ids", class_ids=(0, 1))),
    ],
)
def test_cam_classes_valid(value, expected):
    assert _parse({"cam_classes": value}).cam_classes == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("top6", "asks for 6 CAMs; at most 5 per request"),
        ("top0", r"topN needs N in 1\.\.10"),
        ("top11", r"topN needs N in 1\.\.10"),
        ("crane", "ambiguous: it names classes 2, 5"),
        ("cardigan", "ambiguous: it names classes 7, 8"),
        ("tabby, crane", "ambiguous"),
        ("tabbby", "did you mean 'tabby'"),
        ("10", "out of range; ids go from 0 to 9"),
        ([1, -1], "out of range"),
        ("0,1,2,3,4,6", "more than 5 classes"),
        ("", "empty"),
        ("   ", "empty"),
        ([], "empty"),
        ("1,,2", "empty class entry"),
        (True, "must be a string, id or list"),
        (2.0, "must be a string, id or list"),
        ([1, [2]], "entries must be ids or names"),
        (",".join(["1"] * 101), "101 entries, too many for 5 CAMs"),
        ([1] * 101, "101 entries"),
    ],
)
def test_cam_classes_invalid(value, match):
    _rejects({"cam_classes": value}, "cam_classes", match)


def test_cam_classes_max_cams_is_configurable(labels):
    assert _parse({"cam_classes": "top2"}, labels, max_cams=2).cam_classes.count == 2
    with pytest.raises(InvalidOption, match="at most 2 per request"):
        _parse({"cam_classes": "top3"}, labels, max_cams=2)
    with pytest.raises(InvalidOption, match="more than 2 classes"):
        _parse({"cam_classes": "0,1,2"}, labels, max_cams=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gradcam", "gradcam"),
        ("GradCAM++", "gradcam++"),
        ("gradcampp", "gradcam++"),
        (" LayerCAM ", "layercam"),
        ("HiResCAM", "hirescam"),
        ("xgradcam", "xgradcam"),
    ],
)
def test_cam_method_valid(value, expected):
    assert _parse({"cam_method": value}).cam_method == expected


@pytest.mark.parametrize("value", ["scorecam", "", 3, ["gradcam"]])
def test_cam_method_invalid(value):
    match = r"unknown cam_method .*use one of gradcam, gradcam\+\+, xgradcam, layercam, hirescam"
    _rejects({"cam_method": value}, "cam_method", match)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("overlay, MAP", ("map", "overlay")),
        (["heatmap", "map", "map"], ("map", "heatmap")),
        ("overlay,heatmap,map", ("map", "heatmap", "overlay")),
        (" Heatmap ", ("heatmap",)),
    ],
)
def test_outputs_valid(value, expected):
    assert _parse({"outputs": value}).outputs == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("map,blur", "unknown outputs 'blur'; allowed: map, heatmap, overlay"),
        (["map", 3], "unknown outputs '3'"),
        ("map,,overlay", "unknown outputs ''"),
        ("", "outputs is empty"),
        (" , ", "outputs is empty"),
        ([], "outputs is empty"),
        (5, "must be a string or list"),
    ],
)
def test_outputs_invalid(value, match):
    _rejects({"outputs": value}, "outputs", match)


def test_parse_options_unknown_name():
    _rejects({"colour": "red"}, "colour", "unknown option 'colour'")


def test_parse_options_from_extracted_headers(png, labels):
    headers = {"TopK": "2", "Cam_Classes": "tabby, tabby cat, 0", "Outputs": "overlay,map"}
    request = extract_request({"body": png}, headers)
    options = parse_options(request.options, Options(), labels, NUM_CLASSES, LIMITS)
    assert options == Options(
        2, CamSelection("ids", class_ids=(3, 0)), "gradcam", ("map", "overlay")
    )


# --- parse_defaults --------------------------------------------------------------------------


def test_parse_defaults_missing_keys(labels):
    assert parse_defaults({}, labels, NUM_CLASSES, LIMITS) == Options()
    assert parse_defaults({"batch_size": 8}, labels, NUM_CLASSES, LIMITS) == Options()


def test_parse_defaults_caps_topk_for_small_models():
    assert parse_defaults({}, LabelIndex(None, 3), 3, LIMITS).topk == 3


def test_parse_defaults_values(labels):
    config = {"topk": "3", "cam_classes": "top2", "cam_method": "XGradCAM", "outputs": ["overlay"]}
    expected = Options(3, CamSelection("top", 2), "xgradcam", ("overlay",))
    assert parse_defaults(config, labels, NUM_CLASSES, LIMITS) == expected


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"topk": 0}, "handler config key 'topk': topk must be between 1 and 10"),
        ({"cam_classes": "crane"}, "handler config key 'cam_classes': .*ambiguous"),
        ({"cam_method": "scorecam"}, "handler config key 'cam_method'"),
        ({"outputs": "blur"}, "handler config key 'outputs'"),
    ],
)
def test_parse_defaults_rejects_bad_config(labels, config, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_defaults(config, labels, NUM_CLASSES, LIMITS)
    assert not isinstance(info.value, InvalidOption)
