#!/usr/bin/env python3
"""Load-test a served model with locust: ``.venv/bin/python scripts/load/loadtest.py --help``.

The load generator itself is :mod:`devkit.loadtest` (the benchmarks drive it too).
"""

import sys

from devkit.loadtest import main

if __name__ == "__main__":
    sys.exit(0 if main()["failures"] == 0 else 1)
