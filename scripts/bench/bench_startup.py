#!/usr/bin/env python3
"""Cold start of the default model: how soon a new replica answers, and how soon it is at full speed.

Five archives of the default model, each started as a new pod would be: a new TorchServe with a
fresh HOME, TMPDIR and kernel cache.

  eager                      compile off
  compiled, at load          compile on, compile_start load: ready once every batch size compiled
  compiled, in background    compile on, compile_start background (the default): ready at once on
                             the eager model, switching to the compiled one once it is built
  ... shipped kernels        either, built with gradcam-archive --ship-kernels: the archive carries
                             inductor's cache, which the new pod's worker installs before compiling

For each: the time from starting the server to the first correct answer (a cat for the cat photo),
then, with 8 clients sending in a closed loop from that moment, the time until a 5-second window
reaches 0.9x the warm compiled throughput (measured first, on a warmed-up server compiled at load), and
the time a SIGKILLed worker takes to answer again. Loopback only; servers on free ports, stopped
at the end. Prints a table and writes bench_results/startup.json.

  .venv/bin/python scripts/bench/bench_startup.py
  .venv/bin/python scripts/bench/bench_startup.py --window 5 --cap 180
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from devkit.tslocal import ROOT, LocalServer

MODEL = "efficientnet_lite0"
CATS = range(281, 286)
PHOTO = (ROOT / "tests" / "data" / "chelsea.jpg").read_bytes()

_COMPILED = ["--compile", "on", "--channels-last", "on", "--compile-freeze", "off"]
ARCHIVES = [
    ("eager", "lite0_eager", ["--compile", "off", "--channels-last", "off"]),
    ("compiled, at load", "lite0_at_load", [*_COMPILED, "--compile-start", "load"]),
    ("compiled, in background", "lite0_background", [*_COMPILED, "--compile-start", "background"]),
    ("compiled, at load, shipped kernels", "lite0_at_load_ship", [*_COMPILED, "--compile-start", "load",
                                                                  "--ship-kernels"]),
    ("compiled, in background, shipped kernels", "lite0_background_ship", [*_COMPILED, "--compile-start",
                                                                           "background", "--ship-kernels"]),
]


def build(store: Path, name: str, flags: list[str]) -> str:
    subprocess.run([sys.executable, "-m", "handler.tools.archive", "-q", "--name", name,
                    "--export-path", str(store), *flags], check=True)
    return f"{name}.mar"


def _answer(server: LocalServer, model: str, session: requests.Session | None = None) -> bool:
    try:
        r = (session or requests).post(f"{server.url}/predictions/{model}", headers=server.auth(), timeout=60,
                                       files={"image": ("cat.jpg", PHOTO)}, data={"outputs": "map"})
    except (requests.RequestException, ValueError):  # not up yet, or key_file.json half written
        return False
    return r.status_code == 200 and r.json()["predictions"][0]["class_id"] in CATS


def first_answer(server: LocalServer, model: str, started: float, cap: float) -> float:
    """Seconds from ``started`` to the first correct answer."""
    while time.monotonic() - started < cap:
        if (server.workdir / "key_file.json").exists() and _answer(server, model):
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"{model}: no answer within {cap:.0f} s:\n{server.log_tail()}")


def closed_loop(server: LocalServer, model: str, seconds: float, clients: int = 8) -> list[float]:
    """Completion times (monotonic) of correct answers, ``clients`` senders for ``seconds``."""
    done: list[float] = []
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()

    def client():
        session = requests.Session()
        while time.monotonic() < stop_at:
            if _answer(server, model, session):
                with lock:
                    done.append(time.monotonic())

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(done)


def time_to_rate(done: list[float], origin: float, rate: float, window: float) -> float | None:
    """Seconds from ``origin`` to the end of the first ``window``-second span answering >= ``rate``/s."""
    start = 0
    for end_i, t in enumerate(done):
        while done[start] < t - window:
            start += 1
        if t - origin >= window and (end_i - start + 1) / window >= rate:
            return t - origin
    return None


def _fresh_env(root: Path) -> dict[str, str]:
    """A new pod: its own HOME, TMPDIR and caches (inductor's default cache is under HOME)."""
    env = {}
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        folder = root / key.lower()
        folder.mkdir(parents=True, exist_ok=True)
        env[key] = str(folder)
    return env


def measure(store: Path, mar: str, workdir: Path, warm_rate: float | None, window: float, cap: float) -> dict:
    model = mar.removesuffix(".mar")
    started = time.monotonic()
    server = LocalServer(store, [mar], workdir / "server", env=_fresh_env(workdir / "pod"))
    server.start(timeout=900, ready=[])  # returns once the frontend answers; the worker may still load
    out = {"first_answer_s": round(first_answer(server, model, started, cap), 1)}
    try:
        done = closed_loop(server, model, cap - (time.monotonic() - started))
        out["answers"] = len(done)
        out["last_window_rate"] = round(sum(1 for t in done if t > done[-1] - window) / window, 2) if done else 0
        out["timeline"] = [round(t - started, 2) for t in done]
        if warm_rate:
            reached = time_to_rate(done, started, 0.9 * warm_rate, window)
            out["full_speed_s"] = None if reached is None else round(reached, 1)
        (pid,) = server.worker_pids(model)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        out["worker_restart_s"] = round(first_answer(server, model, killed, cap), 1)
    finally:
        server.stop()
    return out


def warm_compiled_rate(store: Path, mar: str, workdir: Path, seconds: float) -> float:
    """Requests/s of the compiled archive once warm (compiled at load, measured after a warm-up)."""
    model = mar.removesuffix(".mar")
    with LocalServer(store, [mar], workdir / "warm", env=_fresh_env(workdir / "pod")) as server:
        closed_loop(server, model, 10)
        done = closed_loop(server, model, seconds)
    return len(done) / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap", type=float, default=150, help="seconds each cold start is watched (default 150)")
    p.add_argument("--window", type=float, default=5, help="throughput window, seconds (default 5)")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "startup.json")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        mars = {}
        for label, name, flags in ARCHIVES:
            print(f"[startup] building the {label} archive", flush=True)
            mars[label] = build(store, name, flags)
        print("[startup] the warm compiled rate", flush=True)
        warm = warm_compiled_rate(store, mars["compiled, at load"], tmp / "warm", 20)
        print(f"[startup] warm compiled: {warm:.2f} req/s", flush=True)
        for label, _, _ in ARCHIVES:
            print(f"[startup] cold start: {label}", flush=True)
            results[label] = measure(store, mars[label], tmp / label.replace(" ", "_").replace(",", ""),
                                     warm, args.window, args.cap)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    summary = {"model": MODEL, "cpus": os.cpu_count(), "commit": commit.stdout.strip(),
               "warm_compiled_requests_per_s": round(warm, 2), "window_s": args.window, "rows": results}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    eager = results["eager"]["first_answer_s"]
    print(f"\ncold start of {MODEL}, {os.cpu_count()} CPUs, commit {summary['commit']}: fresh HOME, TMPDIR and "
          f"kernel cache; warm compiled rate {warm:.2f} req/s (8 clients)\n")
    print("| archive | first correct answer | vs eager | 0.9x warm compiled rate at | worker SIGKILL: "
          "answering again | rate at the end |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, row in results.items():
        reached = row.get("full_speed_s")
        print(f"| {label} | {row['first_answer_s']} s | {row['first_answer_s'] / eager:.2f}x | "
              f"{f'{reached} s' if reached is not None else 'not within the cap'} | {row['worker_restart_s']} s | "
              f"{row['last_window_rate']} req/s |")
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
