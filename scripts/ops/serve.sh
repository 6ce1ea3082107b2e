#!/usr/bin/env bash
# Serve models from model_store with config.properties, on loopback:
#   scripts/ops/serve.sh                      the default model (built on first use)
#   scripts/ops/serve.sh NAME [NAME ...]      these archives (model_store/NAME.mar)
# Sets up .venv, starts TorchServe, waits until every model's worker is ready, prints how to
# call it. scripts/ops/stop.sh stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEFAULT=efficientnet_lite0
# The default model's speed options as the archiver's timing chose them on CPUs (compiled,
# channels-last, backbone not frozen), given here so that a fresh clone skips that minute of
# timing; the worker compiles in the background and answers from the first second meanwhile.
DEFAULT_SPEED="--compile on --channels-last on --compile-freeze off"
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=("$DEFAULT")
say() { printf '[serve] %s\n' "$*" >&2; }

scripts/ops/bootstrap.sh
LOAD=()
for model in "${MODELS[@]}"; do
  mar="model_store/$model.mar"
  if [ "$model" = "$DEFAULT" ] && { [ ! -f "$mar" ] ||
      [ -n "$(find handler handler/tools/archive.py handler/tools/archive_tuning.py -newer "$mar" -name '*.py' 2>/dev/null | head -1)" ]; }; then
    say "building $mar"
    .venv/bin/gradcam-archive --name "$model" --force $DEFAULT_SPEED
  elif [ ! -f "$mar" ]; then
    say "$mar does not exist: build it with .venv/bin/gradcam-archive --name $model ... (see --help)"
    exit 1
  fi
  LOAD+=("$model=$model.mar")
done

# TorchServe keeps its pid file and worker sockets in $TEMP/$TMPDIR: a private, short
# directory keeps this server apart from any other TorchServe on the machine, and lets
# scripts/ops/stop.sh stop exactly this one.
RUN_DIR="$(scripts/ops/run_dir.sh)"
mkdir -p "$RUN_DIR"
export TEMP="$RUN_DIR" TMPDIR="$RUN_DIR"
PATH="$ROOT/.venv/bin:$PATH"

addr() { sed -n "s/^$1=//p" config.properties; }
INFERENCE="$(addr inference_address)"
MANAGEMENT="$(addr management_address)"
if [ -f "$RUN_DIR/.model_server.pid" ] && kill -0 "$(cat "$RUN_DIR/.model_server.pid")" 2>/dev/null; then
  say "TorchServe from this checkout is already running: scripts/ops/stop.sh first"
  exit 1
fi
if curl -s --max-time 5 -o /dev/null "$INFERENCE/ping"; then
  say "something already listens on $INFERENCE: stop it or change the addresses in config.properties"
  exit 1
fi

mkdir -p logs
say "starting TorchServe ($INFERENCE), logs in $ROOT/logs"
torchserve --start --ts-config config.properties --model-store model_store --ncs \
  --models "${LOAD[@]}" >logs/torchserve.out 2>&1

# Ready when every model's worker is: /ping says Healthy before the models have loaded. A
# compiled archive compiles its batch sizes at load (a minute or two on a small CPU the first
# time; its kernels are cached in ~/.cache/gradcam-serve for the next start).
WAIT=600
for model in "${MODELS[@]}"; do
  status=""
  for i in $(seq 1 "$WAIT"); do
    if [ -f key_file.json ]; then
      status="$(curl -s --max-time 5 -H "Authorization: Bearer $(scripts/ops/token.sh management 2>/dev/null)" \
        "$MANAGEMENT/models/$model" || true)"
      case "$status" in *'"status": "READY"'*) break ;; esac
    fi
    [ $((i % 30)) = 0 ] && say "still loading $model ($i s; a compiled archive compiles at its first load)"
    sleep 1
  done
  case "$status" in
    *'"status": "READY"'*) say "ready: $INFERENCE/predictions/$model" ;;
    *) say "$model did not become ready in $WAIT s; see logs/model_log.log and logs/ts_log.log"
       exit 1 ;;
  esac
done
cat >&2 <<TXT
[serve] try it:
  TOKEN=\$(scripts/ops/token.sh)
  curl -s -H "Authorization: Bearer \$TOKEN" -T tests/data/chelsea.jpg $INFERENCE/predictions/${MODELS[0]}
[serve] stop it: scripts/ops/stop.sh
TXT
