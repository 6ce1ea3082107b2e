#!/usr/bin/env python3
"""The handler in-process on a CUDA worker: decode + pass + render throughput, GPU decode route
against the CPU route, and the nvJPEG decoders and encoders side by side.

Three parts, each printed as a table and written to one JSON file:

1. handler: ``GradCamHandler.handle`` on batches of 8, 32 and 64 requests (the default model
   with random weights, 224x224), web-sized (640x320) and 12 MP camera JPEGs
   (devkit/camera_photos.py), ``outputs=map`` and ``map,overlay``, with ``decode_device`` and
   ``encode_device`` set to ``cpu`` and to ``cuda``: images/s, median of the rounds.
2. decode: one batch of camera JPEGs decoded to device tensors by torchvision's
   ``decode_jpeg(device="cuda")``, by TorchCodec's (when it imports), and by Pillow at the DCT
   scale needed on CPU threads.
3. encode: overlay-sized JPEGs encoded by nvJPEG (torchvision) and by Pillow.

Needs a CUDA device (it exits 2 without one unless --allow-cpu, which checks the script).
scripts/ops/gpu_check.sh runs it on a lent GPU machine.

With ``--compile-mode default`` or ``reduce-overhead`` the handler part alone runs, on the GPU
routes, with the served model compiled as an archive with ``--compile on --compile-mode M``
configures it (every bucket up to the largest of ``--batches`` compiled in ``initialize``): the
served configuration docs/performance.md recommends for GPU workers, in process.

  python scripts/bench/bench_gpu_decode.py --json-out bench_results/gpu/bench_gpu_decode.json
  python scripts/bench/bench_gpu_decode.py --compile-mode reduce-overhead --batches 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

from devkit.camera_photos import camera_set  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision.io's image codecs


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_rate(fn, items: int, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return items / statistics.median(times)


def make_handler(model_dir: Path, device: str, batch_size: int = 64, **handler):
    from ts.context import Context

    from handler.service import GradCamHandler

    config = {"batchSize": batch_size, "handler": {"model": "timm:tf_efficientnet_lite0", "num_classes": 1000,
                                           "labels": "", "target_layer": "auto", "mean": [0.5] * 3,
                                           "std": [0.5] * 3, **handler}}
    manifest = {"model": {"modelName": "lite0", "serializedFile": "model.safetensors"}}
    gpu = 0 if device == "cuda" else None
    context = Context("lite0", str(model_dir), manifest, batch_size, gpu, "0.12.0", model_yaml_config=config)
    service = GradCamHandler()
    service.initialize(context)
    return service, context


def handler_rows(args, photos: dict[str, bytes], model_dir: Path) -> list[dict]:
    from ts.context import RequestProcessor

    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    routes = [("cpu", "cpu")] + ([("cuda", "cuda")] if device == "cuda" else [])
    compiled = {}
    if args.compile_mode != "off":
        routes = routes[-1:]  # the GPU routes (the CPU's where there is no GPU: a check only)
        compiled = {"compile": "on", "compile_mode": "" if args.compile_mode == "default" else args.compile_mode}
    for decode_device, encode_device in routes:
        try:
            started = time.perf_counter()
            service, context = make_handler(model_dir, device, max(args.batches), decode_device=decode_device,
                                            encode_device=encode_device, decode_threads=args.threads, **compiled)
            print(f"[bench-gpu] handler ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        except ValueError as exc:  # nvJPEG missing: say so and measure the rest
            rows.append({"part": "handler", "decode_device": decode_device, "error": str(exc)})
            print(f"[bench-gpu] {rows[-1]}", file=sys.stderr, flush=True)
            continue
        for kind, data in photos.items():
            for outputs in ("map", "map,overlay"):
                for batch in args.batches:
                    items = [{"image": data, "outputs": outputs} for _ in range(batch)]
                    context.request_processor = [RequestProcessor({}) for _ in items]

                    def run(items=items, service=service, context=context):
                        out = service.handle(items, context)
                        assert all(context.get_response_status(i)[0] == 200 for i in range(len(out)))

                    rate = _median_rate(run, batch, args.rounds)
                    row = {"part": "handler", "photo": kind, "outputs": outputs, "batch": batch,
                           "decode_device": decode_device, "encode_device": encode_device,
                           "compile_mode": args.compile_mode, "images_per_s": round(rate, 1)}
                    rows.append(row)
                    print(f"[bench-gpu] {row}", file=sys.stderr, flush=True)
        service.pipeline.decoder.close()
    return rows


def decode_rows(args, camera: bytes) -> list[dict]:
    from handler.image_tensors import DeviceJpegRoute
    from handler.images import ImageDecoder, open_image
    from handler.limits import RequestLimits

    batch = max(args.batches)
    rows = []
    tensors = [torch.frombuffer(bytearray(camera), dtype=torch.uint8) for _ in range(batch)]
    candidates = {}
    decoder = ImageDecoder(args.threads)
    candidates["Pillow, scale needed, CPU threads"] = lambda: decoder.decode(
        [open_image(camera, RequestLimits()) for _ in range(batch)], [(224, 224)] * batch)
    if torch.cuda.is_available():
        from torchvision.io import ImageReadMode, decode_jpeg

        candidates["torchvision decode_jpeg (nvJPEG)"] = lambda: decode_jpeg(
            tensors, mode=ImageReadMode.RGB, device="cuda")
        route = DeviceJpegRoute("cuda")
        candidates["handler device route (nvJPEG + reduce)"] = lambda: route.decode(
            [open_image(camera, RequestLimits()) for _ in range(batch)], [(224, 224)] * batch)
        try:
            from torchcodec.decoders import decode_jpeg as codec_decode

            candidates["torchcodec decode_jpeg (nvJPEG)"] = lambda: codec_decode(tensors, device="cuda")
        except Exception as exc:  # not installed, or built for another torch
            rows.append({"part": "decode", "way": "torchcodec decode_jpeg (nvJPEG)",
                         "error": f"{type(exc).__name__}: {exc}"})
    for way, fn in candidates.items():
        try:
            rate = _median_rate(fn, batch, args.rounds)
            rows.append({"part": "decode", "way": way, "batch": batch, "images_per_s": round(rate, 1)})
        except Exception as exc:
            rows.append({"part": "decode", "way": way, "error": f"{type(exc).__name__}: {exc}"})
        print(f"[bench-gpu] {rows[-1]}", file=sys.stderr, flush=True)
    decoder.close()
    return rows


def encode_rows(args, small: bytes) -> list[dict]:
    from handler.render import jpeg_base64

    batch = max(args.batches)
    image = Image.open(io.BytesIO(small)).convert("RGB").resize((512, 256))
    host = torch.from_numpy(__import__("numpy").asarray(image).copy())
    rows = []
    candidates = {"Pillow (CPU)": lambda: [jpeg_base64(host.numpy(), 85) for _ in range(batch)]}
    if torch.cuda.is_available():
        from handler.render import DeviceJpegEncoder

        encoder = DeviceJpegEncoder("cuda")
        on_device = [host.cuda() for _ in range(batch)]
        candidates["nvJPEG (torchvision), bytes to host"] = lambda: [t.cpu() for t in encoder.encode(on_device, 85)]
    for way, fn in candidates.items():
        rate = _median_rate(fn, batch, args.rounds)
        rows.append({"part": "encode", "way": way, "size": "512x256", "batch": batch, "images_per_s": round(rate, 1)})
        print(f"[bench-gpu] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _print_compiled(rows: list[dict], mode: str) -> None:
    print("| photo | outputs | batch | decode + encode | compile mode | img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" not in r:
            print(f"| {r['photo']} | {r['outputs']} | {r['batch']} | {r['decode_device']} | {mode} | "
                  f"{r['images_per_s']} |")


def _print_routes(rows: list[dict]) -> None:
    """The GPU route against the CPU route per photo, outputs and batch; then the decoders and encoders."""
    print("| photo | outputs | batch | CPU decode + encode img/s | GPU decode + encode img/s | GPU / CPU |")
    print("| --- | --- | --- | --- | --- | --- |")
    handler = [r for r in rows if r["part"] == "handler" and "error" not in r]
    for r in handler:
        if r["decode_device"] != "cpu":
            continue
        gpu = next((g for g in handler if g["decode_device"] == "cuda" and
                    (g["photo"], g["outputs"], g["batch"]) == (r["photo"], r["outputs"], r["batch"])), None)
        ratio = f"{gpu['images_per_s'] / r['images_per_s']:.2f}x" if gpu else "-"
        print(f"| {r['photo']} | {r['outputs']} | {r['batch']} | {r['images_per_s']} | "
              f"{gpu['images_per_s'] if gpu else '-'} | {ratio} |")
    print("\n| part | way | images/s |")
    print("| --- | --- | --- |")
    for r in rows:
        if r["part"] != "handler" or "error" in r:
            print(f"| {r['part']} | {r.get('way', r.get('decode_device'))} | {r.get('images_per_s', r.get('error'))} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="CPU route decode_threads")
    p.add_argument("--compile-mode", choices=["off", "default", "reduce-overhead"], default="off",
                   help="serve the model compiled in this torch.compile mode (handler part only, GPU routes)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (checks the script only)")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "bench_gpu_decode.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: nothing to measure (pass --allow-cpu to check the script)", file=sys.stderr)
        return 2

    files = camera_set(quiet=False)
    photos = {"640x320 JPEG": files["small"].read_bytes(), "4032x2016 baseline JPEG": files["camera"].read_bytes()}
    import timm
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model_dir = Path(tmp)
        torch.manual_seed(0)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_dir / "model.safetensors"))
        rows = handler_rows(args, photos, model_dir)
    if args.compile_mode == "off":
        rows += decode_rows(args, photos["4032x2016 baseline JPEG"])
        rows += encode_rows(args, photos["640x320 JPEG"])

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = {"device": device, "torch": torch.__version__, "cpus": os.cpu_count(), "rounds": args.rounds,
               "cpu_decode_threads": args.threads, "compile_mode": args.compile_mode, "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    print(f"\n{device}, torch {torch.__version__}, {os.cpu_count()} CPUs, median of {args.rounds} rounds\n")
    if args.compile_mode == "off":
        _print_routes(rows)
    else:
        _print_compiled(rows, args.compile_mode)
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
