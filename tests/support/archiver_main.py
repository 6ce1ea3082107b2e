"""handler/tools/archive.py's real ``main(argv)``, run for several command lines by one process
(torch and timm imported once), or in the test process with the CLI's streams and exit status.

As a script: ``python tests/support/archiver_main.py JOBS.json`` with a JSON list of
``[name, argv]`` pairs runs each ``argv`` in turn (from the repo root, as ``python -m
handler.tools.archive ARGV`` would) and prints one JSON line per job: ``{"name", "rc",
"stderr", "seconds"}``. It stops at nothing: every job runs and reports.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Done:
    """What a CLI run leaves: its exit status and its two streams (as subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def run_main(argv: list[str]) -> Done:
    """``handler.tools.archive.main(argv)`` in this process, as ``python -m handler.tools.archive``
    runs it: its own stdout/stderr, a fresh root logger (``main`` configures logging as a new
    process would), and ``sys.exit`` (argparse errors, ``--help``) turned into the exit status."""
    from handler.tools.archive import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    root.handlers.clear()
    root.setLevel(logging.WARNING)  # a new process's root logger
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(argv))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(cwd)
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return Done(rc, out.getvalue(), err.getvalue())


def start_batch(jobs: list[tuple[str, list[str]]], jobs_file: Path) -> subprocess.Popen:
    """One process that archives every job in turn (see the module docstring)."""
    jobs_file.write_text(json.dumps(jobs))
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(jobs_file)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_batch(proc: subprocess.Popen, timeout: float = 900) -> dict[str, Done]:
    """Each job's result by name, once the batch process has exited."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"the archiver batch process failed:\n{err}"
    results = {}
    for line in out.splitlines():
        row = json.loads(line)
        results[row["name"]] = Done(row["rc"], "", row["stderr"])
    return results


def _batch(path: str) -> int:
    sys.path.insert(0, str(ROOT))
    real_stdout = sys.stdout
    for name, argv in json.loads(Path(path).read_text()):
        started = time.monotonic()
        done = run_main(argv)
        row = {"name": name, "rc": done.returncode, "stderr": done.stderr, "seconds": time.monotonic() - started}
        real_stdout.write(json.dumps(row) + "\n")
        real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_batch(sys.argv[1]))
