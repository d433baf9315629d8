"""Thin SVDs of the target weights: the float64 Gram path, its fallback, and its workspace."""

from __future__ import annotations

import torch

from fisherlora.memory import all_finite, release_host_memory

__all__ = ["thin_svd", "svd_gram_eigh", "svd_workspace_bytes", "iter_thin_svd", "canonical_signs"]


def thin_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``W = U diag(S) Vh`` in float32, ``k = min(d_out, d_in)``.

    bf16/fp16 weights are upcast (the solvers do not support them); if the float32 solver fails
    (ill-conditioned input), the decomposition is retried in float64 on the CPU.

    Args:
        W: ``(d_out, d_in)`` weight, any floating dtype and device.

    Returns:
        ``U`` ``(d_out, k)``, ``S`` ``(k,)`` descending, ``Vh`` ``(k, d_in)``; float32 on ``W``'s device.
    """
    W32 = W.detach().to(torch.float32)
    try:
        U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
        if torch.isfinite(S).all():
            return U, S, Vh
    except (RuntimeError, torch.linalg.LinAlgError):
        pass
    U, S, Vh = torch.linalg.svd(W.detach().to("cpu", torch.float64), full_matrices=False)
    return tuple(t.to(W.device, torch.float32) for t in (U, S, Vh))


#: rows of the long side converted to the working dtype at a time by :func:`svd_gram_eigh`
GRAM_BLOCK_ROWS = 1024
#: smallest σ/σ_max the float64 Gram path resolves; below it :func:`iter_thin_svd` uses :func:`thin_svd`
GRAM_MIN_SIGMA_RATIO = 1e-7


def svd_gram_eigh(W: torch.Tensor, dtype: torch.dtype = torch.float64, out_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD through ``eigh`` of the float64 Gram matrix, batched over leading dims.

    ``WᵀW = V diag(σ²) Vᵀ`` (of the smaller side), ``σ = √λ``, ``U = W V / σ``. Forming the Gram
    matrix squares the condition number, which float64 absorbs: on float32 weights this is as
    accurate as float32 ``torch.linalg.svd`` (more, measured against a float64 SVD by
    ``bench/svd_paths.py``), and faster on CPUs and GPUs. Directions with ``σ`` below about
    ``1e-8·σ_max`` are not resolved (neither are they by a float32 SVD).

    ``W`` is never copied whole: the Gram matrix is accumulated, and ``U`` formed, over blocks of
    :data:`GRAM_BLOCK_ROWS` rows of the long side converted one at a time, and ``U`` is written
    straight into ``out_dtype``. The peak is :func:`svd_workspace_bytes`.

    Args:
        W: ``(..., d_out, d_in)`` any float dtype.
        dtype: the working dtype (float32 only to show what it loses: ``bench/svd_paths.py``).
        out_dtype: dtype of the returned ``U`` and ``Vh`` (default ``dtype``).

    Returns:
        ``U`` ``(..., d_out, k)``, ``S`` ``(..., k)`` descending (``dtype``), ``Vh`` ``(..., k, d_in)``.
    """
    W = W.detach()
    out_dtype = out_dtype or dtype
    tall = W.shape[-2] >= W.shape[-1]
    M = W if tall else W.mT  # (..., m, k), m >= k: a view
    m, k = M.shape[-2:]
    gram = torch.zeros(*M.shape[:-2], k, k, dtype=dtype, device=W.device)
    for r0 in range(0, m, GRAM_BLOCK_ROWS):
        block = M[..., r0 : r0 + GRAM_BLOCK_ROWS, :].to(dtype)
        gram += block.mT @ block
        del block
    lam, V = torch.linalg.eigh(gram)
    del gram
    lam, V = lam.flip(-1), V.flip(-1)
    S = lam.clamp_min(0).sqrt()
    inv_s = S.clamp_min(torch.finfo(dtype).tiny).reciprocal().unsqueeze(-2)
    U = torch.empty(*M.shape[:-1], k, dtype=out_dtype, device=W.device)
    for r0 in range(0, m, GRAM_BLOCK_ROWS):
        U[..., r0 : r0 + GRAM_BLOCK_ROWS, :] = (M[..., r0 : r0 + GRAM_BLOCK_ROWS, :].to(dtype) @ V).mul_(inv_s)
    V = V.to(out_dtype)
    return (U, S, V.mT) if tall else (V, S, U.mT)


def svd_workspace_bytes(d_out: int, d_in: int, out_bytes: int = 4) -> int:
    """Peak bytes :func:`iter_thin_svd` allocates for one ``(d_out, d_in)`` matrix on the Gram path.

    With ``m ≥ k`` the long and short sides and ``b = min(m,`` :data:`GRAM_BLOCK_ROWS` ``)``: the
    larger of ``eigh``'s moment (the Gram matrix, its eigenvectors and LAPACK ``syevd``'s work
    arrays: ``4k² + 7k`` doubles and ``5k`` integers) and the moment ``U`` is formed (the flipped
    eigenvectors, one block with its product, ``k² + 2·b·k`` doubles, three ``k``-vectors of
    doubles, and ``U`` itself, ``m·k·out_bytes``). Bounds the CPU allocator within 2 %
    (tests/test_svd.py); cuSOLVER sizes its work array differently, so on a GPU it is an estimate.
    """
    m, k = max(d_out, d_in), min(d_out, d_in)
    b = min(m, GRAM_BLOCK_ROWS)
    return max(32 * k * k + 76 * k + 64, 8 * (k * k + 2 * b * k + 3 * k) + m * k * out_bytes)


#: default SVD path per device type, chosen by ``bench/svd_paths.py`` (time and accuracy, bench/RESULTS.md):
#: the float64 Gram path on both. On an H200 it took 0.11-0.125 s per Llama-3-8B projection against
#: 1.0-1.4 s for torch's float32 SVD (gesvdj), with a residual of 6e-15 against 9e-4.
SVD_METHOD = {"cpu": "gram_eigh", "cuda": "gram_eigh"}
def iter_thin_svd(weights: dict[str, torch.Tensor], *, out_dtype: torch.dtype = torch.float32,
                  seconds: dict | None = None, method: str = "auto"):
    """Thin SVDs of many weights, one matrix per solver call; yields ``(name, (U, S, Vh))`` in
    the order of ``weights``.

    One matrix per call: batching buys nothing for matrices this large (LAPACK uses every core on
    one matrix; torch loops cuSOLVER's eigh over a batch), while a stack's workspace grows with
    it. Each matrix's workspace is released before the next one is decomposed, so a consumer
    that keeps only what it needs holds one at a time. A matrix whose solver fails (or, on the
    Gram path, whose smallest σ is below :data:`GRAM_MIN_SIGMA_RATIO`·σ_max: a rank-deficient
    weight) is redone with :func:`thin_svd` (float32 SVD, float64 retry).

    Args:
        weights: name -> ``(d_out, d_in)`` weight (any float dtype).
        out_dtype: dtype of the yielded ``U`` and ``Vh`` (``S`` is float32).
        seconds: if given, ``"d_outxd_in"`` -> seconds spent in the solver is added to it.
        method: ``"svd"`` (float32 ``torch.linalg.svd``), ``"gram_eigh"`` (:func:`svd_gram_eigh`)
            or ``"auto"`` (:data:`SVD_METHOD` for the device).

    Yields:
        ``(name, (U, S, Vh))`` with ``U`` ``(d_out, k)``, ``S`` ``(k,)``, ``Vh`` ``(k, d_in)``.
    """
    import time

    for name, W in weights.items():
        t0 = time.perf_counter()
        how = SVD_METHOD.get(W.device.type, "svd") if method == "auto" else method
        result = None
        try:
            if how == "gram_eigh":  # converts block by block itself: no float32 copy of W
                result = svd_gram_eigh(W, out_dtype=out_dtype)
            else:
                result = torch.linalg.svd(W.detach().to(torch.float32), full_matrices=False)
            # the Gram path cannot resolve directions with σ under ~1e-7·σ_max (U = W v / σ blows
            # up for a rank-deficient W): such matrices go to thin_svd below
            S = result[1]
            if (how == "gram_eigh" and not S[-1] > GRAM_MIN_SIGMA_RATIO * S[0]) or not all(
                    all_finite(t) for t in result):
                result = None
            del S
        except (RuntimeError, torch.linalg.LinAlgError):
            result = None
        if result is None:
            result = thin_svd(W)
        if seconds is not None:
            key = f"{W.shape[0]}x{W.shape[1]}"
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        U, S, Vh = result
        del result
        yield name, (U.to(out_dtype), S.to(torch.float32), Vh.to(out_dtype))
        del U, S, Vh
        if W.device.type == "cpu":
            release_host_memory()


def canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular-vector sign rule (docs/DESIGN.md §7), IN PLACE: each pair ``(u_i, v_i)`` is
    flipped together (so ``u_i σ_i v_iᵀ`` is unchanged) to make the entry of ``u_i`` of largest
    magnitude (the first one on ties) positive. Solvers return either sign; with this rule the
    adapter does not depend on which solver, thread count or rank computed the SVD. No temporary
    of ``U``'s size (the decomposition's peak is planned, docs/DESIGN.md §4).

    Args:
        U: ``(d_out, r)`` columns. Vh: ``(r, d_in)`` rows, matching them. Both are modified.

    Returns:
        ``(U, Vh)``, the same tensors, with the signs fixed.
    """
    imax, imin = U.argmax(0, keepdim=True), U.argmin(0, keepdim=True)
    vmax, vmin = U.gather(0, imax), U.gather(0, imin)
    neg = (vmin.abs() > vmax.abs()) | ((vmin.abs() == vmax.abs()) & (imin < imax))
    sign = torch.where(neg, -1.0, 1.0).to(U.dtype)
    U.mul_(sign)
    Vh.mul_(sign.mT.to(Vh.dtype))
    return U, Vh
