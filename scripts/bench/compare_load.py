#!/usr/bin/env python3
"""What Grad-CAM costs under load, against what a TorchServe user has without this project.

In one run, on loopback, same machine, same model (tf_efficientnet_lite0 with the default
archive's weights), same photos, concurrency 16, batchSize 8, in alternating rounds so machine
drift hits every row alike:

  - this handler, predictions only (cam_classes=none)
  - this handler, predictions + low-res Grad-CAM map
  - this handler, predictions + map + overlay JPEG
  - this handler, predictions + map, eager (the archive's compile and channels_last off): what
    the archiver's speed options (torch.compile, channels-last; docs/performance.md) buy
  - this handler, predictions + map, compiled with freezing the other way round from the default
    archive (compile_freeze on where the archiver chose off, and the reverse): what freezing buys,
    or costs, under load
  - this handler, predictions only, with glibc's default malloc thresholds (the archive's
    malloc_*_threshold_mib set to 0): what the handler's malloc tuning buys
  - TorchServe's stock image_classifier answering /explanations (Captum Integrated Gradients)
  - TorchServe's stock image_classifier answering /predictions (no maps): the floor

The stock server runs with the same malloc thresholds as this handler (through glibc's
MALLOC_*_THRESHOLD_ variables): with glibc's defaults its speed depends on what ran before,
since one Captum batch's huge allocations leave malloc in a state that doubles the speed of the
batches after it. After every row the script waits for that server's queue to drain (requests
the load test gave up on are still computed), so no row pays for the one before.

Builds the stock archive and the glibc-defaults variant itself, starts the servers (private,
free ports), stops them at the end. Prints a table and writes bench_results/compare_load.json.

  .venv/bin/python scripts/bench/compare_load.py --duration 60 --rounds 2
  .venv/bin/python scripts/bench/compare_load.py --camera     # every row with 12 MP camera photos
  .venv/bin/python scripts/bench/compare_load.py --rows map,frozen --rounds 4   # two rows, more rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from devkit import loadtest  # noqa: E402
from devkit.tslocal import ROOT, LocalServer, default_mar  # noqa: E402

MODEL = "efficientnet_lite0"
# Variants of the default archive, served as f"{MODEL}_{key}": the handler settings they change.
VARIANTS = {
    "glibc": {"malloc_mmap_threshold_mib": 0, "malloc_trim_threshold_mib": 0},
    "eager": {"compile": "off", "channels_last": "off"},
    "frozen": {"compile": "on", "compile_freeze": "on"},
    "unfrozen": {"compile": "on", "compile_freeze": "off"},
}
ROWS = {  # --rows key: (label, server, route, outputs)
    "predictions": ("handler: predictions only", "ours", "predictions", "predictions"),
    "map": ("handler: + Grad-CAM map", "ours", "predictions", "map"),
    "overlay": ("handler: + map + overlay", "ours", "predictions", "overlay"),
    "eager": ("handler, eager: + Grad-CAM map", "eager", "predictions", "map"),
    "frozen": ("handler, compiled, backbone frozen: + Grad-CAM map", "frozen", "predictions", "map"),
    "unfrozen": ("handler, compiled, backbone not frozen: + Grad-CAM map", "unfrozen", "predictions", "map"),
    "glibc": ("handler: predictions only, glibc malloc defaults", "glibc", "predictions", "predictions"),
    "stock-explanations": ("stock image_classifier /explanations (Captum IG)", "stock", "explanations", "stock"),
    "stock-predictions": ("stock image_classifier /predictions", "stock", "predictions", "stock"),
}
BASE_ROW, STOCK_EXPLAIN_ROW, STOCK_ROW = (ROWS[k][0] for k in ("predictions", "stock-explanations",
                                                               "stock-predictions"))


def malloc_env(config: dict) -> dict[str, str]:
    """glibc's variables for the handler's malloc thresholds (for a server of another handler)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(config["malloc_mmap_threshold_mib"] << 20),
            "MALLOC_TRIM_THRESHOLD_": str(config["malloc_trim_threshold_mib"] << 20)}


def build_variant(ours: Path, store: Path, name: str, **handler) -> Path:
    """The same archive with some handler settings changed, under another model name."""
    import zipfile

    out = store / f"{name}.mar"
    with zipfile.ZipFile(ours) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config["handler"].update(handler)
                data = yaml.safe_dump(config, sort_keys=False).encode()
            elif item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelName"] = name
                data = json.dumps(manifest, indent=2).encode()
            dst.writestr(item, data)
    return out


def handler_config(mar: Path) -> dict:
    import zipfile

    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))["handler"]


def drain(server: LocalServer, model: str, image: Path) -> float:
    """Wait until the model's queue is empty: one request through it; returns the seconds."""
    start = time.monotonic()
    with open(image, "rb") as f:
        server.predict(model, files={"image" if model != "stock_lite0" else "data": f}, timeout=900)
    return time.monotonic() - start


def build_stock_archive(ours: Path, store: Path) -> Path:
    """The same weights under the stock image_classifier handler, batchSize 8."""
    import zipfile

    from safetensors.torch import load_file

    work = store / "stock_build"
    work.mkdir(parents=True)
    with zipfile.ZipFile(ours) as mar:
        mar.extract("model.safetensors", work)
        mar.extract("index_to_name.json", work)
    state = load_file(str(work / "model.safetensors"))
    torch.save({f"net.{k}": v for k, v in state.items()}, work / "lite0.pth")
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 10, "responseTimeout": 300}
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    (work / "tmp").mkdir()
    tool = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run([str(tool), "--model-name", "stock_lite0", "--version", "1.0",
                    "--model-file", str(ROOT / "scripts" / "bench" / "stock" / "lite0_model.py"),
                    "--serialized-file", str(work / "lite0.pth"), "--handler", "image_classifier",
                    "--extra-files", str(work / "index_to_name.json"),
                    "--config-file", str(work / "model-config.yaml"), "--export-path", str(store), "--force"],
                   check=True, env=dict(os.environ, TMPDIR=str(work / "tmp")))
    return store / "stock_lite0.mar"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=60, help="seconds per row per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-u", "--users", type=int, default=16)
    p.add_argument("--camera", action="store_true",
                   help="send camera photos (12 MP JPEGs made from tests/data by devkit/camera_photos.py)")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated rows to run, in this order: {', '.join(ROWS)} (default: all but "
                        "the frozen or unfrozen row that is the default archive itself)")
    p.add_argument("--json-out", type=Path, default=None,
                   help="default: bench_results/compare_load.json (compare_load_camera.json with --camera)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in (args.rows or "").split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown or (args.rows is not None and not keys):
        p.error(f"--rows: unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
    ours = default_mar()
    config = handler_config(ours)
    if args.rows is None:  # the frozen or unfrozen variant that the default archive is not
        same = "frozen" if config.get("compile_freeze") == "on" and config["compile"] == "on" else "unfrozen"
        keys = [k for k in ROWS if k != same]
    rows = [ROWS[k] for k in dict.fromkeys(keys)]
    needed = {which for _, which, *_ in rows}
    if args.json_out is None:
        args.json_out = ROOT / "bench_results" / f"compare_load{'_camera' if args.camera else ''}.json"

    results: dict[str, list[dict]] = {label: [] for label, *_ in rows}
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        store.mkdir()
        (store / ours.name).symlink_to(ours)
        archives = [ours.name] if "ours" in needed else []
        for which, handler in VARIANTS.items():
            if which in needed:
                build_variant(ours, store, f"{MODEL}_{which}", **handler)
                archives.append(f"{MODEL}_{which}.mar")
        stock_env = malloc_env(config)
        speed = (f"compile {config['compile']}, channels_last {config['channels_last']}, "
                 f"compile_freeze {config.get('compile_freeze', 'off')}")
        print(f"[compare] the default archive serves with {speed}", flush=True)
        image = ROOT / "tests" / "data" / "chelsea.jpg"
        with contextlib.ExitStack() as servers_up:
            mine = stock = None
            if archives:
                # Its compiled workers compile their batch buckets at load: minutes on 2 cores.
                mine = LocalServer(store, archives, tmp / "ours")
                servers_up.callback(mine.stop)
                mine.start(timeout=900)
            if "stock" in needed:
                build_stock_archive(ours, store)
                stock = servers_up.enter_context(LocalServer(store, ["stock_lite0.mar"], tmp / "stock",
                                                             env=stock_env))
            servers = {"ours": (mine, MODEL), "stock": (stock, "stock_lite0"),
                       **{which: (mine, f"{MODEL}_{which}") for which in VARIANTS}}
            for rnd in range(args.rounds):
                for label, which, route, outputs in rows:
                    server, model = servers[which]
                    print(f"[compare] round {rnd + 1}/{args.rounds}: {label}", flush=True)
                    report = loadtest.main([
                        "--url", server.url, "--metrics-url", server.metrics_url if which != "stock" else "",
                        "--token", server.token, "--model", model, "--route", route, "--outputs", outputs,
                        "-u", str(args.users), "--duration", str(args.duration), "-q",
                        "--out", str(tmp / f"load-{rnd}-{which}-{route}-{outputs}"),
                        *(["--camera"] if args.camera else [])])
                    results[label].append(report)
                    waited = drain(server, model, image)
                    if waited > 5:
                        print(f"[compare] waited {waited:.0f} s for {model}'s queue to drain", flush=True)

    def med(label: str, key: str) -> float | None:
        if label not in results:
            return None
        values = [r[key] if key != "p99" else r["latency_ms"]["p99"] for r in results[label]]
        return statistics.median(values)

    base = med(BASE_ROW, "requests_per_s")
    stock_explain = med(STOCK_EXPLAIN_ROW, "requests_per_s")
    stock = med(STOCK_ROW, "requests_per_s")
    table = []
    for label, *_ in rows:
        rps = med(label, "requests_per_s")
        table.append({
            "row": label, "requests_per_s": rps, "p99_ms": med(label, "p99"),
            "vs_predictions_only": round(rps / base, 3) if base else None,
            "vs_stock_explanations": round(rps / stock_explain, 1) if stock_explain else None,
            "vs_stock_predictions": round(rps / stock, 3) if stock else None,
            "errors": sum(r["failures"] for r in results[label]),
            "mean_batch_size": [r["mean_batch_size"] for r in results[label]],
        })
    summary = {"users": args.users, "duration_s": args.duration, "rounds": args.rounds, "camera": args.camera,
               "default_archive": speed,
               "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
               "cpus": os.cpu_count(), "table": table, "runs": results}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    print(f"\n{args.users} users, {args.duration} s x {args.rounds} rounds per row (median), {os.cpu_count()} CPUs\n")
    print(f"'handler' rows: the default archive ({speed}); 'eager': the same with compile and "
          "channels_last off; 'compiled, backbone (not) frozen': compile on, compile_freeze on (off)\n")
    def ratio(value) -> str:
        return f"{value}x" if value is not None else "-"

    print("| row | req/s | p99 ms | vs predictions only | vs stock /predictions | vs stock /explanations | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['row']} | {row['requests_per_s']:.2f} | {row['p99_ms']:.0f} | "
              f"{ratio(row['vs_predictions_only'])} | {ratio(row['vs_stock_predictions'])} | "
              f"{ratio(row['vs_stock_explanations'])} | {row['errors']} |")
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
