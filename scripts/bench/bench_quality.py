#!/usr/bin/env python3
"""What ``quality=true`` costs: a batch of requests with the faithfulness score against the same
batch without it, side by side in one run.

The default archive (built here by the archiver, eager, into bench_results/quality/), in-process
through the pipeline both servers call (:class:`handler.pipeline.Pipeline`: header walk, decode,
the Grad-CAM pass, rendering, the JSON answers), a batch of ``--batch`` requests (the test photos
in turn, ``cam_classes=top1&outputs=map``). Rounds alternate quality off and on, so machine drift
hits both alike; each round times ``--iters`` batches. With ``--channels-last off,on`` each layout
gets its own archive and its own pair of rows. Each round also times the model's forward alone
on a batch of the requests' size: scoring full-size variants of each map costs at least that
once per variant, so the table gives the floor of on/off for two variants a map (what the score
is: region kept, region removed) and for one. Prints a markdown table and writes
bench_results/bench_quality.json (machine, commit, command, every round).

  .venv/bin/python scripts/bench/bench_quality.py
  .venv/bin/python scripts/bench/bench_quality.py --rounds 6 --iters 5 --channels-last off,on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from devkit.tslocal import ROOT
from handler.cam import eager_module
from handler.pipeline import Archive, Pipeline, unpack_archive
from handler.requests import RawRequest

MODEL = "efficientnet_lite0"
PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")
TARGET = 1.35  # the ceiling: a request with quality on costs at most this times one without


def build(store: Path, channels_last: str, fraction: float) -> Path:
    """The default archive (eager; ``channels_last`` as asked), built by this tree's archiver."""
    name = f"lite0_cl_{channels_last}"
    mar = store / f"{name}.mar"
    subprocess.run([sys.executable, "-m", "handler.tools.archive", "-q", "--force", "--name", name,
                    "--export-path", str(store), "--compile", "off", "--channels-last", channels_last,
                    "--quality-fraction", str(fraction)], check=True, cwd=ROOT)
    return mar


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_batches(pipeline: Pipeline, images: list[bytes], quality: bool, iters: int) -> float:
    """Milliseconds per batch, the mean of ``iters`` batches (every answer checked)."""
    requests = lambda: [RawRequest(b, {"quality": quality}, "json") for b in images]  # noqa: E731
    started = time.perf_counter()
    for _ in range(iters):
        answers = pipeline.run(requests())
        if any(a.status != 200 for a in answers) or quality != ('"quality"' in answers[0].text):
            raise RuntimeError(f"unexpected answer: {answers[0].status} {answers[0].text[:200]}")
    return (time.perf_counter() - started) / iters * 1e3


def time_forward(pipeline: Pipeline, batch: int, iters: int) -> float:
    """Milliseconds of the served model's forward alone (no gradient, as the scoring pass runs
    it) on a batch of the requests' size, the mean of ``iters``."""
    engine = pipeline.engine
    x = torch.randn((batch, 3, *engine.input_size), generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=engine.memory_format)
    model = eager_module(engine.model)
    with torch.inference_mode():
        model(x)
        started = time.perf_counter()
        for _ in range(iters):
            model(x)
    return (time.perf_counter() - started) / iters * 1e3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=6, help="off/on round pairs, alternating")
    parser.add_argument("--iters", type=int, default=4, help="batches timed per round")
    parser.add_argument("--channels-last", default="off", help="comma list of off, on: an archive each")
    parser.add_argument("--fraction", type=float, default=0.4, help="the archives' --quality-fraction")
    parser.add_argument("--store", default=str(ROOT / "bench_results" / "quality"), help="where archives go")
    parser.add_argument("--json-out", default=str(ROOT / "bench_results" / "bench_quality.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    photos = [(ROOT / "tests" / "data" / name).read_bytes() for name in PHOTOS]
    images = [photos[i % len(photos)] for i in range(args.batch)]
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "commit": _commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "batch": args.batch, "rounds": args.rounds, "iters": args.iters, "fraction": args.fraction,
        "requests": "test photos in turn, cam_classes=top1, outputs=map, in-process Pipeline.run",
    }
    rows = []
    for channels_last in [v.strip() for v in args.channels_last.split(",") if v.strip()]:
        mar = build(store, channels_last, args.fraction)
        pipeline = Pipeline(Archive.from_dir(unpack_archive(mar, store)), "cpu")
        time_batches(pipeline, images, True, 1)  # warm both paths
        time_batches(pipeline, images, False, 1)
        off, on, forward = [], [], []
        for _ in range(args.rounds):
            off.append(time_batches(pipeline, images, False, args.iters))
            on.append(time_batches(pipeline, images, True, args.iters))
            forward.append(time_forward(pipeline, args.batch, args.iters))
        ratios = [b / a for a, b in zip(off, on)]
        # What any scoring of full-size variants costs at least: k forwards of the batch's size
        # per batch (k variants per map), beside a request that itself costs `off`.
        floors = {k: [1 + k * f / a for a, f in zip(off, forward)] for k in (1, 2)}
        rows.append({"channels_last": channels_last, "off_ms": off, "on_ms": on, "ratios": ratios,
                     "forward_ms": forward, "off_median_ms": statistics.median(off),
                     "on_median_ms": statistics.median(on), "ratio_median": statistics.median(ratios),
                     "forward_median_ms": statistics.median(forward),
                     "floor_two_variants": statistics.median(floors[2]),
                     "floor_one_variant": statistics.median(floors[1])})
    print(f"\nquality on vs off, batch {args.batch}; {meta['machine']}; commit {meta['commit']}\n")
    print("| archive | quality off ms/batch | quality on ms/batch | on/off (median of rounds) | "
          f"target <= {TARGET}x | the model's forward of the batch, ms | floor, 2 variants a map | "
          "floor, 1 variant a map |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        verdict = "met" if row["ratio_median"] <= TARGET else "missed"
        print(f"| lite0, channels_last {row['channels_last']} | {row['off_median_ms']:.0f} | "
              f"{row['on_median_ms']:.0f} | {row['ratio_median']:.2f}x | {verdict} | "
              f"{row['forward_median_ms']:.0f} | {row['floor_two_variants']:.2f}x | {row['floor_one_variant']:.2f}x |")
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "target": TARGET, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
