#!/usr/bin/env bash
# The private temp directory of the server started from this checkout (short: it holds
# unix socket paths, which are limited to about 100 characters).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
echo "/tmp/gradcam-serve-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
