#!/usr/bin/env python3
"""What a new pod's compiled worker saves with the kernels shipped to it, by mechanism.

The default model archived compiled (channels-last, not frozen, compiled at load), then its
pipeline built three times, each in a new process with a fresh HOME, TMPDIR and cache folder,
like a new pod:

  cold              nothing shipped: inductor compiles every graph of batch sizes 1/2/4/8
  mega-cache        torch.compiler.load_cache_artifacts() of what the cold run saved with
                    torch.compiler.save_cache_artifacts(), before compiling
  inductor folder   the cold run's inductor cache folder copied into the new cache folder
                    before compiling (what gradcam-archive --ship-kernels ships)

Prints seconds to a compiled pipeline and writes bench_results/kernel_cache.json.

  .venv/bin/python scripts/bench/bench_kernel_cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from devkit.tslocal import ROOT

_CHILD = r"""
import json, shutil, sys, time
started = time.perf_counter()
import torch
from handler.pipeline import Archive, Pipeline
folder, mode, blob, cache_copy = sys.argv[1:5]
if mode == "mega-cache":
    torch.compiler.load_cache_artifacts(open(blob, "rb").read())
built = time.perf_counter()
pipeline = Pipeline(Archive.from_dir(folder), "cpu")
seconds = time.perf_counter() - built
if mode == "cold":
    data, _ = torch.compiler.save_cache_artifacts()
    open(blob, "wb").write(data)
    shutil.copytree(pipeline.compiled.cache, cache_copy)
print(json.dumps({"pipeline_s": round(seconds, 1), "process_s": round(time.perf_counter() - started, 1),
                  "compiled": pipeline.compiled is not None}))
"""


def _pod(root: Path, name: str, folder: Path, mode: str, blob: Path, cache_copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME"):
        (root / name / key.lower()).mkdir(parents=True)
        env[key] = str(root / name / key.lower())
    if mode == "inductor folder":
        shutil.copytree(cache_copy, Path(env["XDG_CACHE_HOME"]) / "gradcam-serve" / "inductor")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), mode, str(blob), str(cache_copy)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "kernel_cache.json")
    args = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="kernel-cache-") as tmp:
        tmp = Path(tmp)
        print("[kernels] building the compiled default archive", flush=True)
        subprocess.run([sys.executable, "-m", "handler.tools.archive", "-q", "--name", "lite0", "--export-path",
                        str(tmp), "--compile", "on", "--channels-last", "on", "--compile-freeze", "off",
                        "--compile-start", "load"], cwd=ROOT, check=True)
        folder = tmp / "lite0"
        with zipfile.ZipFile(tmp / "lite0.mar") as mar:
            mar.extractall(folder)
        blob, cache_copy = tmp / "mega-cache.bin", tmp / "inductor-copy"
        for mode in ("cold", "mega-cache", "inductor folder"):
            print(f"[kernels] new pod: {mode}", flush=True)
            rows[mode] = _pod(tmp, mode.replace(" ", "_"), folder, mode, blob, cache_copy)
            print(f"[kernels]   compiled pipeline in {rows[mode]['pipeline_s']} s", flush=True)
        rows["mega-cache"]["bytes"] = blob.stat().st_size
        rows["inductor folder"]["bytes"] = sum(f.stat().st_size for f in cache_copy.rglob("*") if f.is_file())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    summary = {"model": "efficientnet_lite0", "cpus": os.cpu_count(), "commit": commit.stdout.strip(), "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(summary, indent=2))
    cold = rows["cold"]["pipeline_s"]
    print(f"\nnew pod, default model compiled at load (batch sizes 1/2/4/8), {os.cpu_count()} CPUs, "
          f"commit {summary['commit']}\n")
    print("| shipped to the pod | size | compiled pipeline | vs cold |")
    print("| --- | --- | --- | --- |")
    for mode, row in rows.items():
        size = f"{row['bytes'] / 1e6:.1f} MB" if "bytes" in row else "-"
        print(f"| {mode} | {size} | {row['pipeline_s']} s | {row['pipeline_s'] / cold:.2f}x |")
    print(f"\nJSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
