"""Locust scenario for the Grad-CAM endpoint; driven by scripts/load/loadtest.py (settings in env vars).

GRADCAM_MODEL      model name                         (efficientnet_lite0)
GRADCAM_TOKEN      inference token                    (required with token authorization)
GRADCAM_IMAGES     comma list of image files
GRADCAM_OUTPUTS    predictions | map | overlay | stock  (predictions = no CAM; stock = image only)
GRADCAM_ROUTE      predictions | explanations
GRADCAM_MAX        stop after this many requests      (0 = no limit)
GRADCAM_BODY       multipart | raw                    (raw: the image is the body, options are headers)
GRADCAM_HISTORY_CSV where the per-second history goes at exit (locust's own is the same snapshot)
GRADCAM_STATS_JSON where the final totals go at exit   (locust's own CSV is a snapshot taken once a
                   second and not at exit: a short run, or one whose answers came in its last
                   second, read 0 requests there)
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import mimetypes
import os
import re
import threading
import time
from pathlib import Path

import gevent
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

_FIELDS = {
    "predictions": {"cam_classes": "none"},
    "map": {"cam_classes": "top1", "outputs": "map"},
    "overlay": {"cam_classes": "top1", "outputs": "map,overlay"},
    "stock": {},  # TorchServe's stock handlers take the image alone
}
_MODEL = os.environ.get("GRADCAM_MODEL", "efficientnet_lite0")
_OUTPUTS = os.environ.get("GRADCAM_OUTPUTS", "map")
_ROUTE = os.environ.get("GRADCAM_ROUTE", "predictions")
_HEADERS = {"Authorization": f"Bearer {os.environ['GRADCAM_TOKEN']}"} if os.environ.get("GRADCAM_TOKEN") else {}
_IMAGES = [(Path(p).name, Path(p).read_bytes()) for p in os.environ["GRADCAM_IMAGES"].split(",")]
_RAW = os.environ.get("GRADCAM_BODY", "multipart") == "raw"
_MAX = int(os.environ.get("GRADCAM_MAX", "0"))
_cycle = itertools.cycle(_IMAGES)
_count = itertools.count(1)
_lock = threading.Lock()
_quitting = threading.Event()
_active = [0]  # users started and not yet stopped by --max-requests; guarded by _lock


_answers: list[tuple[float, float, bool, int]] = []  # (finished at, response ms, failed, users running)


@events.request.add_listener
def _record(response_time=0.0, exception=None, **_) -> None:
    runner = getattr(_record, "runner", None)
    _answers.append((time.time(), float(response_time or 0), exception is not None,
                     runner.user_count if runner is not None else 0))


@events.init.add_listener
def _on_init(environment, **_) -> None:
    _record.runner = environment.runner
    _record.started = time.time()


def _write_history(path: str) -> None:
    """Per-second rows in locust's history format (Aggregated only), from every answer recorded."""
    started = int(getattr(_record, "started", _answers[0][0] if _answers else time.time()))
    end = max([started + 1, *(math.ceil(t) for t, *_ in _answers)])
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["Timestamp", "User Count", "Type", "Name", "50%", "90%", "99%", "Total Request Count",
                      "Total Failure Count"])
        for second in range(started, end + 1):
            upto = [a for a in _answers if a[0] <= second]
            window = sorted(ms for t, ms, _, _ in upto if second - 1 < t)
            pct = [window[min(len(window) - 1, int(q * len(window)))] if window else "N/A" for q in (0.5, 0.9, 0.99)]
            users = max([u for t, _, _, u in upto if second - 1 < t] or [0])
            out.writerow([second, users, "", "Aggregated", *pct, len(upto), sum(1 for a in upto if a[2])])


@events.quitting.add_listener
def _final_stats(environment, **_) -> None:
    """The run's final totals, written when locust quits (after the last answer)."""
    path = os.environ.get("GRADCAM_STATS_JSON")
    if not path:
        return
    total = environment.stats.total
    errors: dict[str, int] = {}
    for error in environment.stats.errors.values():
        found = re.search(r"status (\d+)", str(error.error))  # CatchResponseError('status 400')
        key = found.group(1) if found else str(error.error)
        errors[key] = errors.get(key, 0) + error.occurrences

    def pct(p: float) -> float:
        return float(total.get_response_time_percentile(p) or 0) if total.num_requests else 0.0

    stats = {
        "requests": total.num_requests, "failures": total.num_failures,
        "requests_per_s": round(total.total_rps, 2),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                       "max": round(float(total.max_response_time or 0), 1),
                       "mean": round(float(total.avg_response_time or 0), 1)},
        "errors_by_status": errors,
        # what ended the run: the last user past --max-requests, or locust's --duration timer
        "ended_by": "max-requests" if _quitting.is_set() else "duration",
    }
    Path(path).write_text(json.dumps(stats))
    if os.environ.get("GRADCAM_HISTORY_CSV"):
        _write_history(os.environ["GRADCAM_HISTORY_CSV"])


class GradCamUser(HttpUser):
    """Sends the photos in turn, as fast as answers come back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        with _lock:
            _active[0] += 1

    @task
    def predict(self) -> None:
        with _lock:
            n = next(_count)
            name, data = next(_cycle)
            last = False
            if _MAX and n > _MAX:
                _active[0] -= 1
                last = _active[0] == 0
        if _MAX and n > _MAX:
            # Each user stops at its next request once the count is reached (its last answer is in);
            # the last one to stop ends the run. Our own count decides which is last: locust's
            # runner.user_count lags a StopUser, so two users stopping together each saw the other
            # still running and neither quit, leaving the run going until --duration (the cause of
            # a 120 s load test). runner.quit() from a user's own greenlet also left the run going,
            # hence the spawn; quitting at the first stop would cut the other users' requests.
            if last and not _quitting.is_set():
                _quitting.set()
                gevent.spawn(self.environment.runner.quit)
            raise StopUser()
        if _RAW:  # the image as the body (curl -T), options as headers
            kwargs = {"data": data, "headers": {**_HEADERS, **_FIELDS[_OUTPUTS],
                                                "Content-Type": mimetypes.guess_type(name)[0] or "image/jpeg"}}
        else:  # the stock handlers read 'data' or 'body'
            field = "data" if _OUTPUTS == "stock" else "image"
            kwargs = {"files": {field: (name, data)}, "data": _FIELDS[_OUTPUTS], "headers": _HEADERS}
        with self.client.post(f"/{_ROUTE}/{_MODEL}", name=f"{_ROUTE} {_OUTPUTS}", catch_response=True,
                              **kwargs) as r:
            if r.status_code == 200:
                r.success()
            else:
                r.failure(f"status {r.status_code}")
