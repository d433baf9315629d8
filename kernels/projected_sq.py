"""Squared projections accumulated over tokens: ``acc += Σ_t m_t (Qᵀ x_t)²`` (the projected mode).

Shapes and dtypes:
    x     ``(..., d)``, bf16 / fp16 / fp32, any strides (see :class:`fisherlora.kernels._common.RowView`).
    Q     ``(d, k)``, fp32 or bf16/fp16, any strides.
    mask  ``None`` or ``x.shape[:-1]``, bool or integer 0/1; read inside the kernel, masked-out
          rows never loaded.
    acc   ``(k,)`` float32.

Formula: ``acc[c] += Σ_t m_t (Σ_j x[t, j] Q[j, c])²``; ``2·T·d·k`` FLOPs. Each program owns a
column block ``C`` of ``Q`` (``BC`` columns) and a contiguous slice of the tokens; it walks its
tokens ``BT`` at a time, forms the ``(BT, BC)`` projection tile in float32 registers (streaming
``d`` in ``BD`` chunks), squares it and folds it into a ``(BC,)`` running sum. No ``(T, k)``
intermediate exists. With one token slice the program adds into ``acc`` directly; with ``S``
slices the ``(S, k)`` partials are summed in a fixed order. Deterministic, no atomics.

Dot precision: when ``x`` and ``Q`` are the same 16-bit dtype the native tensor-core dot is used
(float32 accumulation). Otherwise both tiles are upcast to float32 and the dot uses
``input_precision`` from ``FISHERLORA_FP32_DOT`` (``ieee`` default), so an fp32 ``Q`` is never
rounded to 16 bits. Under ``TRITON_INTERPRET=1`` bf16 tiles are always upcast (the
interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["projected_sq_accumulate_"]


#: Arguments that follow the batch: never a specialisation (see ``syrk.TOKEN_ARGS``).
TOKEN_ARGS = ["T", "n_inner", "s_outer", "rows_per_split"]


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _projected_kernel(
    x_ptr, mask_ptr, Q_ptr, out_ptr,
    T, d, k, n_inner, s_outer, s_inner, s_col, sq0, sq1, rows_per_split,
    HAS_MASK: tl.constexpr, TWO_LEVEL: tl.constexpr, DIRECT: tl.constexpr, CAST_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
):
    cb = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = cb * BC + tl.arange(0, BC)
    in_c = offs_c < k
    c_off = offs_c.to(tl.int64)[None, :] * sq1

    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    total = tl.zeros((BC,), dtype=tl.float32)
    for t0 in range(row_start, row_end, BT):
        rows = t0 + tl.arange(0, BT).to(tl.int64)
        valid, row_off = _common.token_rows(rows, row_end, mask_ptr, n_inner, s_outer, s_inner, HAS_MASK, TWO_LEVEL)
        proj = tl.zeros((BT, BC), dtype=tl.float32)
        for j0 in range(0, d, BD):
            cols = j0 + tl.arange(0, BD)
            in_d = cols < d
            cols64 = cols.to(tl.int64)
            xa = tl.load(x_ptr + row_off[:, None] + cols64[None, :] * s_col,
                         mask=valid[:, None] & in_d[None, :], other=0.0)
            qb = tl.load(Q_ptr + cols64[:, None] * sq0 + c_off, mask=in_d[:, None] & in_c[None, :], other=0.0)
            if CAST_FP32:
                xa = xa.to(tl.float32)
                qb = qb.to(tl.float32)
            proj = tl.dot(xa, qb, proj, input_precision=DOT_PRECISION)
        total += tl.sum(proj * proj, axis=0)

    if DIRECT:
        old = tl.load(out_ptr + offs_c, mask=in_c, other=0.0)
        tl.store(out_ptr + offs_c, old + total, mask=in_c)
    else:
        tl.store(out_ptr + pid_s.to(tl.int64) * k + offs_c, total, mask=in_c)


# (BT, BD, BC, num_warps, num_stages) per architecture (sm_80: 164 KB shared memory, sm_90: 228 KB).
_SM80 = [(64, 64, 128, 4, 3), (128, 64, 128, 8, 3), (128, 32, 128, 4, 4), (64, 64, 64, 4, 4)]
_SM90 = [(128, 64, 128, 8, 3), (128, 64, 256, 8, 3), (64, 64, 128, 4, 4), (128, 32, 128, 8, 5)]


def _prune(configs, named_args, **kwargs):
    arch = _common.capability(named_args["x_ptr"].device)[0]
    wanted = set(_SM90 if arch >= 9 else _SM80)
    kept = [c for c in configs
            if (c.kwargs["BT"], c.kwargs["BD"], c.kwargs["BC"], c.num_warps, c.num_stages) in wanted]
    return kept or configs[:1]


_projected_autotuned = triton.autotune(
    configs=[triton.Config({"BT": bt, "BD": bd, "BC": bc}, num_warps=w, num_stages=s)
             for bt, bd, bc, w, s in sorted(set(_SM80 + _SM90))],
    key=["d", "k", "DIRECT", "HAS_MASK", "TWO_LEVEL", "CAST_FP32"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],
)(_projected_kernel)

#: Fixed configuration under the interpreter.
INTERPRET_BLOCKS = {"BT": 32, "BD": 64, "BC": 64}


def projected_sq_accumulate_(acc: torch.Tensor, x: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor | None,
                             *, split: int | None = None) -> None:
    """Host launcher: ``acc += Σ_t (Qᵀ x_t)²`` over unmasked rows (arguments validated).

    ``split`` overrides the number of token slices (tests use it to cover the reduction path).
    """
    d, k = Q.shape
    view = _common.RowView(x)
    T = view.rows
    if T == 0 or k == 0 or d == 0:
        return
    device = x.device
    if split is not None:
        S = split
    elif _common.INTERPRET:
        S = 1
    else:  # about two waves of programs, each slice at least 4 token blocks of 128
        S = _common.cdiv(2 * _common.sm_count(device), _common.cdiv(k, 128))
        S = min(S, 32, T // 512)
    S = max(1, min(S, T))
    rows_per_split = _common.cdiv(T, S)
    S = _common.cdiv(T, rows_per_split)
    direct = S == 1
    out = acc if direct else torch.empty((S, k), device=device, dtype=torch.float32)
    flat_mask = _common.flat_mask(mask)
    native16 = x.dtype == Q.dtype and x.dtype in (torch.float16, torch.bfloat16)
    cast_fp32 = not native16 or _common.interpret_upcast(x.dtype)
    args = (
        view.tensor, flat_mask if flat_mask is not None else view.tensor, Q, out,
        T, d, k, view.n_inner, view.s_outer, view.s_inner, view.s_col, Q.stride(0), Q.stride(1),
        rows_per_split,
    )
    meta = dict(
        HAS_MASK=flat_mask is not None, TWO_LEVEL=view.two_level, DIRECT=direct, CAST_FP32=cast_fp32,
        DOT_PRECISION=_common.fp32_dot_precision() if cast_fp32 else "ieee",
    )
    if _common.INTERPRET:
        grid = (_common.cdiv(k, INTERPRET_BLOCKS["BC"]), S)
        _projected_kernel[grid](*args, **meta, **INTERPRET_BLOCKS)
    else:
        _projected_autotuned[lambda m: (triton.cdiv(k, m["BC"]), S)](*args, **meta)
    if not direct:
        acc.add_(out.sum(dim=0))  # slices summed in a fixed order
