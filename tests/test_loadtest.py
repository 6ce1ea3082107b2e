"""scripts/loadtest.py, briefly, against the test server: the report's fields and values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DEFAULT, ROOT

pytestmark = pytest.mark.server


def test_load_script_reports_throughput_latency_errors_and_batches(server, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", server.url, "--metrics-url",
         server.metrics_url, "--token", server.token, "--model", DEFAULT, "-u", "4", "--duration", "6",
         "--max-requests", "400", "--outputs", "map", "-q", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == DEFAULT and report["users"] == 4 and report["outputs"] == "map"
    assert report["requests"] > 4 and report["failures"] == 0 and report["errors_by_status"] == {}
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


def test_load_script_refuses_non_loopback_targets(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", "http://10.0.0.1:8080",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "only targets loopback" in done.stderr


def test_bad_requests_show_up_by_status(server, tmp_path):
    out = tmp_path / "bad"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", server.url, "--metrics-url", "",
         "--token", "wrong-token", "--model", DEFAULT, "-u", "2", "--duration", "3", "-q", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == report["requests"] > 0
    assert report["errors_by_status"] == {"400": report["requests"]}  # TorchServe's InvalidKeyException
