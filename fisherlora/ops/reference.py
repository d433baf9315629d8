"""Pure-PyTorch reference implementations of the curvature ops (docs/DESIGN.md §3).

These are the ground truth for every other backend: they work on any device and in float64,
and the tests and benchmarks import them rather than re-writing them.

Packed layout (used by every backend): the upper triangle of a symmetric ``(d, d)`` matrix,
row by row, ``[M[0,0], M[0,1], ..., M[0,d-1], M[1,1], ..., M[d-1,d-1]]``, length ``d(d+1)/2``.
Element ``(i, j)`` with ``i <= j`` sits at ``i*d - i*(i-1)/2 + (j - i)``.
"""

from __future__ import annotations

import torch

__all__ = [
    "packed_size",
    "packed_dim",
    "pack_triu",
    "unpack_triu",
    "symmetrize_",
    "syrk_accumulate_",
    "fisher_energy",
    "projected_sq_accumulate_",
    "gradient_accumulate_",
]


def packed_size(d: int) -> int:
    """Length ``d(d+1)/2`` of the packed upper triangle of a ``(d, d)`` matrix."""
    return d * (d + 1) // 2


def packed_dim(n: int) -> int:
    """Inverse of :func:`packed_size`; raises ``ValueError`` if ``n`` is not triangular."""
    d = int(round(((8 * n + 1) ** 0.5 - 1) / 2))
    if packed_size(d) != n:
        raise ValueError(f"a packed triangle has d(d+1)/2 elements; {n} is not of that form")
    return d


def _triu_indices(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.triu_indices(d, d, device=device).unbind(0)


def pack_triu(M: torch.Tensor) -> torch.Tensor:
    """Packed upper triangle ``(d(d+1)/2,)`` of a square ``(d, d)`` matrix (any dtype)."""
    i, j = _triu_indices(M.shape[-1], M.device)
    return M[i, j]


def unpack_triu(P: torch.Tensor, d: int | None = None) -> torch.Tensor:
    """Full symmetric ``(d, d)`` matrix from a packed upper triangle ``(d(d+1)/2,)``."""
    d = packed_dim(P.numel()) if d is None else d
    i, j = _triu_indices(d, P.device)
    M = P.new_zeros(d, d)
    M[i, j] = P
    M[j, i] = P
    return M


#: columns of the panel :func:`symmetrize_` mirrors at a time
SYMMETRIZE_BLOCK = 256


def symmetrize_(acc: torch.Tensor) -> torch.Tensor:
    """Mirror the upper triangle of a dense ``(d, d)`` accumulator into its lower triangle, in place.

    ``syrk_accumulate_`` only guarantees the upper triangle (diagonal included) of a dense
    accumulator; call this once at finalisation. Packed accumulators are returned unchanged.
    Whatever the lower triangle held is overwritten, and nothing of ``acc``'s size is allocated:
    the lower part of each panel of :data:`SYMMETRIZE_BLOCK` rows is copied from its transpose
    above the diagonal, the diagonal block row by row.
    """
    if acc.dim() == 2:
        d = acc.shape[-1]
        for i0 in range(0, d, SYMMETRIZE_BLOCK):
            i1 = min(i0 + SYMMETRIZE_BLOCK, d)
            if i0:  # rows i0..i1, columns < i0: the transpose of the panel above the diagonal
                acc[i0:i1, :i0].copy_(acc[:i0, i0:i1].mT)
            for i in range(i0 + 1, i1):
                acc[i, i0:i].copy_(acc[i0:i, i])
    return acc


def _rows(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as ``(T, d)`` in ``dtype`` with masked-out rows zeroed (reference only: it copies).

    ``torch.where`` rather than a product, so NaN/inf in masked-out rows never propagate.
    """
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    if mask is not None:
        x2 = torch.where(mask.reshape(-1, 1).bool(), x2, 0)
    return x2


def syrk_accumulate_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float = 1.0) -> torch.Tensor:
    """``acc += scale * x_mᵀ x_m`` (reference). See :func:`fisherlora.ops.syrk_accumulate_`."""
    x2 = _rows(x, mask, acc.dtype)
    update = x2.mT @ x2
    if scale != 1.0:
        update.mul_(scale)
    if acc.dim() == 1:
        acc.add_(pack_triu(update))
    else:
        acc.add_(update)
    return acc


def fisher_energy(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ M Q)`` (reference). See :func:`fisherlora.ops.fisher_energy`."""
    dtype = torch.promote_types(M.dtype, torch.float32)
    if M.dim() == 1:
        M = unpack_triu(M, Q.shape[0])
    Qc = Q.to(dtype)
    return ((M.to(dtype) @ Qc) * Qc).sum(0)


def projected_sq_accumulate_(acc: torch.Tensor, x: torch.Tensor, Q: torch.Tensor,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """``acc += Σ_t (Qᵀ x_t)²`` (reference). See :func:`fisherlora.ops.projected_sq_accumulate_`."""
    x2 = _rows(x, mask, acc.dtype)
    acc.add_((x2 @ Q.to(acc.dtype)).square().sum(0))
    return acc


def gradient_accumulate_(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None = None,
                         scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """``acc += scale * g_mᵀ a_m`` (``a_mᵀ g_m`` with ``transpose``) (reference).
    See :func:`fisherlora.ops.gradient_accumulate_`."""
    g2, a2 = _rows(g, mask, acc.dtype), _rows(a, mask, acc.dtype)
    update = a2.mT @ g2 if transpose else g2.mT @ a2
    acc.add_(update, alpha=scale)
    return acc
