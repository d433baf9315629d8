"""Helpers shared by the Triton op modules: interpreter detection, row views, launch heuristics.

Nothing here queries CUDA at import time; device properties are read (and cached) on the first
launch on a given device.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

if __name__ != "fisherlora.kernels._common":  # every op module imports this one, before defining a kernel
    raise ImportError(
        f"the Triton kernels are the package fisherlora.kernels and load under no other name "
        f"(not as {__name__.rpartition('.')[0] or __name__!r}): the repository's kernels/ folder is "
        "not a package of its own (docs/DESIGN.md §5); import fisherlora.kernels"
    )

#: Read once, at import: ``@triton.jit`` decides at definition time whether a kernel is
#: interpreted, so changing the variable later has no effect on already-imported kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: ``input_precision`` of ``tl.dot`` when an operand is float32: ``"ieee"`` (default, as accurate
#: as PyTorch's float32 matmul with TF32 off) or ``"tf32x3"`` (three TF32 passes on the tensor
#: cores; faster, slightly less accurate). Read at each launch from ``FISHERLORA_FP32_DOT``.
_FP32_DOT_CHOICES = ("ieee", "tf32x3")


def fp32_dot_precision() -> str:
    value = os.environ.get("FISHERLORA_FP32_DOT", "ieee").lower()
    if value not in _FP32_DOT_CHOICES:
        raise ValueError(f"FISHERLORA_FP32_DOT must be one of {_FP32_DOT_CHOICES}, got {value!r}")
    return value


def interpret_upcast(dtype: torch.dtype) -> bool:
    """Whether tiles of ``dtype`` must be upcast to float32 before ``tl.dot``.

    Only under the interpreter, and only for bfloat16: the interpreter computes bf16 ``tl.dot``
    wrongly (docs/DESIGN.md §3); fp16 and fp32 are exact there, so they keep the native path.
    """
    return INTERPRET and dtype == torch.bfloat16


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors of ``device`` (a small constant under the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (``(0, 0)`` for anything else); cached."""
    if device.type != "cuda":
        return (0, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)


class RowView:
    """The rows of an ``(..., d)`` tensor as seen by the kernels, without copying when possible.

    Row ``r`` (in the order of ``x.reshape(-1, d)``), column ``c`` lives at element offset
    ``(r // n_inner) * s_outer + (r % n_inner) * s_inner + c * s_col`` of ``tensor``. Leading dims
    are merged wherever their strides allow; two groups of leading dims are handled by that
    two-level index, so ``(B, T, d)`` slices of larger buffers and transposed views need no copy.
    Only a tensor whose leading dims form three or more non-mergeable groups is copied (once, by
    ``reshape``), which PyTorch never hands to a module hook in practice.
    """

    __slots__ = ("tensor", "rows", "n_inner", "s_outer", "s_inner", "s_col", "two_level", "copied")

    def __init__(self, x: torch.Tensor):
        d = x.shape[-1]
        self.rows = x.numel() // d if d else x[..., 0].numel()
        self.s_col = x.stride(-1) if x.dim() else 1
        self.copied = False
        groups: list[list[int]] = []  # [size, stride], innermost first
        for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1]), strict=True):
            if size == 1:
                continue
            if groups and stride == groups[-1][0] * groups[-1][1]:
                groups[-1][0] *= size
            else:
                groups.append([size, stride])
        if len(groups) > 2:
            x = x.reshape(-1, d)
            self.copied = True
            groups = [[x.shape[0], x.stride(0)]]
            self.s_col = x.stride(1)
        self.tensor = x
        if not groups:
            groups = [[1, 0]]
        self.n_inner, self.s_inner = groups[0]
        self.two_level = len(groups) == 2
        self.s_outer = groups[1][1] if self.two_level else 0


def flat_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as a contiguous 1-D tensor in row order (a copy of at most ``T`` small elements).

    Boolean masks are reinterpreted as uint8 (same bytes, no copy when already contiguous);
    integer 0/1 masks are passed as they are and compared with zero inside the kernels.
    """
    if mask is None:
        return None
    mask = mask.reshape(-1).contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def token_rows(rows, row_end, mask_ptr, n_inner, s_outer, s_inner, HAS_MASK: tl.constexpr,
               TWO_LEVEL: tl.constexpr):
    """``(valid, row_off)`` for a block of token indices ``rows``: in range and not masked out
    (the mask is read here, never a gathered copy of ``x``), and each row's element offset in
    ``x`` (one stride, or two for leading dims that do not merge; see :class:`RowView`)."""
    valid = rows < row_end
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=valid, other=0) != 0)
    if TWO_LEVEL:
        row_off = (rows // n_inner) * s_outer + (rows % n_inner) * s_inner
    else:
        row_off = rows * s_inner
    return valid, row_off
