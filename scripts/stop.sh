#!/usr/bin/env bash
# Stop the TorchServe that scripts/serve.sh started from this checkout (and no other).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN_DIR="$(scripts/run_dir.sh)"
if [ ! -f "$RUN_DIR/.model_server.pid" ]; then
  echo "[stop] no TorchServe started from $ROOT is running" >&2
  exit 0
fi
TEMP="$RUN_DIR" TMPDIR="$RUN_DIR" .venv/bin/torchserve --stop --foreground
