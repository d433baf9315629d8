"""Thin SVDs: the float64 Gram path against a float64 SVD, its workspace, rank-deficient weights."""

import pytest
import torch

from fisherlora.svd import thin_svd


def test_thin_svd_upcasts_low_precision():
    W = torch.randn(8, 5).to(torch.bfloat16)
    U, S, Vh = thin_svd(W)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_gram_eigh_path_matches_a_float64_svd(shape):
    from fisherlora.svd import iter_thin_svd, svd_gram_eigh

    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(3, *shape, generator=g)
    U, S, Vh = svd_gram_eigh(W)
    ref = torch.linalg.svdvals(W.double())
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, W.double(), rtol=1e-10, atol=1e-10)
    k = min(shape)
    torch.testing.assert_close(U.mT @ U, torch.eye(k, dtype=torch.float64).expand(3, k, k), atol=1e-10, rtol=0)
    # both paths of iter_thin_svd give the same triplets (up to sign)
    ws = {f"w{i}": W[i] for i in range(3)}
    a = dict(iter_thin_svd(ws, method="gram_eigh"))
    b = dict(iter_thin_svd(ws, method="svd"))
    for n in ws:
        torch.testing.assert_close(a[n][1], b[n][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((a[n][0] * b[n][0]).sum(0).abs(), torch.ones(k), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(300, 100), (100, 300), (200, 200), (1400, 400), (16000, 64), (64, 16000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_svd_workspace_formula_bounds_the_allocator(shape, dtype):
    """The memory plan's SVD term bounds what one matrix on the Gram path allocates, within 2 %
    (profiler, CPU), for square, wide and long narrow weights (an output head)."""
    from fisherlora.svd import iter_thin_svd, svd_workspace_bytes
    from fisherlora.testing import peak_memory

    weights = {"w": torch.randn(*shape, dtype=dtype)}
    peak, _ = peak_memory(lambda: list(iter_thin_svd(weights, method="gram_eigh")), torch.device("cpu"))
    assert 1.0 <= svd_workspace_bytes(*shape) / peak <= 1.02, (peak, svd_workspace_bytes(*shape))


def test_rank_deficient_weight_gets_finite_orthonormal_bases():
    """The Gram path's U = W v / σ overflows for σ = 0: such weights go to the SVD solver."""
    from fisherlora.svd import iter_thin_svd

    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 48, generator=g)
    W[24:] = W[:8]  # duplicated rows: rank 24 of 32
    ((_, (U, S, Vh)),) = list(iter_thin_svd({"w": W}))
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    torch.testing.assert_close(U.mT @ U, torch.eye(32), atol=1e-4, rtol=0)
    torch.testing.assert_close((U * S) @ Vh, W, atol=1e-4, rtol=1e-4)
    assert S[-1] < 1e-4 * S[0]


def test_the_sign_rule_makes_the_adapter_independent_of_the_solver_signs():
    """docs/DESIGN.md §7: whichever signs the solver (or rank) returned, the same factors."""
    from fisherlora.decompose import decompose_layer
    from fisherlora.svd import canonical_signs

    g = torch.Generator().manual_seed(5)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    X = torch.randn(40, 16, generator=g, dtype=torch.float64)
    Y = torch.randn(40, 24, generator=g, dtype=torch.float64)
    A, G = X.T @ X / 40, Y.T @ Y / 40
    U, S, Vh = thin_svd(W)
    flip = torch.where(torch.rand(S.shape, generator=g) < 0.5, -1.0, 1.0)
    runs = [decompose_layer("w", W, A, G, rank=6, scaling=2.0, svd=svd) for svd in
            ((U, S, Vh), (U * flip, S, Vh * flip[:, None]))]
    for a, b in zip(runs[0][1:], runs[1][1:]):
        assert torch.equal(a, b)
    Uc, Vc = canonical_signs(U.clone(), Vh.clone())
    assert (Uc.gather(0, Uc.abs().argmax(0, keepdim=True)) > 0).all()
    torch.testing.assert_close(Uc @ torch.diag(S) @ Vc, U @ torch.diag(S) @ Vh)
