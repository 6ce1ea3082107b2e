#!/usr/bin/env bash
# Stop the TorchServe (scripts/ops/serve.sh) and the KServe predictor (scripts/ops/serve_kserve.sh) started
# from this checkout, and no other.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
RUN_DIR="$(scripts/ops/run_dir.sh)"
# The KServe predictor (scripts/ops/serve_kserve.sh): SIGTERM, which finishes the requests in flight.
if [ -f "$RUN_DIR/kserve.pid" ]; then
  pid="$(cat "$RUN_DIR/kserve.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    echo "[stop] stopping the KServe predictor (pid $pid)" >&2
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$RUN_DIR/kserve.pid"
fi
if [ ! -f "$RUN_DIR/.model_server.pid" ]; then
  echo "[stop] no TorchServe started from $ROOT is running" >&2
  exit 0
fi
TEMP="$RUN_DIR" TMPDIR="$RUN_DIR" .venv/bin/torchserve --stop --foreground
