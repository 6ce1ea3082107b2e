#!/usr/bin/env bash
# Serve the default model: set up .venv, build the default archive when missing, start
# TorchServe with config.properties, wait until the model answers, print how to call it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-efficientnet_lite0}"
say() { printf '[serve] %s\n' "$*" >&2; }

scripts/bootstrap.sh
if [ ! -f "model_store/$MODEL.mar" ]; then
  say "building model_store/$MODEL.mar"
  .venv/bin/python scripts/archive.py --name "$MODEL"
fi

# TorchServe keeps its pid file and worker sockets in $TEMP/$TMPDIR: a private, short
# directory keeps this server apart from any other TorchServe on the machine, and lets
# scripts/stop.sh stop exactly this one.
RUN_DIR="$(scripts/run_dir.sh)"
mkdir -p "$RUN_DIR"
export TEMP="$RUN_DIR" TMPDIR="$RUN_DIR"
PATH="$ROOT/.venv/bin:$PATH"

addr() { sed -n "s/^$1=//p" config.properties; }
INFERENCE="$(addr inference_address)"
if [ -f key_file.json ] && curl -sf --max-time 5 -o /dev/null -H "Authorization: Bearer $(scripts/token.sh)" "$INFERENCE/ping" 2>/dev/null; then
  say "a TorchServe already answers on $INFERENCE (scripts/stop.sh stops the one started here)"
  exit 1
fi

say "starting TorchServe ($INFERENCE), logs in $ROOT/logs"
torchserve --start --ts-config config.properties --model-store model_store --ncs >/dev/null

for _ in $(seq 1 180); do
  if [ -f key_file.json ]; then
    status="$(curl -s --max-time 5 -H "Authorization: Bearer $(scripts/token.sh)" "$INFERENCE/ping" || true)"
    case "$status" in *'"Healthy"'*) break ;; esac
  fi
  sleep 1
done
case "${status:-}" in
  *'"Healthy"'*) ;;
  *) say "TorchServe did not become healthy in 180 s; see logs/ts_log.log and logs/model_log.log"; exit 1 ;;
esac
say "healthy: $MODEL is served at $INFERENCE/predictions/$MODEL"
cat >&2 <<TXT
[serve] try it:
  TOKEN=\$(scripts/token.sh)
  curl -s -H "Authorization: Bearer \$TOKEN" -T tests/data/chelsea.jpg $INFERENCE/predictions/$MODEL
[serve] stop it: scripts/stop.sh
TXT
