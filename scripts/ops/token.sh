#!/usr/bin/env bash
# Print a key of the server started from this checkout, read from its key_file.json:
#   scripts/ops/token.sh             the inference key (Authorization: Bearer <key>)
#   scripts/ops/token.sh management  the management key
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["key"])' \
  "$ROOT/key_file.json" "${1:-inference}"
