"""Plots of a load-test run for scripts/load/loadtest.py's report (matplotlib, Agg backend, no display).

- ``timeline.png``: requests/s per second (from locust's running request count, so each point is
  that second's completions) with the users running, and the latency percentiles p50/p90/p99 over
  the run (locust's "current" percentiles: a sliding window of about the last 10 s, written each
  second to ``<prefix>_stats_history.csv`` with ``--csv-full-history``).
- ``batch_sizes.png``: the server's batch-size distribution over the run: the share of requests
  answered in batches of each size, with the number of batches on each bar.
"""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["read_history", "write_plots"]

_PERCENTILES = (("50%", "p50"), ("90%", "p90"), ("99%", "p99"))


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-second series of the Aggregated rows: t (s from the first row), rps, fails, users, p50..."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    series: dict[str, list[float]] = {k: [] for k in ("t", "rps", "fails", "users", "p50", "p90", "p99")}
    if not rows:
        return series
    start = int(rows[0]["Timestamp"])
    last_t, last_n, last_f = start, 0, 0
    for row in rows[1:]:
        t = int(row["Timestamp"])
        if t <= last_t:  # two rows in one second: wait for the next
            continue
        n, fails = int(row["Total Request Count"]), int(row["Total Failure Count"])
        series["t"].append(t - start)
        series["rps"].append((n - last_n) / (t - last_t))
        series["fails"].append((fails - last_f) / (t - last_t))
        series["users"].append(int(row["User Count"]))
        for column, key in _PERCENTILES:
            value = row.get(column, "N/A")
            # locust writes 0 (or N/A) until its window holds a request: no point, not a zero latency
            series[key].append(float(value) if value not in ("", "N/A") and float(value) > 0 else float("nan"))
        last_t, last_n, last_f = t, n, fails
    return series


def _rolling(values: list[float], width: int) -> list[float]:
    """Trailing mean over ``width`` points (fewer at the start)."""
    return [sum(values[max(0, i - width + 1):i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]


def _timeline(series: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True, constrained_layout=True)
    t = series["t"]
    top.step(t, series["rps"], where="pre", color="#9ecae1", linewidth=1, label="requests/s, each second")
    top.plot(t, _rolling(series["rps"], 5), color="#1f77b4", linewidth=2, label="5 s mean")
    if any(series["fails"]):
        top.step(t, series["fails"], where="pre", color="#d62728", label="failures/s")
    if series["rps"]:
        mean = sum(series["rps"]) / len(series["rps"])
        top.axhline(mean, color="#1f77b4", linestyle=":", linewidth=1, label=f"run mean {mean:.1f}/s")
    top.set_ylabel("requests/s")
    top.set_ylim(0, max(series["rps"] or [1]) * 1.45 or 1)  # headroom for the legend
    users = top.twinx()
    users.step(t, series["users"], where="pre", color="#7f7f7f", linestyle="--", linewidth=1)
    users.set_ylabel("users", color="#7f7f7f")
    users.set_ylim(0, max(series["users"] or [1]) * 1.7)  # below the legend
    top.legend(loc="upper left", fontsize=8, ncol=3)
    top.set_title(title, fontsize=10)
    for key, colour in zip(("p50", "p90", "p99"), ("#2ca02c", "#ff7f0e", "#d62728")):
        bottom.plot(t, series[key], color=colour, label=f"{key} (10 s window)")
    bottom.set_ylabel("latency ms")
    bottom.set_xlabel("seconds into the run")
    bottom.set_ylim(0, max((v for k in ("p50", "p90", "p99") for v in series[k] if v == v), default=1) * 1.3)
    bottom.legend(loc="upper left", fontsize=8, ncol=3)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _batch_sizes(distribution: dict[str, float], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    sizes = sorted(int(k) for k in distribution)
    batches = [distribution[str(s)] for s in sizes]
    requests = [s * b for s, b in zip(sizes, batches)]
    total = sum(requests) or 1
    fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
    bars = ax.bar(sizes, [100 * r / total for r in requests], color="#1f77b4")
    for bar, n in zip(bars, batches):
        ax.annotate(f"{int(n)}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(1, max(sizes, default=1) + 1))
    ax.set_ylim(0, max(100 * r / total for r in requests) * 1.15 if requests else 1)
    ax.set_xlabel("server batch size (number on the bar: batches)")
    ax.set_ylabel("% of requests")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: dict, history_csv: Path, out: Path) -> dict[str, str]:
    """Draw the report's plots into ``out``; {name: file name} of those written.

    The timeline needs locust's history CSV; the batch sizes need the report's distribution
    (empty when the metrics endpoint was skipped or unreachable).
    """
    import matplotlib

    matplotlib.use("Agg")
    written: dict[str, str] = {}
    what = f"{report['model']}, outputs={report['outputs']}, {report['users']} users"
    if history_csv.exists():
        series = read_history(history_csv)
        if series["t"]:
            _timeline(series, f"Load test: {what}", out / "timeline.png")
            written["timeline"] = "timeline.png"
    if report.get("batch_size_distribution"):
        mean = report.get("mean_batch_size_per_request")
        _batch_sizes(report["batch_size_distribution"],
                     f"Server batch sizes, mean per request {mean}\n{what}", out / "batch_sizes.png")
        written["batch_sizes"] = "batch_sizes.png"
    return written
