#!/usr/bin/env python3
"""Worker start-up times of the compiled serve path, cold and warm, against the eager archive.

A compiled worker compiles every batch bucket in ``initialize`` (no request pays for it). The
kernels land in inductor's cache, so a restarted worker, or a new server of the same user,
loads them instead of compiling; a frozen backbone is still traced and frozen again on each start
(AOTAutograd's cache skips graphs compiled with freezing), its compiled code comes from the
cache. For each archive (the default model: eager, compiled, compiled and frozen):

  cold server   a new TorchServe and an empty kernel cache: until the worker is READY
  warm worker   the worker SIGKILLed: until TorchServe's restarted worker is READY
  warm server   a new TorchServe on the same kernel cache: until the worker is READY

Loopback only; servers on free ports, stopped at the end. Prints a table and writes
bench_results/startup.json.

  .venv/bin/python scripts/bench/bench_startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devkit.tslocal import ROOT, LocalServer  # noqa: E402

MODEL = "efficientnet_lite0"


# (label, archive name, archiver flags); each compiled archive gets a kernel cache of its own.
ARCHIVES = [
    ("eager", "lite0_eager", ["--compile", "off", "--channels-last", "off"]),
    ("compiled, channels-last, buckets 1/2/4/8", "lite0_compiled",
     ["--compile", "on", "--channels-last", "on", "--compile-freeze", "off"]),
    ("compiled, channels-last, frozen backbone", "lite0_frozen",
     ["--compile", "on", "--channels-last", "on", "--compile-freeze", "on"]),
]


def build(store: Path, name: str, cache: Path, flags: list[str]) -> str:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "archive.py"), "-q", "--name", name,
                    "--export-path", str(store), "--compile-cache-dir", str(cache), *flags], check=True)
    return f"{name}.mar"


def wait_ready(server: LocalServer, model: str, old_pid: int | None, timeout: float = 900) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.worker_status(model) == "READY":
            pids = server.worker_pids(model)
            if old_pid is None or (pids and pids[0] != old_pid):
                return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError(f"{model} not ready in {timeout:.0f} s:\n{server.log_tail()}")


def measure(store: Path, mar: str, workdir: Path) -> dict:
    model = mar.removesuffix(".mar")
    out = {}
    started = time.monotonic()
    server = LocalServer(store, [mar], workdir / "cold").start(timeout=900)
    out["cold_server_s"] = round(time.monotonic() - started, 1)
    try:
        (pid,) = server.worker_pids(model)
        os.kill(pid, signal.SIGKILL)
        out["warm_worker_s"] = round(wait_ready(server, model, pid), 1)
    finally:
        server.stop()
    started = time.monotonic()
    server = LocalServer(store, [mar], workdir / "warm").start(timeout=900)
    out["warm_server_s"] = round(time.monotonic() - started, 1)
    server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "startup.json")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        for label, name, flags in ARCHIVES:
            print(f"[startup] building and timing the {label} archive", flush=True)
            mar = build(store, name, tmp / f"inductor-{name}", flags)
            results[label] = measure(store, mar, tmp / mar)
    summary = {"model": MODEL, "cpus": os.cpu_count(), "rows": results}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    print(f"\nworker start-up, {MODEL}, {os.cpu_count()} CPUs (seconds until the worker is READY)\n")
    print("| archive | cold server | warm worker (restart) | warm server |")
    print("| --- | --- | --- | --- |")
    for label, row in results.items():
        print(f"| {label} | {row['cold_server_s']} | {row['warm_worker_s']} | {row['warm_server_s']} |")
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
