"""Process-level settings of the worker's host memory.

glibc's malloc hands blocks above its mmap threshold (128 KiB at first, raised as such blocks
are freed, at most 32 MiB) straight back to the system on ``free``, and trims its heap when
more than twice that is free at the top. A CPU forward allocates and frees hundreds of MiB of
activations per batch, so with the defaults every batch faults its memory in again, page by
zeroed page: on the default model that doubles the time of a batch of 8. Raising both
thresholds lets the next batch reuse the last one's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_malloc"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold_mib: int, trim_threshold_mib: int) -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (0 leaves one as it is).

    Returns:
        True if every requested setting took effect; False where the C library is not glibc
        or refused a value (the process then keeps its defaults, and a warning says so).
    """
    wanted = [(name, option, mib) for name, option, mib in (
        ("mmap threshold", _M_MMAP_THRESHOLD, mmap_threshold_mib),
        ("trim threshold", _M_TRIM_THRESHOLD, trim_threshold_mib)) if mib]
    if not wanted:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.warning("malloc tuning skipped: this C library has no mallopt (not glibc)")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    for name, option, mib in wanted:
        if mallopt(option, mib << 20) != 1:
            logger.warning("malloc tuning: glibc refused a %s of %d MiB; keeping its default", name, mib)
            ok = False
    if ok:
        logger.info("malloc tuning: %s", ", ".join(f"{name} {mib} MiB" for name, _, mib in wanted))
    return ok
