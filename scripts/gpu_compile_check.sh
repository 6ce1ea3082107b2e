#!/usr/bin/env bash
# The compiled serve path on a lent GPU (issue 16), as a second device call after gpu_check.sh:
# its CUDA tests (tests/test_compiled.py -k gpu), then torch.compile's default mode and
# reduce-overhead (CUDA graphs) against the eager engine at batch 1, 8 and 64 (fp32), bf16 with
# compile at batch 64, and max-autotune at batch 64 last (it compiles for minutes). A mode the
# pass cannot run under drops its rows with a warning (bench_cam.py) instead of ending the run.
# Tables and JSON go to $OUT (the device tool's return folder) or bench_results/gpu/.
#   command: bash scripts/gpu_compile_check.sh      carry: [".gpu"]      timeout_s: 600
GPU_CHECK_STEP=compile exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_check.sh"
