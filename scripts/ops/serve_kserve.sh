#!/usr/bin/env bash
# Serve the default archive on KServe's own Python model server (handler/kserve_server.py), on
# loopback: REST v1 and v2 on 127.0.0.1:8085, gRPC v2 on 127.0.0.1:8086. No Java needed.
#   scripts/ops/serve_kserve.sh              the default model (built on first use)
#   scripts/ops/serve_kserve.sh NAME         model_store/NAME.mar
# scripts/ops/stop.sh (make stop) stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEFAULT=efficientnet_lite0
# The default model's speed options as the archiver's timing chose them on CPUs (compiled,
# channels-last, backbone not frozen), given here so that a fresh clone skips that minute of
# timing; the worker compiles in the background and answers from the first second meanwhile.
DEFAULT_SPEED="--compile on --channels-last on --compile-freeze off"
MODEL="${1:-$DEFAULT}"
HTTP_PORT="${KSERVE_HTTP_PORT:-8085}"
GRPC_PORT="${KSERVE_GRPC_PORT:-8086}"
say() { printf '[serve-kserve] %s\n' "$*" >&2; }

scripts/ops/bootstrap.sh
mar="model_store/$MODEL.mar"
if [ "$MODEL" = "$DEFAULT" ] && { [ ! -f "$mar" ] ||
    [ -n "$(find handler handler/tools/archive.py handler/tools/archive_tuning.py -newer "$mar" -name '*.py' 2>/dev/null | head -1)" ]; }; then
  say "building $mar"
  .venv/bin/gradcam-archive --name "$MODEL" --force $DEFAULT_SPEED
elif [ ! -f "$mar" ]; then
  say "$mar does not exist: build it with .venv/bin/gradcam-archive --name $MODEL ... (see --help)"
  exit 1
fi

RUN_DIR="$(scripts/ops/run_dir.sh)"
mkdir -p "$RUN_DIR" logs
PID_FILE="$RUN_DIR/kserve.pid"
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  say "the KServe predictor from this checkout is already running (pid $(cat "$PID_FILE")): make stop first"
  exit 1
fi
if curl -s --max-time 5 -o /dev/null "http://127.0.0.1:$HTTP_PORT/"; then
  say "something already listens on 127.0.0.1:$HTTP_PORT: stop it, or set KSERVE_HTTP_PORT"
  exit 1
fi
say "starting the KServe predictor for $mar, log in $ROOT/logs/kserve.out"
nohup .venv/bin/python -m handler.kserve_server "$mar" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --workdir "$RUN_DIR/archives" >logs/kserve.out 2>&1 &
echo $! >"$PID_FILE"
for i in $(seq 1 600); do
  if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    say "the predictor exited; see logs/kserve.out:"; tail -20 logs/kserve.out >&2; rm -f "$PID_FILE"; exit 1
  fi
  case "$(curl -s --max-time 2 "http://127.0.0.1:$HTTP_PORT/v2/health/ready" || true)" in
    *'"ready":true'*) break ;;
  esac
  [ $((i % 30)) = 0 ] && say "still loading ($i s; a compiled archive compiles at load)"
  sleep 1
done
say "ready: http://127.0.0.1:$HTTP_PORT/v1/models/$MODEL:predict, .../v2/models/$MODEL/infer, gRPC 127.0.0.1:$GRPC_PORT"
say "stop it: make stop"
