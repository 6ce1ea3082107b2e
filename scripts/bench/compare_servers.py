#!/usr/bin/env python3
"""TorchServe and the KServe predictor side by side: the same archive, the same photo, the same
16 concurrent clients, in alternating rounds on this machine.

For each server: requests/s with maps (predictions + the low-res map), p50/p99 latency, the mean
batch size the answers report; then SIGTERM under load: how many requests in flight were lost.
Starts both servers on free loopback ports and stops them. Prints a table, writes
bench_results/compare_servers.json.

  .venv/bin/python scripts/bench/compare_servers.py                    # the default archive
  .venv/bin/python scripts/bench/compare_servers.py --duration 30 --rounds 3 --users 16
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from devkit.tslocal import ROOT, KServeLocal, LocalServer, default_mar  # noqa: E402

MODEL = "efficientnet_lite0"


def _torchserve_call(server: LocalServer, image: bytes):
    session = requests.Session()
    headers = server.auth()

    def call() -> requests.Response:
        return session.post(f"{server.url}/predictions/{MODEL}", headers=headers, timeout=120,
                            files={"image": ("photo.jpg", image)}, data={"outputs": "map"})
    return call


def _kserve_call(server: KServeLocal, image: bytes):
    session = requests.Session()
    body = json.dumps({"instances": [{"image": base64.b64encode(image).decode(), "outputs": "map"}]})

    def call() -> requests.Response:
        return session.post(f"{server.url}/v1/models/{MODEL}:predict", data=body, timeout=120,
                            headers={"Content-Type": "application/json"})
    return call


def _answer(r: requests.Response, kind: str) -> dict:
    body = r.json()
    return body["predictions"][0] if kind == "kserve" else body


def load(make_call, kind: str, users: int, duration: float) -> dict:
    """``users`` clients in a closed loop for ``duration`` seconds."""
    latencies, sizes, errors = [], [], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def user():
        call = make_call()
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                r = call()
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                if ok:
                    latencies.append((time.perf_counter() - started) * 1e3)
                    sizes.append(_answer(r, kind)["batch_size"])
                else:
                    errors[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=user) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    latencies.sort()
    return {"requests": len(latencies), "requests_per_s": len(latencies) / wall, "errors": errors[0],
            "p50_ms": latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else None,
            "mean_batch_size": statistics.mean(sizes) if sizes else None}


def sigterm_under_load(make_call, kind: str, pid: int, users: int) -> dict:
    """SIGTERM while ``users`` clients keep sending; a request is lost when it was sent before the
    signal and got no 200 (a connection refused after the signal is not a loss: it never got in)."""
    statuses = []
    lock = threading.Lock()
    signalled = threading.Event()

    def user():
        call = make_call()
        while not signalled.is_set():
            sent_before = not signalled.is_set()
            try:
                status = call().status_code
            except requests.ConnectionError as exc:
                status = "refused" if "refused" in str(exc).lower() else type(exc).__name__
            except requests.RequestException as exc:
                status = type(exc).__name__
            with lock:
                statuses.append((sent_before, status))

    threads = [threading.Thread(target=user) for _ in range(users)]
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(pid, signal.SIGTERM)
    signalled.set()
    for t in threads:
        t.join()
    lost = [s for before, s in statuses if before and s not in (200, "refused")]
    return {"requests": len(statuses), "answered": sum(1 for _, s in statuses if s == 200), "lost": len(lost),
            "lost_statuses": sorted(map(str, set(lost)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, default=None, help="a .mar (default: model_store's default archive)")
    p.add_argument("--duration", type=float, default=30, help="seconds per server per round (default 30)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("-u", "--users", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--settle", type=float, default=0,
                   help="seconds to wait after both servers are ready, before measuring: a compiled archive "
                        "compiles in the background after it is ready (default 0)")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "compare_servers.json")
    args = p.parse_args(argv)
    archive = (args.archive or default_mar()).resolve()
    image = (ROOT / "tests" / "data" / "chelsea.jpg").read_bytes()
    runs: dict[str, list[dict]] = {"torchserve": [], "kserve": []}
    with tempfile.TemporaryDirectory(prefix="servers-") as tmp:
        tmp = Path(tmp)
        print(f"[servers] starting TorchServe and the KServe predictor for {archive.name}", flush=True)
        ts = LocalServer(archive.parent, [archive.name], tmp / "ts").start(timeout=900)
        ks = KServeLocal(archive, tmp / "ks").start(timeout=900)
        calls = {"torchserve": lambda: _torchserve_call(ts, image), "kserve": lambda: _kserve_call(ks, image)}
        try:
            if args.settle:
                print(f"[servers] waiting {args.settle:.0f} s for background compiles", flush=True)
                time.sleep(args.settle)
            for kind in calls:  # warm both: first requests pay for lazy initialisation
                load(calls[kind], kind, args.users, 3)
            for rnd in range(args.rounds):
                for kind in (("torchserve", "kserve") if rnd % 2 == 0 else ("kserve", "torchserve")):
                    print(f"[servers] round {rnd + 1}/{args.rounds}: {kind}", flush=True)
                    runs[kind].append(load(calls[kind], kind, args.users, args.duration))
            print("[servers] SIGTERM under load", flush=True)
            term = {"kserve": sigterm_under_load(calls["kserve"], "kserve", ks.proc.pid, args.users)}
            ks.proc.wait(60)
            # TorchServe: the frontend's own SIGTERM handling (the container's entry point drains first).
            term["torchserve"] = sigterm_under_load(calls["torchserve"], "torchserve", ts.frontend_pid(), args.users)
        finally:
            ks.stop()
            ts.stop()
    table = []
    for kind, reports in runs.items():
        table.append({"server": kind,
                      "requests_per_s": statistics.median(r["requests_per_s"] for r in reports),
                      "p50_ms": statistics.median(r["p50_ms"] for r in reports),
                      "p99_ms": statistics.median(r["p99_ms"] for r in reports),
                      "mean_batch_size": statistics.mean(r["mean_batch_size"] for r in reports),
                      "errors": sum(r["errors"] for r in reports), "sigterm": term[kind]})
    ratio = table[1]["requests_per_s"] / table[0]["requests_per_s"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    summary = {"archive": archive.name, "users": args.users, "settle_s": args.settle, "duration_s": args.duration,
               "rounds": args.rounds,
               "cpus": os.cpu_count(), "commit": commit.strip(), "kserve_vs_torchserve": round(ratio, 3),
               "table": table, "runs": runs}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    print(f"\n{args.users} clients, predictions + map, {args.duration:.0f} s x {args.rounds} rounds (median), "
          f"{os.cpu_count()} CPUs, commit {summary['commit']}\n")
    print("| server | req/s | p50 ms | p99 ms | mean batch | errors | SIGTERM: in flight lost |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['server']} | {row['requests_per_s']:.2f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
              f"{row['mean_batch_size']:.2f} | {row['errors']} | {row['sigterm']['lost']} of "
              f"{row['sigterm']['requests']} |")
    print(f"\nKServe / TorchServe req/s: {ratio:.2f}x\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
