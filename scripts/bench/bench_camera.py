#!/usr/bin/env python3
"""Camera photos under load: a 12 MP JPEG against the same scene at web size, on a real server.

One private TorchServe serving the default archive, 8 concurrent clients (locust, through
scripts/load/loadtest.py), ``cam_classes=top1&outputs=map``, one photo per row, rows alternating round
by round so machine drift hits every row alike:

  - 640x320 JPEG (the web-sized photo)
  - 4032x2016 baseline JPEG (about 2 MB, the same scene with sensor-like noise)
  - the same, progressive JPEG

(photos from devkit/camera_photos.py), sent as multipart form uploads, or with ``--bodies raw``
as raw request bodies with the options as headers (``--bodies multipart,raw``: a table group
each). With ``--compare-ref REF`` the same rows also run against an archive built from the
handler at git revision REF (for example the commit before a change), served by a second
server, in the same alternation. Prints the table and writes
bench_results/bench_camera.json: req/s and its ratio to the small photo's, and the server's CPU
time per answered request (frontend and worker processes, from /proc), whose inverse ratio is what
the req/s ratio becomes when the server has the cores to itself: on a machine shared with other
work, req/s follows what the others leave, CPU time per request much less so.

  .venv/bin/python scripts/bench/bench_camera.py --duration 30 --rounds 2
  .venv/bin/python scripts/bench/bench_camera.py --bodies multipart,raw   # form uploads against raw bodies (curl -T)
  .venv/bin/python scripts/bench/bench_camera.py --compare-ref HEAD    # your working tree vs the last commit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # noqa: E402

from devkit import loadtest  # noqa: E402
from devkit.camera_photos import camera_set  # noqa: E402
from devkit.tslocal import ROOT, LocalServer, default_mar  # noqa: E402

MODEL = "efficientnet_lite0"
ROWS = [  # (label, file in the camera set)
    ("640x320 JPEG", "small"),
    ("4032x2016 baseline JPEG", "camera"),
    ("4032x2016 progressive JPEG", "camera_progressive"),
]
TARGETS = {"camera": 0.5, "camera_progressive": 0.2}  # the floors, as a fraction of the small photo's


def archive_at(ref: str, work: Path) -> Path:
    """The default archive built by the archiver and handler of git revision ``ref``."""
    tree = work / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    store = work / "store"
    archiver = next(p for p in (tree / "handler" / "tools" / "archive.py", tree / "scripts" / "archive.py")
                    if p.exists())  # where that revision keeps it
    module = ["-m", "handler.tools.archive"] if archiver.parent.name == "tools" else [str(archiver)]
    subprocess.run([sys.executable, *module, "-q", "--force", "--export-path", str(store)], check=True,
                   cwd=tree)
    return store / f"{MODEL}.mar"


def server_cpu_seconds(server: LocalServer) -> tuple[float, float]:
    """CPU time (user + system) of the server's processes so far: all of them (frontend and
    workers), and the model workers alone."""
    root = psutil.Process(server.proc.pid)
    total = worker = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
            if any("model_service_worker" in part for part in proc.cmdline()):
                worker += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total, worker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=30, help="seconds per row per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-u", "--users", type=int, default=8)
    p.add_argument("--compare-ref", default=None, metavar="REF",
                   help="also measure the handler of this git revision (e.g. HEAD), side by side")
    p.add_argument("--bodies", default="multipart",
                   help="comma list of request bodies to measure, each photo under each: multipart (the image "
                        "as a form field) and/or raw (the image as the body, options as headers; curl -T) "
                        "(default: %(default)s)")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "bench_camera.json")
    args = p.parse_args(argv)
    bodies = [b.strip() for b in args.bodies.split(",") if b.strip()]
    if not bodies or set(bodies) - {"multipart", "raw"}:
        p.error(f"--bodies: a comma list of multipart and raw, got {args.bodies!r}")

    def group_name(handler: str, body: str) -> str:  # one table group per handler and request body
        return handler if len(bodies) == 1 else f"{handler}, {body} body"

    photos = camera_set(quiet=False)
    ours = default_mar()
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-camera-") as tmp:
        tmp = Path(tmp)
        stores = {"this tree": ours}
        if args.compare_ref:
            print(f"[camera] building the default archive at {args.compare_ref} ...", flush=True)
            stores[args.compare_ref] = archive_at(args.compare_ref, tmp / "ref")
        servers = {}
        groups = [(name, body) for name in stores for body in bodies]
        try:
            for n, (name, mar) in enumerate(stores.items()):
                servers[name] = LocalServer(mar.parent, [mar.name], tmp / f"server{n}").start()
            for rnd in range(args.rounds):
                for label, key in ROWS:
                    for (name, body), server in ((g, servers[g[0]]) for g in groups):
                        print(f"[camera] round {rnd + 1}/{args.rounds}: {label} ({name}, {body} body)", flush=True)
                        cpu = server_cpu_seconds(server)
                        report = loadtest.main([
                            "--url", server.url, "--metrics-url", server.metrics_url, "--token", server.token,
                            "--model", MODEL, "--outputs", "map", "-u", str(args.users), "--body", body,
                            "--duration", str(args.duration), "-q", "--images", str(photos[key]),
                            "--out", str(tmp / f"load-{rnd}-{key}-{len(results)}")])
                        time.sleep(2)  # the requests still in flight finish
                        spent = [(after - before) * 1e3 / max(report["requests"], 1)
                                 for after, before in zip(server_cpu_seconds(server), cpu)]
                        report["server_cpu_ms_per_request"] = round(spent[0], 1)
                        report["worker_cpu_ms_per_request"] = round(spent[1], 1)
                        results.setdefault((group_name(name, body), key), []).append(report)
        finally:
            for server in servers.values():
                server.stop()

    table = []
    for name in (group_name(n, b) for n, b in groups):
        small = statistics.median(r["requests_per_s"] for r in results[(name, "small")])
        small_cpu = statistics.median(r["server_cpu_ms_per_request"] for r in results[(name, "small")])
        for label, key in ROWS:
            runs = results[(name, key)]
            rps = statistics.median(r["requests_per_s"] for r in runs)
            cpu = statistics.median(r["server_cpu_ms_per_request"] for r in runs)
            worker = statistics.median(r["worker_cpu_ms_per_request"] for r in runs)
            table.append({"handler": name, "photo": label, "file": photos[key].name,
                          "bytes": photos[key].stat().st_size, "requests_per_s": rps,
                          "vs_small": round(rps / small, 2) if small else None, "target": TARGETS.get(key),
                          "server_cpu_ms_per_request": cpu, "worker_cpu_ms_per_request": worker,
                          "cpu_vs_small": round(small_cpu / cpu, 2) if cpu else None,
                          "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in runs),
                          "errors": sum(r["failures"] for r in runs),
                          "mean_batch_size": [r["mean_batch_size"] for r in runs]})
    summary = {"users": args.users, "duration_s": args.duration, "rounds": args.rounds, "cpus": os.cpu_count(),
               "bodies": bodies,
               "outputs": "cam_classes=top1, outputs=map", "table": table,
               "runs": {f"{n} / {k}": v for (n, k), v in results.items()}}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    print(f"\n{args.users} users, cam_classes=top1 & outputs=map, {args.duration} s x {args.rounds} rounds per row "
          f"(median), {os.cpu_count()} CPUs, {' and '.join(bodies)} request bodies\n")
    print("| handler | photo | req/s | vs small | target | CPU ms/req (worker) | CPU vs small | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        target = f">= {row['target']}x" if row["target"] else ""
        print(f"| {row['handler']} | {row['photo']} ({row['bytes'] / 1e6:.1f} MB) | {row['requests_per_s']:.1f} | "
              f"{row['vs_small']:.2f}x | {target} | {row['server_cpu_ms_per_request']:.0f} "
              f"({row['worker_cpu_ms_per_request']:.0f}) | "
              f"{row['cpu_vs_small']:.2f}x | {row['p99_ms']:.0f} | {row['errors']} |")
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
