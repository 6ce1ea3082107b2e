#!/usr/bin/env python3
"""Soak test: a bounded stream of good and bad requests at fixed concurrency, on loopback.

Starts a private TorchServe with the default archive (or --mar), sends a mix of the test photos
and the hostile corpus of devkit/corpus.py from N threads for a fixed time (and at most
--max-requests), and checks that every request is answered with the status its case expects.
Samples the worker's RSS every few seconds and reports it at minute 2 and at the end.

  .venv/bin/python scripts/load/soak.py                       # 10 minutes, concurrency 16
  .venv/bin/python scripts/load/soak.py --duration 60 -c 8    # a quick one
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from devkit.corpus import Case, bad_cases, odd_cases  # noqa: E402
from devkit.tslocal import ROOT, LocalServer, default_mar  # noqa: E402

MODEL = "efficientnet_lite0"


def mix(good_share: float) -> list[Case]:
    """The request cycle: good photos interleaved with every bad case (none over the size limit)."""
    good = [Case(f"photo {n}", {"files": {"image": (n, (ROOT / "tests" / "data" / n).read_bytes())}}, 200)
            for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
    bad = [c for c in bad_cases(25165824) if c.name != "body over max_request_size"] + odd_cases()
    per_bad = max(1, round(good_share / (1 - good_share)))  # good photos per bad case
    photos = itertools.cycle(good)
    cycle = []
    for b in bad:
        cycle.extend(next(photos) for _ in range(per_bad))
        cycle.append(b)
    return cycle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar", type=Path, default=None, help="archive to serve (default: the default model)")
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    p.add_argument("--good-share", type=float, default=0.8, help="share of good photos in the mix")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "soak.json")
    args = p.parse_args(argv)

    mar = args.mar or default_mar()
    cycle = mix(args.good_share)
    with tempfile.TemporaryDirectory(prefix="soak-") as work, \
            LocalServer(mar.parent, [mar.name], Path(work)) as server:
        model = mar.stem
        pid = server.worker_pids(model)[0]
        worker = psutil.Process(pid)
        counter = itertools.count()
        lock = threading.Lock()
        statuses: Counter = Counter()
        unexpected: list[dict] = []
        rss: list[tuple[float, int]] = []
        start = time.monotonic()
        stop_at = start + args.duration

        def client() -> int:
            sent = 0
            while time.monotonic() < stop_at:
                i = next(counter)
                if i >= args.max_requests:
                    break
                case = cycle[i % len(cycle)]
                try:
                    r = server.predict(model, timeout=120, **case.kwargs)
                    got = r.status_code
                except Exception as exc:  # no answer at all: a lost request
                    got = f"no answer: {type(exc).__name__}"
                with lock:
                    statuses[(case.name, got)] += 1
                    if got != case.status:
                        unexpected.append({"case": case.name, "want": case.status, "got": got,
                                           "t": round(time.monotonic() - start, 1)})
                sent += 1
            return sent

        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(client) for _ in range(args.concurrency)]
            next_report = start
            while not all(f.done() for f in futures):
                now = time.monotonic()
                if now >= next_report:
                    mem = worker.memory_info().rss
                    rss.append((now - start, mem))
                    done = sum(statuses.values())
                    print(f"[soak] {now - start:6.0f}s  {done:7d} answered  {done / max(now - start, 1e-9):6.1f} req/s"
                          f"  unexpected {len(unexpected)}  worker RSS {mem / 2**20:.0f} MiB", flush=True)
                    next_report = now + args.sample_every
                time.sleep(0.2)
            sent = sum(f.result() for f in futures)
        elapsed = time.monotonic() - start
        pids_after = server.worker_pids(model)

    answered = sum(statuses.values())
    at2 = next((m for t, m in rss if t >= 120), rss[0][1] if rss else 0)
    end = rss[-1][1] if rss else 0
    report = {
        "duration_s": round(elapsed, 1), "concurrency": args.concurrency, "sent": sent, "answered": answered,
        "lost": sent - answered, "requests_per_s": round(answered / elapsed, 2),
        "statuses": {f"{name} -> {code}": n for (name, code), n in sorted(statuses.items(), key=str)},
        "unexpected": unexpected[:50], "unexpected_count": len(unexpected),
        "worker_pid_before": pid, "worker_pids_after": pids_after, "worker_restarts": int(pids_after != [pid]),
        "rss_mib_at_2min": round(at2 / 2**20, 1), "rss_mib_end": round(end / 2**20, 1),
        "rss_growth_pct_from_2min": round(100 * (end - at2) / at2, 2) if at2 else None,
        "rss_samples": [(round(t, 1), round(m / 2**20, 1)) for t, m in rss],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2))
    print("\n| duration | sent | answered | lost | req/s | unexpected | worker restarts | RSS @2min | RSS end "
          "| growth |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {report['duration_s']} s | {sent} | {answered} | {report['lost']} | {report['requests_per_s']} | "
          f"{len(unexpected)} | {report['worker_restarts']} | {report['rss_mib_at_2min']} MiB | "
          f"{report['rss_mib_end']} MiB | {report['rss_growth_pct_from_2min']}% |")
    print(f"statuses: {json.dumps(report['statuses'], indent=1)}")
    print(f"JSON: {args.json_out}")
    ok = report["lost"] == 0 and not unexpected and not report["worker_restarts"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
