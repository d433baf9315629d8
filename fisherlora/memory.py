"""Process memory: the peak so far, host (CPU) heap housekeeping shared by the SVD and the
calibration passes, and the finiteness check that allocates nothing of a tensor's size."""

from __future__ import annotations

import ctypes
import functools
import resource

import torch

__all__ = ["peak_memory_mb", "release_host_memory", "all_finite"]


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory so far in MiB: the CUDA allocator's peak on a GPU, else the process's max RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` (any float tensor, any strides) holds no NaN or inf, without a temporary of
    its size: ``torch.isfinite(t).all()`` makes about 6 bytes per element (and ``aminmax`` a copy
    of a transposed ``t``), where ``amax`` and ``amin``, which propagate NaN, make two scalars.
    Used wherever a large result is checked (factors, bases)."""
    if t.numel() == 0:
        return True
    t = t.detach()
    return bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin()))
