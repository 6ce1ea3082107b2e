"""The hostile and odd-but-valid input corpus, generated in memory from the real test photos.

Each case is the ``requests`` arguments of one call plus what the server must answer. Used by
tests/test_hardening.py and by scripts/load/soak.py.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CAT_CLASSES = frozenset(range(281, 286))


@dataclass
class Case:
    """One request: ``kwargs`` for requests.post, the status it must get, and what to check."""

    name: str
    kwargs: dict
    status: int
    field: str | None = None  # the JSON error's field, for 4xx answered by the handler
    cat: bool = False  # a 200 whose top-1 must be a cat class
    image_size: tuple[int, int] | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def _photo(name: str = "chelsea.jpg") -> Image.Image:
    return Image.open(DATA / name).convert("RGB")


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _form(data: bytes, **fields) -> dict:
    return {"files": {"image": ("image", data)}, "data": fields}


def decompression_bomb(side: int = 12000) -> bytes:
    """A PNG of a few KB that decodes to side x side (144 megapixels at 12000) grey pixels."""
    raw_row = b"\x00" + b"\x00" * side  # filter byte + one 8-bit grey pixel per column
    idat = zlib.compress(raw_row * side, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """Chelsea stored rotated by 90 degrees with EXIF orientation 6, so viewers show it upright."""
    stored = _photo().transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    return _encode(stored, "JPEG", quality=90, exif=exif)


def animated_gif() -> bytes:
    frames = [_photo(), _photo("coffee.jpg").resize((451, 300))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def sixteen_bit_png() -> bytes:
    grey = np.asarray(_photo().convert("L"), dtype=np.uint16) * 257
    return _encode(Image.fromarray(grey), "PNG")


def bad_cases(max_request_size: int) -> list[Case]:
    jpeg = (DATA / "chelsea.jpg").read_bytes()
    png = _encode(_photo(), "PNG")
    corrupted = bytearray(png)
    idat = corrupted.find(b"IDAT")
    corrupted[idat + 100 : idat + 400] = bytes(300)  # zeroed compressed data: the CRC and inflate fail
    b64 = base64.b64encode(jpeg).decode()
    return [
        Case("empty body", {"data": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "body"),
        Case("text body", {"data": "hello, server", "headers": {"Content-Type": "text/plain"}}, 400, "body"),
        Case("json image not a string", {"json": {"image": 123}}, 400, "image"),
        Case("json topk not a number", {"json": {"image": b64, "topk": "three"}}, 400, "topk"),
        Case("json topk a list", {"json": {"image": b64, "topk": [1]}}, 400, "topk"),
        Case("json array body", {"json": [b64]}, 400, "body"),
        Case("invalid base64", {"json": {"image": "@@@not*base64@@@"}}, 400, "image"),
        Case("truncated jpeg", _form(jpeg[: len(jpeg) // 2]), 400, "image"),
        Case("corrupted png", _form(bytes(corrupted)), 400, "image"),
        Case("decompression bomb", _form(decompression_bomb()), 413, "image"),
        Case("not an image", _form(b"GIF89a but not really" * 10), 415, "image"),
        Case("unknown option", _form(jpeg, colour="red"), 400, "colour"),
        Case("unknown json key", {"json": {"image": b64, "top_k": 3}}, 400, "top_k"),
        Case("topk zero", _form(jpeg, topk="0"), 400, "topk"),
        Case("topk negative", _form(jpeg, topk="-3"), 400, "topk"),
        Case("topk huge", _form(jpeg, topk="100000000000000000000"), 400, "topk"),
        Case("topk not a number", _form(jpeg, topk="five"), 400, "topk"),
        Case("class id out of range", _form(jpeg, cam_classes="1000"), 400, "cam_classes"),
        Case("unknown label", _form(jpeg, cam_classes="unicorn"), 400, "cam_classes"),
        Case("too many cam classes", _form(jpeg, cam_classes="top50"), 400, "cam_classes"),
        Case("unknown output form", _form(jpeg, outputs="map,video"), 400, "outputs"),
        Case("unknown cam method", _form(jpeg, cam_method="scorecam"), 400, "cam_method"),
        # Refused by TorchServe's frontend before the handler sees it (no JSON error of ours).
        Case("body over max_request_size", {"data": b"\xff" * (max_request_size + 1024),
                                            "headers": {"Content-Type": "image/jpeg"}}, 413),
    ]


def odd_cases() -> list[Case]:
    photo = _photo()
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    return [
        Case("1x1", _form(_encode(Image.new("RGB", (1, 1), (90, 60, 30)), "PNG")), 200, image_size=(1, 1)),
        Case("1x5000", _form(_encode(Image.new("RGB", (1, 5000), (10, 200, 10)), "PNG")), 200,
             image_size=(1, 5000)),
        Case("5000x1", _form(_encode(Image.new("L", (5000, 1), 128), "PNG"), outputs="map,heatmap,overlay"),
             200, image_size=(5000, 1)),
        Case("grayscale", _form(_encode(photo.convert("L"), "JPEG")), 200, cat=True, image_size=(451, 300)),
        Case("rgba", _form(_encode(rgba, "PNG")), 200, cat=True, image_size=(451, 300)),
        Case("palette", _form(_encode(photo.quantize(256), "PNG")), 200, cat=True, image_size=(451, 300)),
        Case("cmyk jpeg", _form(_encode(photo.convert("CMYK"), "JPEG", quality=90)), 200, cat=True,
             image_size=(451, 300)),
        Case("16-bit png", _form(sixteen_bit_png()), 200, cat=True, image_size=(451, 300)),
        Case("animated gif", _form(animated_gif()), 200, cat=True, image_size=(451, 300)),
        Case("exif rotated jpeg", _form(exif_rotated_jpeg(), outputs="map,heatmap"), 200, cat=True,
             image_size=(451, 300)),
        Case("webp", _form(_encode(photo, "WEBP", quality=90)), 200, cat=True, image_size=(451, 300)),
        Case("json with data url", {"json": {"image": "data:image/jpeg;base64,"
                                             + base64.b64encode(_encode(photo, "JPEG")).decode()}},
             200, cat=True, image_size=(451, 300)),
        Case("raw with header options", {"data": _encode(photo, "JPEG"),
                                         "headers": {"Content-Type": "image/jpeg", "topk": "2"}},
             200, cat=True, image_size=(451, 300), extra={"topk": 2}),
    ]


def good_request() -> dict:
    return _form((DATA / "chelsea.jpg").read_bytes())


def describe(case: Case) -> str:
    return json.dumps({"case": case.name, "status": case.status, "field": case.field})
