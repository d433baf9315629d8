"""Masked, scaled weight gradient into a float32 accumulator: ``acc += scale · g_mᵀ a_m`` (``∇W = Σ_t g_t a_tᵀ``).

Shapes and dtypes:
    g     ``(..., d_out)`` output gradients, bf16 / fp16 / fp32, any strides (see
          :class:`fisherlora.kernels._common.RowView`); its ``T = prod(g.shape[:-1])`` rows are the tokens.
    a     ``(..., d_in)`` layer inputs, the same token dims, bf16 / fp16 / fp32 (``g``'s dtype or
          another one), any strides of its own.
    mask  ``None`` or the token dims, bool or integer 0/1; read inside the kernel. Masked-out
          rows of ``g`` and ``a`` are never loaded (no gathered copy; NaN padding cannot leak).
    acc   float32, contiguous ``(d_out, d_in)``; with ``transpose`` ``(d_in, d_out)``, which is the
          same product with ``g`` and ``a`` swapped (``Σ_t a_t g_tᵀ``), so the host swaps them and
          the kernel knows one orientation.

Formula: ``acc[i, j] += scale · Σ_t m_t g[t, i] a[t, j]``. FLOPs: ``2·T·d_out·d_in``.

Work split: one program per ``BM × BN`` tile of ``acc`` and per split-K slice of the tokens. With
one slice the program adds its tile into ``acc`` directly (it owns the tile). With ``S > 1``
slices each program stores its partial tile in a float32 workspace ``(S, n_tiles, BM, BN)`` and a
second kernel sums the slices in the fixed order ``0..S-1`` into ``acc``. No float atomics:
repeated calls are bit-identical.

Accumulation is float32 (``tl.dot`` with a float32 accumulator). ``g`` and ``a`` of the same
16-bit dtype use the native tensor-core dot; float32 operands use ``input_precision`` from
``FISHERLORA_FP32_DOT`` (``ieee`` by default); operands of two different dtypes are upcast to
float32 tile by tile, in registers (constexpr ``UPCAST``; never a float32 copy of the
activations), as are bf16 tiles under ``TRITON_INTERPRET=1``, whose bf16 dot is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["gradient_accumulate_"]

#: Arguments that follow the batch: never a specialisation (docs/DESIGN.md §11), as in :mod:`.syrk`.
TOKEN_ARGS = ["T", "g_n_inner", "g_s_outer", "a_n_inner", "a_s_outer", "rows_per_split"]


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _gradient_tile_kernel(
    g_ptr, a_ptr, mask_ptr, out_ptr,
    T, d_out, d_in,
    g_n_inner, g_s_outer, g_s_inner, g_s_col,
    a_n_inner, a_s_outer, a_s_inner, a_s_col,
    rows_per_split, n_tiles_n, n_tiles, scale,
    HAS_MASK: tl.constexpr, G_TWO_LEVEL: tl.constexpr, A_TWO_LEVEL: tl.constexpr, DIRECT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    ti = pid_t // n_tiles_n
    tj = pid_t % n_tiles_n
    offs_i = ti * BM + tl.arange(0, BM)
    offs_j = tj * BN + tl.arange(0, BN)
    col_g = offs_i.to(tl.int64) * g_s_col
    col_a = offs_j.to(tl.int64) * a_s_col
    in_i = offs_i < d_out
    in_j = offs_j < d_in

    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(row_start, row_end, BK):
        rows = k0 + tl.arange(0, BK).to(tl.int64)
        # the mask is read once (with g's offsets); a's offsets follow its own strides
        valid, g_off = _common.token_rows(rows, row_end, mask_ptr, g_n_inner, g_s_outer, g_s_inner, HAS_MASK,
                                          G_TWO_LEVEL)
        _, a_off = _common.token_rows(rows, row_end, mask_ptr, a_n_inner, a_s_outer, a_s_inner, False, A_TWO_LEVEL)
        # both operands masked by the token mask: masked-out rows are never read
        gt = tl.load(g_ptr + g_off[:, None] + col_g[None, :], mask=valid[:, None] & in_i[None, :], other=0.0)
        at = tl.load(a_ptr + a_off[:, None] + col_a[None, :], mask=valid[:, None] & in_j[None, :], other=0.0)
        if UPCAST:
            gt = gt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(tl.trans(gt), at, acc, input_precision=DOT_PRECISION)
    acc = acc * scale

    if DIRECT:
        i = offs_i.to(tl.int64)[:, None]
        j = offs_j.to(tl.int64)[None, :]
        keep = in_i[:, None] & in_j[None, :]
        ptrs = out_ptr + i * d_in + j
        tl.store(ptrs, tl.load(ptrs, mask=keep, other=0.0) + acc, mask=keep)
    else:
        r = tl.arange(0, BM)
        c = tl.arange(0, BN)
        base = (pid_s.to(tl.int64) * n_tiles + pid_t) * BM * BN
        tl.store(out_ptr + base + r[:, None] * BN + c[None, :], acc)


@triton.jit(do_not_specialize=["n_split"])
def _gradient_reduce_kernel(ws_ptr, acc_ptr, d_out, d_in, n_tiles_n, n_tiles, n_split,
                            BM: tl.constexpr, BN: tl.constexpr):
    """Sum the ``n_split`` partial tiles of one tile in the fixed order ``0..n_split-1``, add to ``acc``."""
    pid_t = tl.program_id(0)
    ti = pid_t // n_tiles_n
    tj = pid_t % n_tiles_n
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    tile_off = r[:, None] * BN + c[None, :]
    total = tl.zeros((BM, BN), dtype=tl.float32)
    for s in range(0, n_split):
        base = (s * n_tiles + pid_t).to(tl.int64) * BM * BN
        total += tl.load(ws_ptr + base + tile_off)
    i = (ti * BM + r).to(tl.int64)[:, None]
    j = (tj * BN + c).to(tl.int64)[None, :]
    keep = (i < d_out) & (j < d_in)
    ptrs = acc_ptr + i * d_in + j
    tl.store(ptrs, tl.load(ptrs, mask=keep, other=0.0) + total, mask=keep)


# --- launch configuration --------------------------------------------------------------------

# (BK, num_warps, num_stages) candidates per architecture, as in :mod:`.syrk`: sm_80 (164 KB shared
# memory per SM) and sm_90 (228 KB: deeper pipelines).
_SM80 = [(32, 4, 4), (64, 4, 3), (64, 8, 3), (32, 8, 4)]
_SM90 = [(64, 8, 3), (64, 8, 4), (64, 4, 4), (32, 8, 5)]
_ALL_CONFIGS = {(bk, w, s) for bk, w, s in _SM80 + _SM90}


def _prune(configs, named_args, **kwargs):
    """Keep the configurations meant for the running GPU's architecture (sm_80 or sm_90 list)."""
    arch = _common.capability(named_args["g_ptr"].device)[0]
    wanted = set(_SM90 if arch >= 9 else _SM80)
    kept = [c for c in configs if (c.kwargs["BK"], c.num_warps, c.num_stages) in wanted]
    return kept or configs[:1]


# The autotuned launcher (GPU only); the in-place DIRECT path adds into ``out_ptr``, so the
# autotuner restores it after each trial. Keyed by the widths and the layout, not by T.
_gradient_tile_autotuned = triton.autotune(
    configs=[triton.Config({"BK": bk}, num_warps=w, num_stages=s) for bk, w, s in sorted(_ALL_CONFIGS)],
    key=["d_out", "d_in", "BM", "BN", "DIRECT", "HAS_MASK", "G_TWO_LEVEL", "A_TWO_LEVEL", "UPCAST"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],
)(_gradient_tile_kernel)

#: Fixed small configuration under the interpreter (no autotuning, few programs).
INTERPRET_BLOCK = 64
INTERPRET_BK = 32


def _choose_block(d: int) -> int:
    if _common.INTERPRET:
        return INTERPRET_BLOCK
    return 128 if d >= 512 else 64 if d >= 64 else 32


def _choose_split(n_tiles: int, T: int, device: torch.device, bk_min: int = 64) -> int:
    """Slices of the token axis: enough programs for about two waves, each slice >= 8 K-steps."""
    if _common.INTERPRET:
        return 1
    split = _common.cdiv(2 * _common.sm_count(device), n_tiles)
    return max(1, min(split, 16, T // (8 * bk_min)))


def gradient_accumulate_(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, transpose: bool = False, *, split: int | None = None,
                         block: tuple[int, int] | None = None) -> None:
    """Host launcher: ``acc += scale · g_mᵀ a_m`` (``a_mᵀ g_m`` with ``transpose``), arguments
    already validated. ``split`` and ``block`` (``(BM, BN)``) override the heuristics (tests use
    them to cover the split-K path)."""
    if transpose:  # Σ_t a_t g_tᵀ is the same product with the operands' roles swapped
        g, a = a, g
    d_out, d_in = g.shape[-1], a.shape[-1]
    gv, av = _common.RowView(g), _common.RowView(a)
    T = gv.rows
    if T == 0:
        return
    device = g.device
    BM, BN = block or (_choose_block(d_out), _choose_block(d_in))
    n_tiles_n = _common.cdiv(d_in, BN)
    n_tiles = _common.cdiv(d_out, BM) * n_tiles_n
    S = split or _choose_split(n_tiles, T, device)
    S = max(1, min(S, T))
    rows_per_split = _common.cdiv(T, S)
    S = _common.cdiv(T, rows_per_split)
    flat_mask = _common.flat_mask(mask)
    direct = S == 1
    out = acc if direct else torch.empty((S, n_tiles, BM, BN), device=device, dtype=torch.float32)
    mixed = g.dtype != a.dtype
    fp32_dot = mixed or torch.float32 in (g.dtype, a.dtype)
    args = (
        gv.tensor, av.tensor, flat_mask if flat_mask is not None else gv.tensor, out,
        T, d_out, d_in,
        gv.n_inner, gv.s_outer, gv.s_inner, gv.s_col,
        av.n_inner, av.s_outer, av.s_inner, av.s_col,
        rows_per_split, n_tiles_n, n_tiles, float(scale),
    )
    meta = dict(
        HAS_MASK=flat_mask is not None, G_TWO_LEVEL=gv.two_level, A_TWO_LEVEL=av.two_level, DIRECT=direct,
        UPCAST=mixed or _common.interpret_upcast(g.dtype),
        DOT_PRECISION=_common.fp32_dot_precision() if fp32_dot else "ieee",
        BM=BM, BN=BN,
    )
    grid = (n_tiles, S)
    if _common.INTERPRET:
        _gradient_tile_kernel[grid](*args, **meta, BK=INTERPRET_BK)
    else:
        _gradient_tile_autotuned[grid](*args, **meta)
    if not direct:
        _gradient_reduce_kernel[(n_tiles,)](out, acc, d_out, d_in, n_tiles_n, n_tiles, S, BM=BM, BN=BN,
                                            num_warps=4 if BM * BN <= 64 * 64 else 8)
