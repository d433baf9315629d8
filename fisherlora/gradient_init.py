"""The gradient starts (docs/DESIGN.md §1 step 6): LoRA factors from the weight gradient ``∇W``
that the calibration hooks gather beside ``A`` and ``G``.

- ``gradient``: the singular vectors of ``∇W`` itself, split as LoRA-GA splits them (``A`` from
  the first ``r`` right singular vectors, ``B`` from the next ``r`` left ones).
- ``natural_gradient``: the same split of the Fisher-optimal rank-``2r`` subspace of the damped
  K-FAC natural gradient ``N = G_λ⁻¹ ∇W A_λ⁻¹`` (``G_λ = G + λ_G I``, ``A_λ = A + λ_A I``): the
  singular triplets ``(p_i, σ_i, q_i)`` of the whitened gradient ``M = G_λ^{-1/2} ∇W A_λ^{-1/2}``,
  mapped back to ``l_i = G_λ^{-1/2} p_i`` and ``ρ_i = A_λ^{-1/2} q_i``.

Both use unit-norm directions and one scale rule, ``B = ζ [l_{r+1} … l_{2r}]``,
``A = ζ [ρ_1 … ρ_r]ᵀ`` with ``ζ = d_out^{1/4} / √γ`` (``γ`` = :data:`STABLE_GAMMA`), so the two
differ in their subspace only; the residual ``W − s·BA`` keeps the outputs at step 0.
"""

from __future__ import annotations

import math
import warnings

import torch

from fisherlora import ops
from fisherlora.config import Init
from fisherlora.svd import canonical_signs

__all__ = ["STABLE_GAMMA", "RELATIVE_DAMPING", "stable_scale", "factor_damping", "damped_inverse_sqrt",
           "gradient_directions", "gradient_factors", "check_gradient_ranks", "decompose_gradient_layer",
           "warn_degenerate_gradients"]

#: ``γ`` of the scale rule ``ζ = d_out^{1/4}/√γ`` (the default ``stable_gamma`` of PEFT's ``LoraGAConfig``)
STABLE_GAMMA = 16.0
#: with ``damping = 0``, each factor's damping is this fraction of its mean eigenvalue ``tr(M)/d``
RELATIVE_DAMPING = 1e-2


def stable_scale(d_out: int) -> float:
    """``ζ = d_out^{1/4} / √γ``: the norm of every column of ``B`` and every row of ``A``."""
    return d_out ** 0.25 / math.sqrt(STABLE_GAMMA)


def factor_damping(M: torch.Tensor, damping: float) -> float:
    """``λ`` added to the dense symmetric factor ``M`` ``(d, d)`` before it is inverted:
    ``damping`` when positive (in the units of ``A`` and ``G``), else
    :data:`RELATIVE_DAMPING` ``· tr(M)/d`` (its mean eigenvalue), or the smallest normal float64
    when ``M`` is zero (its layer's gradient is then zero too)."""
    if damping > 0:
        return float(damping)
    mean = float(torch.diagonal(M).double().sum()) / M.shape[0]
    return RELATIVE_DAMPING * mean if mean > 0 else torch.finfo(torch.float64).tiny


def damped_inverse_sqrt(M: torch.Tensor, lam: float) -> torch.Tensor:
    """``(M + λI)^{-1/2}``, float64 ``(d, d)``, from the eigendecomposition of the symmetric ``M``
    (eigenvalues below 0, rounding of a positive semi-definite factor, are taken as 0)."""
    w, V = torch.linalg.eigh(M.to(torch.float64))
    return (V * (w.clamp_min(0) + lam).rsqrt()) @ V.mT


def _dense(M: torch.Tensor, d: int) -> torch.Tensor:
    """A factor as a dense ``(d, d)`` matrix (a packed one unpacked)."""
    return ops.unpack_triu(M, d) if M.dim() == 1 else M


def gradient_directions(grad: torch.Tensor, A: torch.Tensor | None = None, G: torch.Tensor | None = None,
                        damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit left and right directions of the gradient, best first, in float64.

    Args:
        grad: ``(d_out, d_in)`` weight gradient ``∇W``.
        A, G: the layer's K-FAC factors ``(d_in, d_in)`` and ``(d_out, d_out)`` (dense or packed);
            ``None`` for the plain gradient.
        damping: ``λ`` of :func:`factor_damping` (``0``: relative to each factor's mean eigenvalue).

    Returns:
        ``(L, sigma, R)``: ``(d_out, k)``, ``(k,)``, ``(d_in, k)`` with ``k = min(d_out, d_in)``.
        Plain: ``∇W``'s singular vectors and values. With ``A`` and ``G``: the columns of
        ``G_λ^{-1/2} P`` and ``A_λ^{-1/2} Q`` scaled to unit norm, and ``σ``, for the SVD
        ``P diag(σ) Qᵀ`` of ``M = G_λ^{-1/2} ∇W A_λ^{-1/2}`` (``σ_i²`` is the Fisher energy
        ``‖G_λ^{1/2} X A_λ^{1/2}‖_F²`` of the natural gradient's ``i``-th component ``X``).
    """
    g = grad.to(torch.float64)
    if A is None or G is None:
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)
        return U, S, Vh.mT
    d_out, d_in = g.shape
    G_, A_ = _dense(G, d_out).to(g.device), _dense(A, d_in).to(g.device)
    Gi = damped_inverse_sqrt(G_, factor_damping(G_, damping))
    Ai = damped_inverse_sqrt(A_, factor_damping(A_, damping))
    P, S, Qh = torch.linalg.svd(Gi @ g @ Ai, full_matrices=False)
    L = torch.nn.functional.normalize(Gi @ P, dim=0)
    R = torch.nn.functional.normalize(Ai @ Qh.mT, dim=0)
    return L, S, R


def gradient_factors(L: torch.Tensor, R: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's split: ``B = ζ L[:, r:2r]`` ``(d_out, r)`` and ``A = ζ R[:, :r]ᵀ`` ``(r, d_in)``,
    float32, each pair ``(l_i, ρ_i)`` first signed by :func:`fisherlora.svd.canonical_signs`."""
    U, Vh = canonical_signs(L[:, :2 * rank], R[:, :2 * rank].mT)
    zeta = stable_scale(L.shape[0])
    return (zeta * U[:, rank:2 * rank]).float(), (zeta * Vh[:rank]).float()


def check_gradient_ranks(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], init: Init | str) -> None:
    """The gradient starts take ``2r`` directions of each layer: refuse a layer with ``2r > min(d_out, d_in)``.

    Raises:
        ValueError: naming the first such layers, their shapes and ranks.
    """
    if not Init(init).needs_gradient:
        return
    bad = [(n, shapes[n], r) for n, r in ranks.items() if 2 * r > min(shapes[n])]
    if bad:
        listed = ", ".join(f"{n!r} {tuple(s)} at rank {r}" for n, s, r in bad[:3])
        raise ValueError(f"init={Init(init).value!r} takes A from the first r and B from the next r directions of the "
                         f"gradient, so it needs 2·rank <= min(d_out, d_in); {len(bad)} layer(s) do not allow that: "
                         f"{listed}. Lower the rank (rank_pattern) or leave those layers out")


def decompose_gradient_layer(name: str, grad: torch.Tensor, A: torch.Tensor | None, G: torch.Tensor | None, *,
                             rank: int, init: Init | str, damping: float = 0.0, device=None):
    """The gradient start of one layer.

    Args:
        name: module name (errors, the report). grad: ``(d_out, d_in)`` ``∇W``.
        A, G: the K-FAC factors (dense or packed; read by ``natural_gradient`` only).
        rank: ``r``, with ``2r <= min(d_out, d_in)``. init: ``gradient`` or ``natural_gradient``.
        damping: see :func:`factor_damping`. device: where the factors go (default ``grad``'s).

    Returns:
        ``(sigma, B, A_lora)``: the (whitened) gradient's ``k`` singular values (float64, on the
        CPU), ``B`` ``(d_out, r)`` and ``A_lora`` ``(r, d_in)`` float32.
    """
    init = Init(init)
    d_out, d_in = grad.shape
    check_gradient_ranks({name: (d_out, d_in)}, {name: rank}, init)
    natural = init is Init.NATURAL_GRADIENT
    L, S, R = gradient_directions(grad, A if natural else None, G if natural else None, damping)
    B, A_lora = gradient_factors(L, R, rank)
    device = device if device is not None else grad.device
    return S.cpu(), B.to(device), A_lora.to(device)


def warn_degenerate_gradients(names: list[str]) -> None:
    """One warning naming the layers whose (whitened) gradient has fewer than ``2r`` singular values
    above ``1e-10·σ_1``: the directions past its rank are an arbitrary orthonormal completion."""
    if names:
        warnings.warn(f"the weight gradient of {len(names)} layer(s) (e.g. {names[0]!r}) has rank below 2·rank: the "
                      "gradient start's directions past that rank are an arbitrary completion (a zero gradient "
                      "gives arbitrary directions throughout). Calibrate on more tokens (num_samples, max_length), "
                      "or check that the loss reaches these layers", UserWarning, stacklevel=4)
