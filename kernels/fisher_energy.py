"""Fisher energy of directions under a symmetric factor: ``e = diag(Qᵀ M Q)``, streamed over tiles.

Shapes and dtypes:
    M    float32, symmetric, dense ``(d, d)`` (any strides) or packed upper triangle
         ``(d(d+1)/2,)``. Only the upper triangle (diagonal included) is read, in both layouts,
         so a dense accumulator does not need :func:`fisherlora.ops.symmetrize_` first.
    Q    ``(d, k)``, fp32 or bf16/fp16 (upcast to float32 tile by tile), any strides.
    out  ``(k,)`` float32.

Formula, using the symmetry of ``M``:
    ``e_c = Σ_i M_ii Q_ic² + 2 Σ_{i<j} Q_ic M_ij Q_jc``,
so each program takes a row block ``I`` (``BI`` rows) and a column block ``C`` of ``Q`` (``BC``),
streams the column blocks ``J`` of ``M`` that touch the upper triangle of ``I``, accumulates
``P = W(M[I, J]) @ Q[J, C]`` in float32 (``W`` weights the strict upper triangle by 2, the diagonal
by 1, the lower triangle by 0), and reduces ``Σ_i Q[I, C] ∘ P`` to a ``(BC,)`` partial. That is
``d²k`` multiply-adds (half of ``2·d²·k`` for ``Qᵀ(MQ)``), and no ``(d, k)`` or ``(k, k)``
intermediate: the partials form a ``(cdiv(d, BI), k)`` float32 workspace (``1/BI`` of ``(d, k)``),
summed over row blocks in a fixed order. Deterministic, no atomics.

The dot runs in float32 with ``input_precision`` from ``FISHERLORA_FP32_DOT`` (``ieee`` default).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["fisher_energy"]


@triton.jit
def _energy_kernel(
    M_ptr, Q_ptr, ws_ptr,
    d, k, sm0, sm1, sq0, sq1,
    PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr,
):
    ib = tl.program_id(0)
    cb = tl.program_id(1)
    offs_i = ib * BI + tl.arange(0, BI)
    offs_c = cb * BC + tl.arange(0, BC)
    in_i = offs_i < d
    in_c = offs_c < k
    i64 = offs_i.to(tl.int64)[:, None]
    c_off = offs_c.to(tl.int64)[None, :] * sq1

    part = tl.zeros((BI, BC), dtype=tl.float32)
    j_first = (ib * BI) // BJ * BJ  # first column block touching the upper triangle of rows I
    for j0 in range(j_first, d, BJ):
        offs_j = j0 + tl.arange(0, BJ)
        in_j = offs_j < d
        j64 = offs_j.to(tl.int64)[None, :]
        upper = (i64 <= j64) & in_i[:, None] & in_j[None, :]
        if PACKED:
            m_ptrs = M_ptr + (i64 * d - (i64 * (i64 - 1)) // 2 + (j64 - i64)) * sm0
        else:
            m_ptrs = M_ptr + i64 * sm0 + j64 * sm1
        m = tl.load(m_ptrs, mask=upper, other=0.0)
        m = tl.where(i64 < j64, m * 2.0, m)
        q_ptrs = Q_ptr + offs_j.to(tl.int64)[:, None] * sq0 + c_off
        q = tl.load(q_ptrs, mask=in_j[:, None] & in_c[None, :], other=0.0)
        part = tl.dot(m, q.to(tl.float32), part, input_precision=DOT_PRECISION)

    qi = tl.load(Q_ptr + i64 * sq0 + c_off, mask=in_i[:, None] & in_c[None, :], other=0.0).to(tl.float32)
    e = tl.sum(part * qi, axis=0)
    tl.store(ws_ptr + ib.to(tl.int64) * k + offs_c, e, mask=in_c)


# (BJ, BC, num_warps, num_stages) per architecture; BI is the host's choice (it sizes the workspace).
# float32 tiles are large: sm_80 has 164 KB shared memory per SM, sm_90 228 KB; configs that do not
# fit are skipped by the autotuner.
_SM80 = [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)]
_SM90 = [(64, 128, 8, 3), (32, 128, 8, 4), (64, 64, 4, 4), (64, 256, 8, 2)]


def _prune(configs, named_args, **kwargs):
    arch = _common.capability(named_args["M_ptr"].device)[0]
    wanted = set(_SM90 if arch >= 9 else _SM80)
    kept = [c for c in configs if (c.kwargs["BJ"], c.kwargs["BC"], c.num_warps, c.num_stages) in wanted]
    return kept or configs[:1]


_energy_autotuned = triton.autotune(
    configs=[triton.Config({"BJ": bj, "BC": bc}, num_warps=w, num_stages=s)
             for bj, bc, w, s in sorted(set(_SM80 + _SM90))],
    key=["d", "k", "PACKED", "BI"],
    prune_configs_by={"early_config_prune": _prune},
)(_energy_kernel)

#: Fixed configuration under the interpreter.
INTERPRET_BLOCKS = {"BI": 64, "BJ": 64, "BC": 64}


def fisher_energy(M: torch.Tensor, Q: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """Host launcher: ``diag(Qᵀ M Q)`` as a new ``(k,)`` float32 tensor (arguments validated)."""
    d, k = Q.shape
    out = torch.zeros(k, device=Q.device, dtype=torch.float32)
    if d == 0 or k == 0:
        return out
    if _common.INTERPRET:
        BI = block or INTERPRET_BLOCKS["BI"]
    else:
        BI = block or (128 if d >= 1024 else 64)
    n_iblocks = _common.cdiv(d, BI)
    ws = torch.empty((n_iblocks, k), device=Q.device, dtype=torch.float32)
    packed = M.dim() == 1
    sm0 = M.stride(0)
    sm1 = 0 if packed else M.stride(1)
    args = (M, Q, ws, d, k, sm0, sm1, Q.stride(0), Q.stride(1))
    meta = dict(PACKED=packed, DOT_PRECISION=_common.fp32_dot_precision(), BI=BI)
    if _common.INTERPRET:
        blocks = INTERPRET_BLOCKS
        grid = (n_iblocks, _common.cdiv(k, blocks["BC"]))
        _energy_kernel[grid](*args, **meta, BJ=blocks["BJ"], BC=blocks["BC"])
    else:
        _energy_autotuned[lambda m: (n_iblocks, triton.cdiv(k, m["BC"]))](*args, **meta)
    # Row-block partials summed in a fixed order (a plain reduction: no atomics).
    return torch.sum(ws, dim=0, out=out)
