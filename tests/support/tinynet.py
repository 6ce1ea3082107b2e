"""The tiny seeded CNN of tests/data/tinynet/model.py, loaded from its file as an archive's
``model_src/model.py`` is."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MODEL_PY = Path(__file__).resolve().parent.parent / "data" / "tinynet" / "model.py"


def tinynet_class() -> type:
    """The ``TinyNet`` class."""
    spec = importlib.util.spec_from_file_location("tinynet_model", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyNet
