#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (its time is short):
#   1. the CUDA tests: tests/test_cam_cuda.py, tests/test_images_cuda.py (nvJPEG decode and
#      encode routes) and the handler's GPU test in tests/test_handler.py
#   2. the engine benchmark on the GPU: scripts/bench_cam.py (batch 64, 224x224; table + JSON)
#   3. the decode benchmarks: scripts/bench_gpu_decode.py (handler throughput with 12 MP and small
#      photos at batch 8/32/64, GPU decode route vs CPU route; torchvision vs TorchCodec nvJPEG) and
#      scripts/bench_decode.py (CPU decode threads 0/2/4/8, on the machine's idle cores)
# Results go to $OUT (the device tool's return folder) or bench_results/gpu/.
# Prepare here first (scripts/gpu_prepare.sh), then call the device tool with
#   command: bash scripts/gpu_check.sh      carry: [".gpu"]      timeout_s: 600
# Extra arguments go to bench_cam.py (e.g. --iters 10). Without a GPU it runs the same steps on
# the CPU (the CUDA tests skip), which checks the script itself.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
out="${OUT:-bench_results/gpu}"
mkdir -p "$out"
say() { printf '[gpu-check] %s\n' "$*" | tee -a "$out/summary.txt" >&2; }
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
export PYTHONUNBUFFERED=1

if [ -d .gpu/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-site .gpu/wheels/*.whl || { say "installing .gpu/wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/gpu-site:$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | tee "$out/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee -a "$out/gpu.txt"

if [ "${GPU_CHECK_STEP:-}" = compile ]; then  # scripts/gpu_compile_check.sh: the second device call
  status=0
  say "CUDA tests of the compiled pass"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_compiled.py -k gpu 2>&1 | tee "$out/compile_tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  run() {  # mode batch precision
    local tag="${1:-default}_b$2_$3"
    say "compile mode ${1:-default}, batch $2, $3"
    "$PY" scripts/bench_cam.py --models tf_efficientnet_lite0,resnet50 --multi-models '' \
      --rows plain,engine_fp32,engine_bf16,engine_compiled,engine_compiled_cl --batch "$2" --iters 20 --warmup 3 \
      --compile-mode "$1" --variant-precision "$3" --json-out "$out/compile_$tag.json" 2>&1 \
      | tee "$out/compile_$tag.log" || status=1
  }
  for mode in "" reduce-overhead; do
    for batch in 1 8 64; do run "$mode" "$batch" fp32; done
  done
  run "" 64 bf16
  run max-autotune 64 fp32
  say "compile check exit status $status"
  exit $status
fi

say "CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cam_cuda.py tests/test_images_cuda.py tests/test_handler.py 2>&1 \
  | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
say "CUDA tests exit status $tests"

say "engine benchmark"
"$PY" scripts/bench_cam.py --json-out "$out/bench_cam.json" "$@" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
say "benchmark exit status $bench"

say "decode benchmark"
"$PY" scripts/bench_gpu_decode.py --json-out "$out/bench_gpu_decode.json" 2>&1 | tee "$out/bench_decode.log"
decode=${PIPESTATUS[0]}
# The CPU route's threads on a machine with idle cores (this one has 2, shared: no win measurable).
"$PY" scripts/bench_decode.py --threads 0 2 4 8 --json-out "$out/bench_decode_threads.json" 2>&1 \
  | tee -a "$out/bench_decode.log" || decode=1
[ "$decode" = 2 ] && ! command -v nvidia-smi >/dev/null && decode=0  # no GPU: nothing to measure
say "decode benchmark exit status $decode"
exit $(( tests != 0 || bench != 0 || decode != 0 ))
