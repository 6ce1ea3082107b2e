#!/usr/bin/env bash
# The compiled serve path on a lent GPU (issue 16), as a second device call after gpu_check.sh:
# its CUDA tests (tests/test_compiled.py -k gpu), then torch.compile's default mode, reduce-overhead (CUDA graphs) and max-autotune against the eager
# engine at batch 1, 8 and 64 (fp32), then bf16 with compile at batch 64. Tables and JSON go to
# $OUT (the device tool's return folder) or bench_results/gpu/.
#   command: bash scripts/gpu_compile_check.sh      carry: [".gpu"]      timeout_s: 600
# max-autotune compiles for minutes: it runs last, at batch 64 only. A mode the pass cannot run
# under drops its rows with a warning (bench_cam.py) instead of ending the run.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
out="${OUT:-bench_results/gpu}"
mkdir -p "$out"
say() { printf '[gpu-compile] %s\n' "$*" | tee -a "$out/compile_summary.txt" >&2; }
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-site .gpu/wheels/*.whl || { say "installing .gpu/wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/gpu-site:$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
fi
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
say "exit status $status"
exit $status
