#!/usr/bin/env bash
# Print the inference token of the server started from this checkout (from its key_file.json).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' "$ROOT/key_file.json"
