"""scripts/load/loadtest.py, briefly, against the test server: the report's fields and values.

Every run here ends by its request count (--max-requests), never by its clock: --duration is only a
cap. The totals come from the locustfile at exit, not from locust's CSV, a once-a-second snapshot
that is not rewritten at exit (a run whose answers came in its last second read 0 requests there)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest
import requests
from conftest import DEFAULT, ROOT
from PIL import Image

from devkit.loadplots import read_history

pytestmark = pytest.mark.server


def _plots_are_embedded(out, names: set[str]) -> None:
    """The report's PNG plots exist, decode at the size drawn, and report.md links them."""
    report = json.loads((out / "report.json").read_text())
    assert set(report["plots"]) == names
    markdown = (out / "report.md").read_text()
    sizes = {"timeline": (800, 560), "batch_sizes": (600, 340)}  # figsize x 100 dpi
    for name, file in report["plots"].items():
        assert file == f"{name}.png" and f"]({file})" in markdown
        with Image.open(out / file) as picture:
            assert picture.format == "PNG" and picture.size == sizes[name]
            picture.load()
            colours = picture.convert("RGB").getcolors(1 << 20)
            assert len(colours) > 20  # axes, lines and text, not a blank canvas


def test_load_script_reports_throughput_latency_errors_and_batches(server, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load" / "loadtest.py"), "--url", server.url, "--metrics-url",
         server.metrics_url, "--token", server.token, "--model", DEFAULT, "-u", "4", "--duration", "120",
         "--max-requests", "24", "--outputs", "map", "-q", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == DEFAULT and report["users"] == 4 and report["outputs"] == "map"
    assert report["requests"] > 4 and report["failures"] == 0 and report["errors_by_status"] == {}
    # the last user past --max-requests ended it, not the 120 s timer (users stopping together once
    # left the run going until --duration)
    assert report["ended_by"] == "max-requests" and report["requests"] == 24
    assert report["requests_per_s"] > 0
    lat = report["latency_ms"]
    # locust rounds percentiles to its buckets (10 ms, 100 ms past 1 s); the max is exact
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] * 1.1 + 10
    dist = {int(k): v for k, v in report["batch_size_distribution"].items()}
    assert dist and set(dist) <= set(range(1, 9))
    # Every request the load test sent ran in one server batch (another test's traffic aside).
    assert sum(k * v for k, v in dist.items()) >= report["requests"]
    assert 1 <= report["mean_batch_size"] <= 8
    markdown = (out / "report.md").read_text()
    assert "| requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |" in markdown
    assert "Server batch sizes" in markdown
    _plots_are_embedded(out, {"timeline", "batch_sizes"})


def _served(server, metric: str = "GradcamMaps") -> float:
    """Maps served, or with ``GradcamBatches`` the images batched (each row's count times its
    BatchSize label), by the default model so far."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric + "{") and f'ModelName="{DEFAULT}"' in line:
            size = re.search(r'BatchSize="(\d+)"', line) if metric == "GradcamBatches" else None
            total += float(line.rsplit(" ", 1)[1]) * (int(size.group(1)) if size else 1)
    return total


def _maps_served(server) -> float:
    return _served(server)


def test_raw_bodies_carry_the_options_as_headers(server, tmp_path):
    """--body raw: the photo is the body and the options are headers; cam_classes=none in a
    header must reach the handler, so the run serves answers and no map."""
    start = _maps_served(server)
    r = requests.post(f"{server.url}/predictions/{DEFAULT}", data=(ROOT / "tests/data/chelsea.jpg").read_bytes(),
                      headers={"Authorization": f"Bearer {server.token}", "Content-Type": "image/jpeg",
                               "cam_classes": "top2"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["cams"]) == 2
    deadline = time.monotonic() + 60
    while _maps_served(server) < start + 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    before = _maps_served(server)
    assert before == start + 2  # the counter sees maps
    images = _served(server, "GradcamBatches")
    out = tmp_path / "raw"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load" / "loadtest.py"), "--url", server.url, "--metrics-url",
         server.metrics_url, "--token", server.token, "--model", DEFAULT, "-u", "2", "--duration", "120",
         "--max-requests", "12", "--outputs", "predictions", "--body", "raw", "-q", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["body"] == "raw" and report["requests"] == 12 and report["failures"] == 0
    assert report["ended_by"] == "max-requests"
    # The frontend reads worker metrics from the worker's log stream, a moment after the answers:
    # wait until the batch counter has all 12 images, then no map may have been counted.
    deadline = time.monotonic() + 60
    while _served(server, "GradcamBatches") < images + 12 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _served(server, "GradcamBatches") == images + 12
    assert _maps_served(server) == before  # the header's cam_classes=none was honoured


def test_load_script_refuses_non_loopback_targets(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "load" / "loadtest.py"), "--url", "http://10.0.0.1:8080",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "only targets loopback" in done.stderr


def test_bad_requests_show_up_by_status(server, tmp_path):
    out = tmp_path / "bad"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load" / "loadtest.py"), "--url", server.url, "--metrics-url", "",
         "--token", "wrong-token", "--model", DEFAULT, "-u", "2", "--duration", "120", "--max-requests", "10", "-q",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == report["requests"] > 0
    assert report["errors_by_status"] == {"400": report["requests"]}  # TorchServe's InvalidKeyException
    _plots_are_embedded(out, {"timeline"})  # no metrics endpoint: no batch sizes to draw


def test_history_gives_each_seconds_requests_and_skips_empty_percentiles(tmp_path):
    """locust's stats history (--csv-full-history) to per-second series: the rate comes from the
    running request count, the per-endpoint rows are ignored, and 0/N/A percentiles are gaps."""
    head = ("Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
            "99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,"
            "Total Average Response Time,Total Min Response Time,Total Max Response Time,Total Average Content Size")

    def row(t, users, name, p50, p90, p99, n, fails):
        return f"{t},{users},,{name},0,0,{p50},0,0,0,{p90},0,0,{p99},0,0,0,{n},{fails},0,0,0,0,0"

    lines = [head, row(100, 0, "Aggregated", "N/A", "N/A", "N/A", 0, 0),
             row(101, 4, "predictions map", 0, 0, 0, 5, 0), row(101, 4, "Aggregated", 0, 0, 0, 5, 0),
             row(102, 4, "Aggregated", 120, 300, 500, 25, 1),
             row(102, 4, "Aggregated", 120, 300, 500, 26, 1),  # a second row in the same second: skipped
             row(104, 8, "Aggregated", 130, 310, 520, 66, 3)]
    (tmp_path / "h.csv").write_text("\n".join(lines) + "\n")
    series = read_history(tmp_path / "h.csv")
    assert series["t"] == [1, 2, 4] and series["users"] == [4, 4, 8]
    assert series["rps"] == [5.0, 20.0, 20.5] and series["fails"] == [0.0, 1.0, 1.0]
    assert math.isnan(series["p50"][0]) and series["p50"][1:] == [120.0, 130.0]
    assert series["p99"][1:] == [500.0, 520.0]


@pytest.mark.parametrize("rows, said", [("map,bogus", "unknown row(s) bogus"), (",", "(none given)")])
def test_compare_load_refuses_unknown_rows_before_building_anything(rows, said):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "compare_load.py"), "--rows", rows],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert said in done.stderr and "choose from predictions, map, overlay, eager, frozen, unfrozen" in done.stderr
    assert "[compare]" not in done.stdout  # no archive built, no server started
