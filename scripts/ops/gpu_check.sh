#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (a session has 15 minutes of device time, the
# machine's start included, so this is one call of at most ~9 minutes, steps in order of need):
#   1. tests: the CUDA tests (tests/test_cam_cuda.py; tests/test_images_cuda.py, the nvJPEG decode
#      and encode routes; the handler's GPU test; the compiled pass's GPU test)
#   2. decode (issue 12): scripts/bench/bench_gpu_decode.py (handler throughput with 12 MP and small
#      photos at batch 8/32/64, GPU decode route vs CPU route; torchvision vs TorchCodec nvJPEG)
#   3. compile (issue 16): scripts/bench/bench_cam.py, the eager engine against torch.compile's default
#      mode and reduce-overhead (CUDA graphs) at batch 1, 8 and 64; bf16 with compile. A mode the
#      pass cannot run under drops its rows with a warning (bench_cam.py) instead of ending the run.
#   4. served: bench_gpu_decode.py --compile-mode reduce-overhead, the handler in process as a GPU
#      worker serves a `--compile on --compile-mode reduce-overhead` archive (buckets 1..8)
#   5. engine: bench_cam.py at batch 64 against the CAM libraries.
#   6. threads: scripts/bench/bench_decode.py, CPU decode threads 0/2/4/8 on the machine's idle cores.
#   7. autotune: max-autotune at batch 64 (it compiled for over 210 s on an H200).
# Each step has a time budget (seconds; GPU_BUDGET_<STEP> overrides it) and is skipped when the
# time left (GPU_CHECK_SECONDS, default 540, counted from the start) does not cover its minimum.
# GPU_CHECK_STEPS picks steps (default "tests decode compile served engine threads autotune"; the
# first GPU session, 2026-11-27, ran tests, decode and compile: docs/performance.md has its figures, so the
# next one may run GPU_CHECK_STEPS="tests served engine threads autotune"). After every step, all logs,
# tables and JSON are packed into $OUT/gpu_results.tar.gz (the device tool returns at most 8
# files) beside $OUT/summary.txt; without $OUT they stay in bench_results/gpu/.
# Prepare here first (scripts/ops/gpu_prepare.sh), then call the device tool with
#   command: bash scripts/ops/gpu_check.sh      carry: [".gpu"]      timeout_s: 600
# Without a GPU it runs the same steps on the CPU (the CUDA tests skip), which checks the script:
#   GPU_CHECK_SECONDS=120 GPU_CHECK_QUICK=1 bash scripts/ops/gpu_check.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
start=$SECONDS
total="${GPU_CHECK_SECONDS:-540}"
steps="${GPU_CHECK_STEPS:-tests decode compile served engine threads autotune}"
quick="${GPU_CHECK_QUICK:-}"  # tiny iterations: a check of this script, no figures
work="bench_results/gpu"
rm -rf "$work"
mkdir -p "$work"
say() { printf '[gpu-check %4ds] %s\n' "$((SECONDS - start))" "$*" | tee -a "$work/summary.txt" >&2; }
pack() {
  [ -n "${OUT:-}" ] || return 0
  tar -czf "$OUT/gpu_results.tar.gz.tmp" -C bench_results gpu && mv "$OUT/gpu_results.tar.gz.tmp" "$OUT/gpu_results.tar.gz"
  cp "$work/summary.txt" "$OUT/summary.txt"
}
left() { echo $(( total - (SECONDS - start) )); }
# run_step NAME MIN_SECONDS BUDGET_SECONDS LOG COMMAND...: COMMAND under `timeout`, its output in
# $work/LOG; skipped with less than MIN_SECONDS left; never more than the time left.
status=0
run_step() {
  local name=$1 min=$2 budget=$3 log=$4
  shift 4
  local have
  have=$(left)
  if [ "$have" -lt "$min" ]; then
    say "$name: skipped, ${have}s left (needs ${min}s)"
    status=1
    return 1
  fi
  [ "$budget" -gt "$have" ] && budget=$have
  say "$name (at most ${budget}s)"
  timeout -k 5 "$budget" "$@" >>"$work/$log" 2>&1
  local rc=$?
  [ $rc = 124 ] && say "$name: stopped at its ${budget}s budget"
  say "$name: exit status $rc"
  [ $rc = 0 ] || status=1
  pack
  return $rc
}
want() { [[ " $steps " == *" $1 "* ]]; }
budget() { local var="GPU_BUDGET_$1"; echo "${!var:-$2}"; }

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ] && command -v nvidia-smi >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-site .gpu/wheels/*.whl || say "installing .gpu/wheels failed"
  export PYTHONPATH="/tmp/gpu-site:$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  >"$work/gpu.txt" 2>&1
"$PY" -c 'import os, torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__,
          "timm", timm.__version__, "cpus", os.cpu_count(), "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' >>"$work/gpu.txt" 2>&1
say "$(tr '\n' ' ' <"$work/gpu.txt")"
pack

if want tests; then
  run_step tests 60 "$(budget TESTS 150)" tests.log "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_cam_cuda.py tests/test_images_cuda.py \
    tests/test_handler.py::test_on_a_gpu_the_answers_equal_the_cpu_answers \
    tests/test_compiled.py::test_on_a_gpu_compiled_maps_equal_eager \
    tests/test_compiled.py::test_a_gpu_worker_with_cuda_graphs_answers_as_the_eager_gpu_worker
  tail -n 3 "$work/tests.log" | sed 's/^/    /' >&2
fi

if want decode; then
  if [ -n "$quick" ]; then dec=(--allow-cpu --batches 2 --rounds 1); else dec=(); fi
  run_step decode 40 "$(budget DECODE 90)" decode.log \
    "$PY" scripts/bench/bench_gpu_decode.py "${dec[@]}" --json-out "$work/bench_gpu_decode.json"
fi

if want compile; then
  # One bench_cam.py run: mode batch precision models rows
  compile_run() {
    local mode=$1 batch=$2 precision=$3 models=$4 rows=$5 min=$6 cap=$7
    local tag="compile_${mode:-default}_b${batch}_${precision}"
    local iters=(--iters 20 --warmup 3)
    [ -n "$quick" ] && iters=(--iters 1 --warmup 1)
    run_step "$tag ($models)" "$min" "$cap" "$tag.log" "$PY" scripts/bench/bench_cam.py --models "$models" \
      --multi-models '' --rows "$rows" --batch "$batch" "${iters[@]}" --compile-mode "$mode" \
      --variant-precision "$precision" --json-out "$work/$tag.json"
  }
  lite=tf_efficientnet_lite0
  both=tf_efficientnet_lite0,resnet50
  [ -n "$quick" ] && both=$lite
  compile_run "" 64 fp32 "$both" plain,engine_fp32,engine_compiled 60 130
  compile_run reduce-overhead 64 fp32 "$both" plain,engine_fp32,engine_compiled 60 120
  for batch in 1 8; do
    compile_run "" "$batch" fp32 "$lite" plain,engine_fp32,engine_compiled 40 60
    compile_run reduce-overhead "$batch" fp32 "$lite" plain,engine_fp32,engine_compiled 40 60
  done
  compile_run "" 64 bf16 "$lite" plain,engine_bf16,engine_compiled,engine_compiled_cl 50 90
fi

if want served; then
  if [ -n "$quick" ]; then srv=(--allow-cpu --compile-mode default --batches 2 --rounds 1); else
    srv=(--compile-mode reduce-overhead --batches 8 --rounds 5); fi
  run_step served 60 "$(budget SERVED 150)" served.log \
    "$PY" scripts/bench/bench_gpu_decode.py "${srv[@]}" --json-out "$work/bench_served_reduce_overhead.json"
fi

if want engine; then
  if [ -n "$quick" ]; then eng=(--iters 1 --warmup 1 --models resnet18 --multi-models ''); else eng=(); fi
  run_step engine 90 "$(budget ENGINE 240)" engine.log "$PY" scripts/bench/bench_cam.py "${eng[@]}" \
    --rows plain,engine_fp32,engine_bf16,engine_channels_last,pytorch-grad-cam,captum,torchcam \
    --json-out "$work/bench_cam.json"
fi

if want threads; then
  # 30 s ran 4 of 7 rounds on the H200 machine: the full-decode rows of 12 MP photos are slow.
  if [ -n "$quick" ]; then thr=(--threads 0 2 --rounds 1); else thr=(--threads 0 2 4 8 --rounds 3); fi
  run_step decode-threads 30 "$(budget THREADS 60)" decode_threads.log \
    "$PY" scripts/bench/bench_decode.py "${thr[@]}" --json-out "$work/bench_decode_threads.json"
fi

if want autotune; then
  if [ -n "$quick" ]; then at=(--iters 1 --warmup 1 --batch 2); else at=(--iters 20 --warmup 3 --batch 64); fi
  run_step "compile_max-autotune" 120 "$(budget AUTOTUNE 300)" compile_max-autotune.log \
    "$PY" scripts/bench/bench_cam.py --models tf_efficientnet_lite0 --multi-models '' \
    --rows plain,engine_fp32,engine_compiled "${at[@]}" --compile-mode max-autotune \
    --json-out "$work/compile_max-autotune.json"
fi

say "done in $((SECONDS - start))s, exit status $status"
pack
exit $status
