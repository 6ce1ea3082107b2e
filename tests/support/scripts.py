"""Scripts that are not modules of an installed package (deploy/entrypoint.py, the load and fault
tests under scripts/load/), imported by path for the tests that call their functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script(relative: str):
    """The script at ``ROOT/relative`` as a module (imported once, named after its file)."""
    path = ROOT / relative
    name = f"_script_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
