"""Shared fixtures: archives built by handler/tools/archive.py and one real TorchServe serving them."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

# Several torch processes share the cores while the suite runs (pytest-xdist workers,
# the servers' workers, background compiles). OpenMP threads that spin while they wait at a
# barrier burn the cores the others need: two 2-thread processes on 2 cores run at half the
# throughput they have with passive waiting. Set before torch loads OpenMP; inherited by every
# process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Inductor compiles its C++ kernels in a pool of subprocesses, each importing torch (seconds of CPU
# per compiling process: 47.9 -> 38.7 CPU-s for a small cold compile without the pool). The suite
# starts dozens of compiling processes on 2 cores, where the pool buys no wall time.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

from devkit.tslocal import LocalServer  # noqa: E402

DEFAULT = "efficientnet_lite0"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def doc_pages() -> list[Path]:
    """The README and every page under docs/: where users are told what to run."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_blocks() -> dict[str, str]:
    """The bash blocks marked ``<!-- readme-test: NAME -->`` in the README and docs/, by name."""
    blocks: dict[str, str] = {}
    for page in doc_pages():
        for name, block in re.findall(r"<!-- readme-test: (\S+) -->\n```bash\n(.*?)```", page.read_text(), flags=re.S):
            assert name not in blocks, f"readme-test block {name!r} is defined twice ({page.name})"
            blocks[name] = block
    return blocks


# Archives the tests build serve eager unless a test is about compiling (tests/test_compiled.py):
# the archiver's default, --compile auto, times a compiled pass on every build, and a compiled
# worker compiles at every load.
EAGER = ("--compile", "off", "--channels-last", "off")


def run_archiver(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run handler/tools/archive.py as a user would, from the repo root (eager unless ``--compile`` is given)."""
    if not any(a.startswith(("--compile", "--channels-last", "--help")) for a in args):
        args = (*args, *EAGER)
    done = subprocess.run([sys.executable, "-m", "handler.tools.archive", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"archive.py {' '.join(args)} failed:\n{done.stderr}")
    return done


def make_weights(folder: Path) -> dict[str, Path]:
    """Seeded random weights in the formats users bring (nested, DataParallel prefix...)."""
    import timm
    import torchvision
    from support.tinynet import tinynet_class

    TinyNet = tinynet_class()  # noqa: N806

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    resnet = torchvision.models.resnet18(num_classes=10).state_dict()
    paths["resnet18"] = folder / "resnet18_10.pth"  # as saved from DataParallel, nested
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in resnet.items()}},
               paths["resnet18"])
    from safetensors.torch import save_file

    mobilenet = timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict()
    paths["mobilenet"] = folder / "mobilenetv3_small_050.safetensors"
    save_file({k: v.contiguous() for k, v in mobilenet.items()}, str(paths["mobilenet"]))
    paths["tinynet"] = folder / "tinynet.pt"
    torch.save(TinyNet(num_classes=3).state_dict(), paths["tinynet"])
    labels = {str(i): f"digit {i}" for i in range(10)}
    paths["labels10"] = folder / "labels10.json"
    paths["labels10"].write_text(json.dumps(labels))
    return paths


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> dict[str, Path]:
    return make_weights(tmp_path_factory.mktemp("weights"))


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder of this test run that every pytest-xdist worker of the run sees under one path
    (``pytest -n 2``): the run's base temporary folder, above each worker's own."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    folder.mkdir(exist_ok=True)
    return folder


@contextmanager
def built_once(folder: Path):
    """Yield True to the one process of the run that must build ``folder``'s contents, False to
    the others, which wait under the lock until it has (or fail if its build failed)."""
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (folder / ".failed").exists():
                pytest.fail(f"building {folder} failed in another pytest worker")
            if (folder / ".done").exists():
                yield False
                return
            try:
                yield True
            except BaseException:
                (folder / ".failed").touch()
                raise
            (folder / ".done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# The order pytest-xdist workers (pytest -n 2 --dist loadfile --no-loadscope-reorder) take the test
# files in: the longest first, so that neither is left with a long file at the end (measured cold,
# docs/log.md); the rest follow in their own order.
LONGEST_FIRST = ("test_compiled_processes.py", "test_readme.py", "test_compiled.py", "test_deploy.py",
                 "test_compiled_workers.py", "test_families.py", "test_archive.py",
                 "test_compat.py", "test_protocols.py", "test_explain.py", "test_kserve.py",
                 "test_ground_truth.py", "test_loadtest.py", "test_layouts.py", "test_cam.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order is kept


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, weights) -> Path:
    """The default archive plus one per model source, built in parallel by the archiver, once
    per test run (the first pytest worker to need them builds them; the others wait)."""
    store = shared_dir(tmp_path_factory, "model_store")
    with built_once(store) as build:
        if build:
            _build_model_store(store, weights)
    return store


def _build_model_store(store: Path, weights: dict[str, Path]) -> None:
    builds = {
        DEFAULT: [],
        "resnet18_10": ["--model", "torchvision:resnet18", "--num-classes", "10",
                        "--weights", str(weights["resnet18"]), "--labels", str(weights["labels10"]),
                        "--name", "resnet18_10"],
        "mobilenetv3": ["--model", "timm:mobilenetv3_small_050", "--weights", str(weights["mobilenet"]),
                        "--name", "mobilenetv3", "--outputs", "map,heatmap"],
        "tinynet": ["--model", f"{DATA / 'tinynet' / 'model.py'}:TinyNet", "--num-classes", "3",
                    "--weights", str(weights["tinynet"]),
                    "--labels", str(DATA / "tinynet" / "index_to_name.json"),
                    "--name", "tinynet", "--input-size", "64"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "handler.tools.archive", "-q", "--export-path", str(store), *args, *EAGER],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in builds.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"building {name} failed:\n{err}"


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory):
    """One real TorchServe on free loopback ports serving every archive of the session."""
    models = sorted(p.name for p in model_store.glob("*.mar"))
    with LocalServer(model_store, models, tmp_path_factory.mktemp("server")) as srv:
        yield srv


def photo(name: str) -> bytes:
    return (DATA / name).read_bytes()


def peak(grid: list[list[float]]) -> tuple[int, int]:
    """(row, col) of a low-res map's maximum."""
    flat = [(v, r, c) for r, row in enumerate(grid) for c, v in enumerate(row)]
    _, r, c = max(flat)
    return r, c


def encode_image(image, fmt: str = "PNG", **params) -> bytes:
    """A Pillow image encoded in ``fmt`` (save parameters as Pillow takes them)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def png() -> bytes:
    """An 8x6 PNG, red but for one pixel (10, 20, 30) at (3, 2)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((6, 8, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[2, 3] = (10, 20, 30)
    return encode_image(Image.fromarray(pixels))
