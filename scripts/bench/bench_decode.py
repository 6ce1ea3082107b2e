#!/usr/bin/env python3
"""What decoding a batch costs the worker: full decode vs the scale needed, serial vs threads.

For each photo kind (web-sized JPEG, 12 MP baseline and progressive camera JPEGs from
devkit/camera_photos.py, a PNG) and each way of decoding, times the handler's decode step for a
batch (``ImageDecoder.decode`` into pixels that cover a 224x224 model input, plus ``model_batch``
resizing them to it), in alternating rounds so machine drift hits every row alike. The median
batch time gives images/s. Prints a table and writes bench_results/bench_decode.json.

  .venv/bin/python scripts/bench/bench_decode.py                      # batch 8, threads 0 2 4
  .venv/bin/python scripts/bench/bench_decode.py --batch 16 --threads 0 2 --rounds 9
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

from devkit.camera_photos import camera_set  # noqa: E402
from handler.image_tensors import model_batch  # noqa: E402
from handler.images import ImageDecoder, InputLayout, open_image  # noqa: E402
from handler.limits import RequestLimits  # noqa: E402

LIMITS = RequestLimits()
LAYOUT = InputLayout((224, 224))


def photos() -> dict[str, bytes]:
    files = camera_set(quiet=False)
    png = io.BytesIO()
    Image.open(files["small"]).resize((1600, 800)).save(png, format="PNG")
    return {
        "640x320 JPEG": files["small"].read_bytes(),
        "4032x2016 baseline JPEG": files["camera"].read_bytes(),
        "4032x2016 progressive JPEG": files["camera_progressive"].read_bytes(),
        "4032x2016 JPEG, EXIF-rotated": files["camera_rotated"].read_bytes(),
        "1600x800 PNG": png.getvalue(),
    }


def batch_seconds(decoder: ImageDecoder, data: bytes, batch: int, scaled: bool) -> float:
    start = time.perf_counter()
    sources = [open_image(data, LIMITS) for _ in range(batch)]
    needs = [(224, 224) if scaled else None] * batch
    decoded = decoder.decode(sources, needs)
    model_batch(decoded, LAYOUT, torch.device("cpu"))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, nargs="+", default=[0, 2, 4], help="decode_threads values (0 = serial)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "bench_decode.json")
    args = p.parse_args(argv)

    images = photos()
    ways = [("full decode, serial", 0, False)] + [
        (f"scale needed, {'serial' if t < 2 else f'{t} threads'}", t, True) for t in args.threads]
    decoders = {t: ImageDecoder(t) for t in {w[1] for w in ways}}
    times: dict[tuple[str, str], list[float]] = {(k, w[0]): [] for k in images for w in ways}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        print(f"[bench-decode] round {rnd}/{args.rounds}", file=sys.stderr, flush=True)
        for kind, data in images.items():
            for label, threads, scaled in ways:
                seconds = batch_seconds(decoders[threads], data, args.batch, scaled)
                if rnd:
                    times[(kind, label)].append(seconds)
    for decoder in decoders.values():
        decoder.close()

    rows = []
    for kind in images:
        base = statistics.median(times[(kind, ways[0][0])])
        serial = statistics.median(times[(kind, ways[1][0])])
        for label, threads, scaled in ways:
            med = statistics.median(times[(kind, label)])
            rows.append({"photo": kind, "bytes": len(images[kind]), "way": label, "threads": threads,
                         "scaled": scaled, "batch_ms": round(med * 1e3, 2),
                         "images_per_s": round(args.batch / med, 1),
                         "vs_full_decode": round(base / med, 2), "vs_serial_scaled": round(serial / med, 2)})
    summary = {"batch": args.batch, "rounds": args.rounds, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    print(f"\nbatch {args.batch}, median of {args.rounds} rounds, {os.cpu_count()} CPUs "
          "(decode + resize to 224x224, as the worker does)\n")
    print("| photo | way | ms per batch | images/s | vs full decode | vs serial |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['photo']} | {r['way']} | {r['batch_ms']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['vs_full_decode']:.2f}x | {r['vs_serial_scaled']:.2f}x |")
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
