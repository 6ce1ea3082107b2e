#!/usr/bin/env bash
# Make .venv and Java ready for the README commands; idempotent and quiet when nothing changed.
#   scripts/ops/bootstrap.sh          serving dependencies
#   scripts/ops/bootstrap.sh test     plus test/bench extras (captum, grad-cam, torchcam, pytest)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
EXTRA="${1:-}"

say() { printf '[bootstrap] %s\n' "$*" >&2; }

# Java 17+: TorchServe's frontend is a Java server.
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "Java missing: installing openjdk-17-jre-headless with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    say "TorchServe needs Java 17 or newer: install a JRE 17 (e.g. 'sudo apt-get install openjdk-17-jre-headless') and rerun"
    exit 1
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

# Requirements come from pyproject.toml; a stamp of it skips pip when nothing changed.
REQ=".venv/requirements${EXTRA:+-$EXTRA}.txt"
.venv/bin/python - "$EXTRA" > "$REQ.new" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(project["dependencies"])
if sys.argv[1]:
    deps += project["optional-dependencies"][sys.argv[1]]
print("\n".join(deps))
PYEOF
# uv installs the same pins, under pip's own settings (its indexes, find-links and constraints,
# read from `pip config list` below), in about a fifth of pip's time: torch's wheel alone keeps
# pip busy for a minute. pip installs them when uv cannot be had or fails.
UV_VERSION=0.13.9
install_pins() {
  if [ ! -x .venv/bin/uv ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >/dev/null 2>&1 || true
  fi
  if [ -x .venv/bin/uv ]; then
    local args=()
    mapfile -t args < <(.venv/bin/python - <<'PYEOF'
import shlex, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
rank = {":env:": 3, "install": 2, "global": 1}
settings: dict[str, tuple[int, str]] = {}
for line in listed.splitlines():
    key, _, value = line.partition("=")
    scope, _, name = key.rpartition(".")
    value = " ".join(shlex.split(value))
    if rank.get(scope, 0) >= settings.get(name, (0, ""))[0]:
        settings[name] = (rank.get(scope, 0), value)
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
args = [a for name, flag in flags.items() if name in settings for v in settings[name][1].split() for a in (flag, v)]
args += ["--index-strategy", "unsafe-best-match"]  # as pip: the best version from any index
if "cert" in settings:
    args.append("--native-tls")  # the system's certificates, as pip's cert setting points at them
print("\n".join(args))
PYEOF
)
    # --compile-bytecode: the .pyc files, written once here. uv writes none by default (pip does),
    # and where PYTHONDONTWRITEBYTECODE is set no process writes them later either: every process
    # would compile torch's, torchvision's and timm's sources again at import, 7 CPU-s each.
    if .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python "${args[@]}" -r "$1"; then
      return 0
    fi
    say "uv could not install them: installing with pip"
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$1"
}

if ! cmp -s "$REQ.new" "$REQ"; then
  say "installing pinned packages into .venv (under a minute with uv here, bytecode included; a few minutes with pip)"
  install_pins "$REQ.new"
  mv "$REQ.new" "$REQ"
else
  rm -f "$REQ.new"
fi

# The project itself, editable: the console entry points (gradcam-archive, gradcam-explain,
# gradcam-grpc, gradcam-kserve) and the devkit package. Again whenever pyproject.toml changes.
if ! cmp -s pyproject.toml .venv/pyproject.installed || [ ! -x .venv/bin/gradcam-archive ]; then
  say "installing the project (editable) into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  cp pyproject.toml .venv/pyproject.installed
fi

# tests/test_compat.py has TorchServe install an archive's requirements.txt with no network:
# TorchServe's per-model venv starts with Python 3.11's bundled setuptools, older than torch
# declares, so pip needs a setuptools wheel at hand (the version this venv has).
if [ "$EXTRA" = test ]; then
  SETUPTOOLS="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("setuptools"))')"
  if ! ls .venv/wheelhouse/setuptools-"$SETUPTOOLS"-*.whl >/dev/null 2>&1; then
    say "downloading setuptools $SETUPTOOLS into .venv/wheelhouse for the offline dependency-install test"
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d .venv/wheelhouse "setuptools==$SETUPTOOLS"
  fi
fi
