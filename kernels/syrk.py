"""Masked, scaled SYRK into a float32 accumulator: ``acc += scale · x_mᵀ x_m`` (the K-FAC factor update).

Shapes and dtypes:
    x     ``(..., d)``, bf16 / fp16 / fp32, any strides (see :class:`fisherlora.kernels._common.RowView`);
          its ``T = prod(x.shape[:-1])`` rows are the tokens.
    mask  ``None`` or ``x.shape[:-1]``, bool or integer 0/1; read inside the kernel. Masked-out
          rows are never loaded (no gathered copy of ``x``; NaN padding cannot leak).
    acc   float32, dense ``(d, d)`` or packed upper triangle ``(d(d+1)/2,)`` (row-major upper
          triangle, element ``(i, j)``, ``i <= j``, at ``i*d - i*(i-1)/2 + (j - i)``).

Formula: ``acc[i, j] += scale · Σ_t m_t x[t, i] x[t, j]`` for ``i <= j`` only. Only the
upper-triangle tiles are computed, and only elements with ``i <= j`` are written, also in a dense
``acc`` (mirror it once at finalisation with :func:`fisherlora.ops.symmetrize_`). FLOPs: ``T·d²``
(half of the ``2·T·d²`` of a full ``xᵀx``).

Work split: one program per upper-triangle tile ``(ti, tj)`` (``BLOCK × BLOCK``) and per
split-K slice of the tokens. With one slice the program adds its tile into ``acc`` directly (it
owns that tile). With ``S > 1`` slices each program stores its partial tile in a float32
workspace ``(S, n_tiles, BLOCK, BLOCK)`` and a second kernel sums the slices in the fixed order
``0..S-1`` and adds the result to ``acc``. No float atomics anywhere: repeated calls are
bit-identical.

Accumulation is float32 (``tl.dot`` with a float32 accumulator); 16-bit inputs use the native
tensor-core dot, float32 inputs use ``input_precision`` from ``FISHERLORA_FP32_DOT`` (``ieee`` by
default). Under ``TRITON_INTERPRET=1`` bf16 tiles are upcast to float32 first (constexpr
``UPCAST``), because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["syrk_accumulate_"]


@triton.jit
def _add_upper_tile(out_ptr, tile, offs_i, offs_j, d, PACKED: tl.constexpr):
    """``out[i, j] += tile`` for the in-range elements with ``i <= j`` (dense or packed ``out``)."""
    i = offs_i.to(tl.int64)[:, None]
    j = offs_j.to(tl.int64)[None, :]
    keep = (i <= j) & (j < d)
    if PACKED:
        ptrs = out_ptr + (i * d - (i * (i - 1)) // 2 + (j - i))
    else:
        ptrs = out_ptr + (i * d + j)
    old = tl.load(ptrs, mask=keep, other=0.0)
    tl.store(ptrs, old + tile, mask=keep)


#: Arguments that follow the batch (its token count and layout): never a specialisation, so a new
#: sequence length or batch size reuses the compiled kernel (docs/DESIGN.md §11). ``d`` and the
#: strides of one row stay specialised: they are the layer's, and their divisibility lets the
#: loads vectorise.
TOKEN_ARGS = ["T", "n_inner", "s_outer", "rows_per_split"]


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _syrk_tile_kernel(
    x_ptr, mask_ptr, out_ptr, ti_ptr, tj_ptr,
    T, d, n_inner, s_outer, s_inner, s_col, rows_per_split, n_tiles, scale,
    HAS_MASK: tl.constexpr, TWO_LEVEL: tl.constexpr, PACKED: tl.constexpr, DIRECT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    ti = tl.load(ti_ptr + pid_t)
    tj = tl.load(tj_ptr + pid_t)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    col_i = offs_i.to(tl.int64) * s_col
    col_j = offs_j.to(tl.int64) * s_col
    in_i = offs_i < d
    in_j = offs_j < d

    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(row_start, row_end, BK):
        rows = k0 + tl.arange(0, BK).to(tl.int64)
        valid, row_off = _common.token_rows(rows, row_end, mask_ptr, n_inner, s_outer, s_inner, HAS_MASK, TWO_LEVEL)
        # Both operands masked by the token mask: masked-out rows are never read.
        a = tl.load(x_ptr + row_off[:, None] + col_i[None, :], mask=valid[:, None] & in_i[None, :], other=0.0)
        b = tl.load(x_ptr + row_off[:, None] + col_j[None, :], mask=valid[:, None] & in_j[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    acc = acc * scale

    if DIRECT:
        _add_upper_tile(out_ptr, acc, offs_i, offs_j, d, PACKED)
    else:
        r = tl.arange(0, BLOCK)
        base = (pid_s.to(tl.int64) * n_tiles + pid_t) * BLOCK * BLOCK
        tl.store(out_ptr + base + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit(do_not_specialize=["n_split"])
def _syrk_reduce_kernel(ws_ptr, acc_ptr, ti_ptr, tj_ptr, d, n_tiles, n_split,
                        PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """Sum the ``n_split`` partial tiles of one tile in the fixed order ``0..n_split-1``, add to
    ``acc``. The slice count is a runtime loop bound: it follows the token count, and a
    compile-time one compiled the kernel once per value."""
    pid_t = tl.program_id(0)
    ti = tl.load(ti_ptr + pid_t)
    tj = tl.load(tj_ptr + pid_t)
    r = tl.arange(0, BLOCK)
    tile_off = r[:, None] * BLOCK + r[None, :]
    total = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for s in range(0, n_split):
        base = (s * n_tiles + pid_t).to(tl.int64) * BLOCK * BLOCK
        total += tl.load(ws_ptr + base + tile_off)
    _add_upper_tile(acc_ptr, total, ti * BLOCK + r, tj * BLOCK + r, d, PACKED)


# --- launch configuration --------------------------------------------------------------------

# (BK, num_warps, num_stages) candidates per architecture; the tile is BLOCK x BLOCK (host choice).
# sm_80 (A100, 164 KB shared memory per SM) and sm_90 (H100/H200, 228 KB: deeper pipelines).
_SM80 = [(32, 4, 4), (64, 4, 3), (64, 8, 3), (32, 8, 4)]
_SM90 = [(64, 8, 3), (64, 8, 4), (64, 4, 4), (32, 8, 5)]


def _arch_configs(arch: int) -> list[triton.Config]:
    table = _SM90 if arch >= 9 else _SM80
    return [triton.Config({"BK": bk}, num_warps=w, num_stages=s) for bk, w, s in table]


def _prune(configs, named_args, **kwargs):
    """Keep the configurations meant for the running GPU's architecture (sm_80 or sm_90 list)."""
    arch = _common.capability(named_args["x_ptr"].device)[0]
    wanted = {(c.kwargs["BK"], c.num_warps, c.num_stages) for c in _arch_configs(arch)}
    kept = [c for c in configs if (c.kwargs["BK"], c.num_warps, c.num_stages) in wanted]
    return kept or configs[:1]


_ALL_CONFIGS = {(bk, w, s) for bk, w, s in _SM80 + _SM90}

# The autotuned launcher (GPU only). The in-place DIRECT path adds into ``out_ptr``, so the
# autotuner restores it after each trial run. Keyed by d and the split (not by T, which changes
# with every batch).
_syrk_tile_autotuned = triton.autotune(
    configs=[triton.Config({"BK": bk}, num_warps=w, num_stages=s) for bk, w, s in sorted(_ALL_CONFIGS)],
    key=["d", "BLOCK", "DIRECT", "HAS_MASK", "TWO_LEVEL"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],
)(_syrk_tile_kernel)

#: Fixed small configuration under the interpreter (no autotuning, few programs).
INTERPRET_BLOCK = 64
INTERPRET_BK = 32


@functools.lru_cache(maxsize=64)
def _tile_table(n_blocks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major list of the upper-triangle tile coordinates ``(ti, tj)``, ``ti <= tj``."""
    ti, tj = torch.triu_indices(n_blocks, n_blocks, device=device, dtype=torch.int32)
    return ti.contiguous(), tj.contiguous()


def _choose_block(d: int, device: torch.device) -> int:
    if _common.INTERPRET:
        return INTERPRET_BLOCK
    return 128 if d >= 512 else 64 if d >= 64 else 32


def _choose_split(n_tiles: int, T: int, device: torch.device, bk_min: int = 64) -> int:
    """Slices of the token axis: enough programs for about two waves, each slice >= 8 K-steps."""
    if _common.INTERPRET:
        return 1
    target = 2 * _common.sm_count(device)
    split = _common.cdiv(target, n_tiles)
    return max(1, min(split, 16, T // (8 * bk_min)))


def syrk_accumulate_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     *, split: int | None = None, block: int | None = None) -> None:
    """Host launcher: ``acc += scale · x_mᵀ x_m`` (upper triangle), arguments already validated.

    ``split`` and ``block`` override the heuristics (tests use them to cover the split-K path).
    """
    d = x.shape[-1]
    view = _common.RowView(x)
    T = view.rows
    if T == 0 or d == 0:
        return
    device = x.device
    BLOCK = block or _choose_block(d, device)
    n_blocks = _common.cdiv(d, BLOCK)
    ti, tj = _tile_table(n_blocks, device)
    n_tiles = ti.numel()
    S = split or _choose_split(n_tiles, T, device)
    S = max(1, min(S, T))
    rows_per_split = _common.cdiv(T, S)
    S = _common.cdiv(T, rows_per_split)
    flat_mask = _common.flat_mask(mask)
    direct = S == 1
    out = acc if direct else torch.empty((S, n_tiles, BLOCK, BLOCK), device=device, dtype=torch.float32)
    args = (
        view.tensor, flat_mask if flat_mask is not None else view.tensor, out, ti, tj,
        T, d, view.n_inner, view.s_outer, view.s_inner, view.s_col, rows_per_split, n_tiles, float(scale),
    )
    meta = dict(
        HAS_MASK=flat_mask is not None, TWO_LEVEL=view.two_level, PACKED=acc.dim() == 1, DIRECT=direct,
        UPCAST=_common.interpret_upcast(x.dtype),
        DOT_PRECISION=_common.fp32_dot_precision() if x.dtype == torch.float32 else "ieee",
        BLOCK=BLOCK,
    )
    grid = (n_tiles, S)
    if _common.INTERPRET:
        _syrk_tile_kernel[grid](*args, **meta, BK=INTERPRET_BK)
    else:
        _syrk_tile_autotuned[grid](*args, **meta)
    if not direct:
        _syrk_reduce_kernel[(n_tiles,)](out, acc, ti, tj, d, n_tiles, S, PACKED=acc.dim() == 1,
                                        BLOCK=BLOCK, num_warps=4 if BLOCK <= 64 else 8)
