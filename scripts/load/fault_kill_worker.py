#!/usr/bin/env python3
"""Fault test: SIGKILL the model's worker under load and measure how TorchServe recovers.

Starts a private TorchServe on loopback with the default archive (or --mar), keeps N clients
sending the cat photo, kills the worker process after --kill-after seconds, and reports: the
statuses of every request (those in flight when the worker died included), the time until the
restarted worker answered again, and the new worker's pid. Bounded by --duration.

  .venv/bin/python scripts/load/fault_kill_worker.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devkit.tslocal import ROOT, LocalServer, default_mar  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar", type=Path, default=None)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before the kill")
    p.add_argument("--duration", type=float, default=60.0, help="total seconds of load")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "fault_kill_worker.json")
    args = p.parse_args(argv)

    mar = args.mar or default_mar()
    image = (ROOT / "tests" / "data" / "chelsea.jpg").read_bytes()
    events: list[tuple[float, float, object]] = []  # (sent, answered, status) relative to start
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="fault-") as work, \
            LocalServer(mar.parent, [mar.name], Path(work)) as server:
        model = mar.stem
        old_pid = server.worker_pids(model)[0]
        start = time.monotonic()
        stop_at = start + args.duration

        def client() -> None:
            while time.monotonic() < stop_at:
                sent = time.monotonic() - start
                try:
                    status = server.predict(model, files={"image": ("cat.jpg", image)}, timeout=120).status_code
                except Exception as exc:
                    status = f"no answer: {type(exc).__name__}"
                with lock:
                    events.append((sent, time.monotonic() - start, status))

        with ThreadPoolExecutor(args.concurrency) as pool:
            for _ in range(args.concurrency):
                pool.submit(client)
            time.sleep(args.kill_after)
            killed_at = time.monotonic() - start
            os.kill(old_pid, signal.SIGKILL)
            print(f"[fault] killed worker {old_pid} at {killed_at:.1f}s", flush=True)
            ready_at = new_pid = None
            while time.monotonic() < stop_at:
                pids = server.worker_pids(model)
                if pids and pids[0] != old_pid and server.worker_status(model) == "READY":
                    ready_at, new_pid = time.monotonic() - start, pids[0]
                    print(f"[fault] worker {new_pid} READY at {ready_at:.1f}s", flush=True)
                    break
                time.sleep(0.1)

    after = [e for e in events if e[0] > killed_at]
    first_ok = min((e[1] for e in after if e[2] == 200), default=None)
    in_flight = [e for e in events if e[0] <= killed_at < e[1]]
    failed = [e for e in events if e[2] != 200]
    report = {
        "requests": len(events), "statuses": {str(k): v for k, v in Counter(e[2] for e in events).items()},
        "killed_worker_pid": old_pid, "new_worker_pid": new_pid, "killed_at_s": round(killed_at, 2),
        "worker_ready_after_s": round(ready_at - killed_at, 2) if ready_at else None,
        "first_200_after_kill_s": round(first_ok - killed_at, 2) if first_ok else None,
        "in_flight_at_kill": len(in_flight),
        "in_flight_statuses": {str(k): v for k, v in Counter(e[2] for e in in_flight).items()},
        "failed": len(failed), "failed_statuses": {str(k): v for k, v in Counter(e[2] for e in failed).items()},
        "failed_after_recovery": sum(1 for e in failed if first_ok and e[0] > first_ok),
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = new_pid is not None and report["failed_after_recovery"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
