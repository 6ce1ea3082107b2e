#!/usr/bin/env bash
# Prepare .gpu/ for scripts/ops/gpu_check.sh on a lent GPU machine (no network there; its image has
# torch, torchvision, timm, pytest, opencv, matplotlib and scikit-learn, but not these):
#   .gpu/wheels/  captum, grad-cam (built here: PyPI has only its sdist), ttach, torchcam,
#                 all pure Python, the versions pyproject.toml pins; and torchcodec, for the
#                 decode benchmark's nvJPEG comparison only (it may not load with the image's torch)
#   .gpu/site/ts  TorchServe's Python package without its 44 MB Java frontend: the handler
#                 tests need its Context, not a server
# .gpu/ is git-ignored; name it in the device tool's `carry`. Run from anywhere:
#   scripts/ops/gpu_prepare.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
say() { printf '[gpu-prepare] %s\n' "$*" >&2; }

scripts/ops/bootstrap.sh test
TORCHCODEC=0.17.0  # not a project dependency: the decode benchmark compares its nvJPEG decoder
pin() { sed -n "s/^ *\"\\($1==[^\"]*\\)\",*$/\\1/p" pyproject.toml; }
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/site
say "wheels: $(pin captum) $(pin grad-cam) $(pin torchcam) ttach"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "$(pin captum)" "$(pin torchcam)" "torchcodec==$TORCHCODEC" \
  "ttach==$(.venv/bin/python -c 'from importlib.metadata import version; print(version("ttach"))')"
.venv/bin/python -m pip wheel -q --no-deps -w .gpu/wheels "$(pin grad-cam)"
ts_dir="$(.venv/bin/python -c 'import os, ts; print(os.path.dirname(ts.__file__))')"
cp -r "$ts_dir" .gpu/site/ts
rm -rf .gpu/site/ts/frontend
find .gpu -name __pycache__ -prune -exec rm -rf {} +
say "ready: $(du -sh .gpu | cut -f1) in .gpu/ ($(ls .gpu/wheels | tr '\n' ' '))"
