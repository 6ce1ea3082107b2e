"""The archive's serve-time packages: listed by the archiver, checked by the worker before import.

``handler/tools/archive.py`` writes ``requirements.txt`` into every archive with the exact versions the
handler was built and tested with. A TorchServe with ``install_py_dep_per_model=true`` installs
them when it loads the archive; any other server must already have them. The worker checks them
first thing, before importing anything outside the standard library, so a missing package fails
the load with one message that says what to do, instead of an ``ImportError`` deep in a stack.

Standard library only: this module runs before the handler's own imports.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path

__all__ = ["REQUIREMENTS_FILE", "MissingPackages", "read_requirements", "check_requirements"]

logger = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements.txt"
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:==\s*([^\s;#]+))?")


class MissingPackages(ImportError):
    """Packages the archive needs are not installed where the worker runs."""


def read_requirements(path: Path) -> list[tuple[str, str | None]]:
    """``(distribution, pinned version or None)`` for each requirement line of a pip file.

    Options (``--find-links``...), comments and URL/path requirements are skipped: only
    named requirements can be checked against installed metadata.
    """
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")) or "://" in line.split("@", 1)[0]:
            continue
        match = _PIN.match(line.split("@", 1)[0] if " @ " in line else line)
        if match:
            out.append((match.group(1), match.group(2)))
    return out


def check_requirements(model_dir: Path) -> None:
    """Fail if a package of the archive's ``requirements.txt`` is missing; warn on other versions.

    Raises:
        MissingPackages: naming every missing package, its pinned version and the server setting
            that installs them.
    """
    path = Path(model_dir) / REQUIREMENTS_FILE
    if not path.is_file():
        return
    missing, other = [], []
    for name, version in read_requirements(path):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name}=={version}" if version else name)
            continue
        if version and installed != version:
            other.append(f"{name} {installed} (archive built with {version})")
    if other:
        logger.warning("package versions differ from the archive's requirements.txt: %s", ", ".join(other))
    if missing:
        raise MissingPackages(
            f"this archive needs {', '.join(missing)}, not installed for this TorchServe worker: "
            "set install_py_dep_per_model=true in the server's config.properties so TorchServe installs "
            "the archive's requirements.txt, or pip install them where TorchServe runs"
        )
