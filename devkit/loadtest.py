#!/usr/bin/env python3
"""Load-test a served model with locust (headless) and write a report (markdown + JSON).

Reports requests/s, latency p50/p90/p99/max, errors by status, and the server-side batch-size
distribution read from the metrics endpoint (the handler's GradcamBatches counter) before and
after the run, with plots next to report.md (devkit/loadplots.py): timeline.png (requests/s
and latency percentiles over the run) and batch_sizes.png. Loopback only; bounded by --duration
and --max-requests.

examples:
  # against `make serve` (token read from key_file.json), 16 users for 2 minutes, map outputs
  .venv/bin/python scripts/load/loadtest.py --users 16 --duration 120

  # predictions only, then with overlays, 1000 requests each at most
  .venv/bin/python scripts/load/loadtest.py --outputs predictions --max-requests 1000
  .venv/bin/python scripts/load/loadtest.py --outputs overlay --max-requests 1000

  # camera photos (12 MP JPEGs made from tests/data by devkit/camera_photos.py)
  .venv/bin/python scripts/load/loadtest.py --camera --users 8
  .venv/bin/python scripts/load/loadtest.py --camera --users 8 --body raw   # as raw bodies, options as headers
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

from handler.tools.camclient import token_attached

ROOT = Path(__file__).resolve().parent.parent


def _config(key: str) -> str | None:
    for line in (ROOT / "config.properties").read_text().splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    return None


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def batch_counts(metrics_url: str | None, model: str) -> dict[int, float]:
    """GradcamBatches per batch size, from the prometheus text (empty when unreachable)."""
    if not metrics_url:
        return {}
    try:
        text = requests.get(f"{metrics_url}/metrics", timeout=10).text
    except requests.RequestException:
        return {}
    counts: dict[int, float] = {}
    for line in text.splitlines():
        m = re.match(r'GradcamBatches\{(.*)\}\s+([0-9.eE+-]+)$', line)
        if m and f'ModelName="{model}"' in m.group(1):
            size = int(re.search(r'BatchSize="(\d+)"', m.group(1)).group(1))
            counts[size] = counts.get(size, 0) + float(m.group(2))
    return counts


def run_locust(args, prefix: Path) -> int:
    env = dict(os.environ, GRADCAM_MODEL=args.model, GRADCAM_TOKEN=args.token or "",
               GRADCAM_IMAGES=",".join(str(p) for p in args.images), GRADCAM_OUTPUTS=args.outputs,
               GRADCAM_ROUTE=args.route, GRADCAM_MAX=str(args.max_requests), GRADCAM_BODY=args.body,
               GRADCAM_STATS_JSON=f"{prefix}_final.json", GRADCAM_HISTORY_CSV=f"{prefix}_final_history.csv")
    cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).resolve().parent / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s", "--host", args.url,
           "--csv", str(prefix), "--csv-full-history", "--stop-timeout", "30", "--loglevel", "WARNING"]
    if args.quiet:
        cmd.append("--only-summary")
    return subprocess.run(cmd, env=env).returncode


def read_stats(prefix: Path) -> dict:
    """The run's totals: the locustfile's own, written at exit; locust's CSV (a once-a-second
    snapshot that misses the last second's answers) only where that file is missing."""
    final = Path(f"{prefix}_final.json")
    if final.exists():
        return json.loads(final.read_text())
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    agg = rows["Aggregated"]
    errors: dict[str, int] = {}
    failures = Path(f"{prefix}_failures.csv")
    if failures.exists():
        with open(failures, newline="") as f:
            for row in csv.DictReader(f):
                found = re.search(r"status (\d+)", row["Error"])  # CatchResponseError('status 400')
                status = found.group(1) if found else row["Error"]
                errors[status] = errors.get(status, 0) + int(row["Occurrences"])

    def num(key: str) -> float:
        value = agg.get(key, "")
        return float(value) if value not in ("", "N/A") else 0.0

    return {
        "requests": int(num("Request Count")), "failures": int(num("Failure Count")),
        "requests_per_s": round(num("Requests/s"), 2),
        "latency_ms": {"p50": num("50%"), "p90": num("90%"), "p99": num("99%"),
                       "max": round(num("Max Response Time"), 1), "mean": round(num("Average Response Time"), 1)},
        "errors_by_status": errors,
    }


def markdown(report: dict) -> str:
    lat = report["latency_ms"]
    dist = report["batch_size_distribution"]
    lines = [
        f"# Load test: {report['model']} ({report['route']}, outputs={report['outputs']}, {report['body']} body)", "",
        f"{report['users']} users, {report['duration_s']} s, images: {', '.join(report['images'])}", "",
        "| requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {report['requests']} | {report['requests_per_s']} | {lat['p50']:.0f} | {lat['p90']:.0f} | "
        f"{lat['p99']:.0f} | {lat['max']:.0f} | {report['failures']} |", "",
        "Errors by status: " + (", ".join(f"{k}: {v}" for k, v in report["errors_by_status"].items()) or "none"),
        "",
    ]
    if dist:
        lines += ["Server batch sizes (batches per size, from the metrics endpoint): "
                  + ", ".join(f"{size}: {int(n)}" for size, n in sorted(dist.items(), key=lambda kv: int(kv[0]))),
                  f"Mean batch size (per request): {report['mean_batch_size_per_request']}, "
                  f"(per batch): {report['mean_batch_size']}", ""]
    captions = {"timeline": "Requests/s and latency percentiles over the run", "batch_sizes": "Server batch sizes"}
    for name, file in (report.get("plots") or {}).items():
        lines += [f"![{captions.get(name, name)}]({file})", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("examples:")[0],
                                epilog="examples:" + __doc__.split("examples:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=_config("inference_address"), help="inference address (default: config.properties)")
    p.add_argument("--metrics-url", default=_config("metrics_address"), help="metrics address ('' to skip)")
    p.add_argument("--token", default=None, help="inference token (default: key_file.json of `make serve`)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--route", choices=("predictions", "explanations"), default="predictions")
    p.add_argument("--outputs", choices=("predictions", "map", "overlay", "stock"), default="map",
                   help="predictions: no CAM; map: + low-res map; overlay: + overlay JPEG; stock: image only")
    p.add_argument("--body", choices=("multipart", "raw"), default="multipart",
                   help="multipart: the image and options as form fields (default); raw: the image as the "
                        "request body, options as headers (curl -T; TorchServe's frontend spends less on it)")
    p.add_argument("-u", "--users", type=int, default=16, help="concurrent users")
    p.add_argument("-r", "--spawn-rate", type=float, default=16, help="users started per second")
    p.add_argument("--duration", type=int, default=60, help="seconds (upper bound)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--images", type=Path, nargs="+",
                   default=[ROOT / "tests" / "data" / n for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")])
    p.add_argument("--camera", action="store_true",
                   help="send camera photos instead of --images: 12 MP baseline, progressive, EXIF-rotated and "
                        "4:3 JPEGs made from tests/data (devkit/camera_photos.py, cached in bench_results/camera/)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: bench_results/load-<time>)")
    p.add_argument("-q", "--quiet", action="store_true", help="no periodic progress table")
    return p.parse_args(token_attached(argv))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not _loopback(args.url) or (args.metrics_url and not _loopback(args.metrics_url)):
        sys.exit("loadtest.py only targets loopback addresses (127.0.0.0/8, localhost, ::1)")
    if args.camera:
        from devkit.camera_photos import load_test_photos

        args.images = load_test_photos()
    if args.token is None and (ROOT / "key_file.json").exists():
        args.token = json.loads((ROOT / "key_file.json").read_text())["inference"]["key"]
    out = args.out or ROOT / "bench_results" / f"load-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    before = batch_counts(args.metrics_url, args.model)
    started = time.monotonic()
    print(f"[load] {args.users} users -> {args.url}/{args.route}/{args.model} ({args.outputs}), "
          f"up to {args.duration} s / {args.max_requests} requests", flush=True)
    run_locust(args, out / "locust")
    elapsed = time.monotonic() - started
    time.sleep(1)  # the frontend reads worker metrics from the worker's log stream
    after = batch_counts(args.metrics_url, args.model)
    dist = {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0) > 0}
    batches = sum(dist.values())
    report = {
        "model": args.model, "route": args.route, "outputs": args.outputs, "body": args.body, "users": args.users,
        "duration_s": round(elapsed, 1), "images": [p.name for p in args.images],
        **read_stats(out / "locust"),
        "batch_size_distribution": {str(k): v for k, v in sorted(dist.items())},
        "mean_batch_size": round(sum(k * v for k, v in dist.items()) / batches, 2) if batches else None,
        "mean_batch_size_per_request": round(sum(k * k * v for k, v in dist.items())
                                             / max(sum(k * v for k, v in dist.items()), 1), 2) if batches else None,
    }
    try:
        from devkit.loadplots import write_plots

        history = out / "locust_final_history.csv"
        report["plots"] = write_plots(report, history if history.exists() else out / "locust_stats_history.csv", out)
    except ImportError as exc:  # matplotlib comes with the test extras (scripts/ops/bootstrap.sh test)
        print(f"[load] no plots: {exc}", file=sys.stderr)
        report["plots"] = {}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    print("\n" + markdown(report))
    plots = "".join(f", {file}" for file in report["plots"].values())
    print(f"[load] report: {out / 'report.md'}, report.json{plots}", flush=True)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["failures"] == 0 else 1)
