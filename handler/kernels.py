"""Compiled kernels shipped inside an archive, so that a new replica skips compiling from scratch.

A compiled worker on a CPU spends most of its start compiling: C++ kernels for every graph of
every batch size (about 90 s for the default model on a 2-core machine, docs/performance.md).
Inductor keeps what it compiled in its cache folder (generated code, the built ``.so`` files,
AOTAutograd's entries), and a worker that finds them there compiles in a third of the time. The
folder is relocatable, so the archiver (``gradcam-archive --ship-kernels``) builds the pipeline
once with a fresh cache folder and puts that folder in the archive as ``compiled_kernels/``,
beside ``compiled_kernels.json``: what the kernels depend on.

A worker installs them into its own cache folder before compiling, only where every key matches
this process: torch version, Python version, device kind (CUDA capability on a GPU) and the CPU's
vector ISA. Anything else gets one log line saying what differs, and the worker compiles as it
would without them. (``torch.compiler.save_cache_artifacts``, the "mega-cache", was measured
too: on a CPU it carries no built ``.so`` and the worker compiled as long as without it.)
Nothing here imports TorchServe.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

__all__ = ["KERNELS", "KEY_FILE", "build_key", "install", "describe"]

logger = logging.getLogger(__name__)

#: The archive's folder of inductor cache entries, and the file naming what they were built for.
KERNELS = "compiled_kernels"
KEY_FILE = "compiled_kernels.json"


def build_key(device_type: str = "cpu") -> dict[str, str]:
    """What compiled kernels depend on, for this process and ``device_type``."""
    import torch

    key = {"torch": torch.__version__, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
           "device": device_type, "cpu_isa": torch.backends.cpu.get_cpu_capability()}
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        key["device"] = f"cuda sm_{major}{minor}"
        key["cuda"] = str(torch.version.cuda)
        try:
            import triton

            key["triton"] = triton.__version__
        except ImportError:
            key["triton"] = ""
    return key


def describe(key: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in key.items())


def install(model_dir: str | Path, cache: str | None, device_type: str = "cpu") -> int | None:
    """Copy the archive's shipped kernels into inductor's ``cache`` folder where they fit.

    Returns:
        The number of files installed; 0 where they do not fit this worker (one warning says
        why); None where the archive ships none or there is no cache folder to put them in.
    """
    folder = Path(model_dir)
    if not (folder / KEY_FILE).is_file() or not (folder / KERNELS).is_dir():
        return None
    if not cache:
        logger.warning("the archive ships compiled kernels but this worker has no writable cache folder: compiling")
        return None
    try:
        shipped = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError) as exc:
        logger.warning("shipped compiled kernels not used: %s unreadable (%s); compiling from scratch", KEY_FILE, exc)
        return 0
    here = build_key(device_type)
    differ = {k: (shipped.get(k), v) for k, v in here.items() if shipped.get(k) != v}
    if differ:
        logger.warning("shipped compiled kernels not used: built for %s; this worker has %s; compiling from scratch",
                       ", ".join(f"{k} {a}" for k, (a, _) in differ.items()),
                       ", ".join(f"{k} {b}" for k, (_, b) in differ.items()))
        return 0
    shutil.copytree(folder / KERNELS, cache, dirs_exist_ok=True)
    count = sum(1 for p in (folder / KERNELS).rglob("*") if p.is_file())
    logger.info("installed %d shipped compiled kernel files (%s) into %s", count, describe(here), cache)
    return count


def _build(folder: str, out: str) -> None:
    """Build an unpacked archive's pipeline, compiled at load, in this process; write the key.

    Run by the archiver in a child process whose ``XDG_CACHE_HOME`` is a fresh folder, so the
    cache it leaves holds exactly this archive's kernels.
    """
    from handler.pipeline import Archive, Pipeline

    archive = Archive.from_dir(folder)
    # compiled now, into the default folder under the fresh XDG_CACHE_HOME the archiver gave
    archive.handler.update(compile_start="load", compile_cache_dir="")
    pipeline = Pipeline(archive, "cpu")
    if pipeline.compiled is None:
        raise SystemExit("compiling failed here: nothing to ship")
    Path(out).write_text(json.dumps(build_key("cpu"), indent=1))


if __name__ == "__main__":
    _build(sys.argv[1], sys.argv[2])
