#!/usr/bin/env python3
"""Camera-sized photos made from the test photos, for load tests, benchmarks and tests.

Phones and cameras send 8-12 megapixel JPEGs; the photos in tests/data are web-sized. This makes
camera versions of one of them: the scene cropped to the camera's aspect, upscaled to camera size
with a little seeded sensor noise (so the file is as large and as slow to decode as a camera's,
about 2 MB at 4032x2016), and the same scene at web size:

  small.jpg               640x320 baseline JPEG (the web-sized photo)
  camera.jpg              4032x2016 baseline JPEG
  camera_progressive.jpg  the same pixels, progressive JPEG
  camera_rotated.jpg      the same photo stored rotated, EXIF orientation 6 (displayed upright)
  camera_cmyk.jpg         the same pixels as a CMYK JPEG
  camera_43.jpg           4032x3024 baseline JPEG (4:3)

The set is written once into a cache folder (default bench_results/camera/, not committed) and
reused while the sources and this script's version are unchanged.

  .venv/bin/python devkit/camera_photos.py            # prints the files, generating them if needed
  .venv/bin/python devkit/camera_photos.py --source coffee.jpg --out /tmp/camera
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
_VERSION = 1  # bump when the recipe changes: cached sets are then made again
NAMES = ("small", "camera", "camera_progressive", "camera_rotated", "camera_cmyk", "camera_43")


def _crop(image: Image.Image, aspect: float) -> Image.Image:
    """The centre of ``image`` at ``aspect`` (width / height)."""
    w, h = image.size
    if w / h > aspect:
        cw = round(h * aspect)
        return image.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    ch = round(w / aspect)
    return image.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))


def camera_pixels(source: Image.Image, size: tuple[int, int], noise: float = 4.0, seed: int = 0) -> Image.Image:
    """``source`` cropped to the aspect of ``size``, upscaled to it, with Gaussian sensor noise."""
    scene = _crop(source.convert("RGB"), size[0] / size[1]).resize(size, Image.Resampling.BICUBIC)
    grain = np.random.default_rng(seed).normal(0.0, noise, (size[1], size[0], 1)).astype(np.float32)
    pixels = np.clip(np.asarray(scene, dtype=np.float32) + grain, 0, 255)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 92, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, **save)
    return buf.getvalue()


def rotated_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    """``image`` stored turned 90 degrees anticlockwise, with EXIF orientation 6 (rotate 90
    clockwise to display): viewers, and the server, show it as ``image``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(image.transpose(Image.Transpose.ROTATE_90), quality, exif=exif)


def make(source: Path) -> dict[str, bytes]:
    """The set's encoded files, by name (without .jpg)."""
    photo = Image.open(source).convert("RGB")
    camera = camera_pixels(photo, (4032, 2016))
    return {
        "small": jpeg(_crop(photo, 2.0).resize((640, 320), Image.Resampling.LANCZOS), 90),
        "camera": jpeg(camera),
        "camera_progressive": jpeg(camera, progressive=True),
        "camera_rotated": rotated_jpeg(camera),
        "camera_cmyk": jpeg(camera.convert("CMYK")),
        "camera_43": jpeg(camera_pixels(photo, (4032, 3024), seed=1)),
    }


def camera_set(out: Path | None = None, source: str = "chelsea.jpg", quiet: bool = True) -> dict[str, Path]:
    """Paths of the set made from ``tests/data/<source>``, generated into ``out`` if missing.

    Returns:
        name -> path, for every name in :data:`NAMES`.
    """
    src = DATA / source if not Path(source).is_absolute() else Path(source)
    key = hashlib.sha256(src.read_bytes() + str(_VERSION).encode()).hexdigest()[:12]
    out = Path(out) if out is not None else ROOT / "bench_results" / "camera" / f"{src.stem}-{key}"
    paths = {name: out / f"{name}.jpg" for name in NAMES}
    stamp = out / "set.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key and all(p.exists() for p in paths.values()):
        return paths
    if not quiet:
        print(f"[camera] making camera photos from {src.name} in {out} ...", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in make(src).items():
        paths[name].write_bytes(data)
    stamp.write_text(json.dumps({"key": key, "source": src.name,
                                 "files": {n: paths[n].stat().st_size for n in NAMES}}, indent=2))
    return paths


def load_test_photos() -> list[Path]:
    """The camera photos a load test cycles through: 12 MP baseline, progressive, EXIF-rotated
    and 4:3 JPEGs of the default set."""
    paths = camera_set(quiet=False)
    return [paths[name] for name in ("camera", "camera_progressive", "camera_rotated", "camera_43")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="chelsea.jpg", help="a photo in tests/data, or a path")
    p.add_argument("--out", type=Path, default=None, help="folder (default: bench_results/camera/<photo>-<key>)")
    args = p.parse_args(argv)
    for name, path in camera_set(args.out, args.source, quiet=False).items():
        with Image.open(path) as image:
            kind = "progressive" if image.info.get("progressive") else "baseline"
            print(f"{name:20s} {image.size[0]}x{image.size[1]} {image.mode} {kind:11s} "
                  f"{path.stat().st_size / 1e6:5.2f} MB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
