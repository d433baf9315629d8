"""Host (CPU) memory housekeeping shared by the SVD and the calibration passes."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_host_memory() -> None:
    """Return the host memory that freed tensors left in the C heap to the OS (glibc's
    ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) in the heap, where
    long-lived tensors allocated in between (the singular bases) pin them: without a trim, the
    SVD's float64 workspaces stay in a CPU process's resident memory through the calibration
    passes that follow (about 300 MiB on ``bench/memory.py``'s model).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
