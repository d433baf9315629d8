"""Fisher energy, selection and the LoRA factors (docs/DESIGN.md §1 steps 2-5)."""

import pytest
import torch

from fisherlora.config import Magnitude
from fisherlora.decompose import (
    adapter_magnitudes,
    decompose_layer,
    direction_energy,
    lora_factors,
    residual_weight,
    select_directions,
)


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d + 2, generator=g, dtype=torch.float64)
    return a @ a.T / d


@pytest.mark.parametrize("d_out, d_in", [(5, 4), (3, 6), (4, 4)])
def test_energy_equals_kronecker_quadratic_form(d_out, d_in):
    g = torch.Generator().manual_seed(d_out * 10 + d_in)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    A, G = _spd(d_in, 1), _spd(d_out, 2)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    _, _, e = direction_energy(U, Vh, A, G, backend="torch")
    F = torch.kron(A, G)  # vec() stacks columns: (A ⊗ G) vec(X) = vec(G X A)
    for i in range(S.numel()):
        x = torch.outer(U[:, i], Vh[i]).T.reshape(-1)  # column-major vec of u_i v_iᵀ
        torch.testing.assert_close(e[i], x @ F @ x, rtol=1e-12, atol=1e-14)


def test_damping_adds_to_each_factor():
    W = torch.randn(6, 5, dtype=torch.float64)
    A, G = _spd(5, 3), _spd(6, 4)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    gu, av, e = direction_energy(U, Vh, A, G, damping=0.0, backend="torch")
    gu2, av2, e2 = direction_energy(U, Vh, A, G, damping=0.5, backend="torch")
    torch.testing.assert_close(e2, (gu + 0.5) * (av + 0.5))


def test_selection_orders_by_score_and_breaks_ties_by_sigma():
    score = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    sigma = torch.tensor([5.0, 4.0, 4.5, 2.0, 1.0])
    assert select_directions(score, sigma, 3).tolist() == [2, 1, 4]
    assert select_directions(score, sigma, 5).tolist() == [2, 1, 4, 0, 3]
    with pytest.raises(ValueError, match="exceeds"):
        select_directions(score, sigma, 6)


def test_magnitudes():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    energy = torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    idx = torch.tensor([3, 1])
    assert adapter_magnitudes(sigma, energy, idx, "sigma").tolist() == [1.0, 3.0]
    assert adapter_magnitudes(sigma, energy, idx, "top_sigma").tolist() == [4.0, 3.0]
    assert adapter_magnitudes(sigma, energy, idx, "unit").tolist() == [1.0, 1.0]
    m = adapter_magnitudes(sigma, energy, idx, Magnitude.ENERGY)
    torch.testing.assert_close(m.norm(), sigma[idx].norm())
    torch.testing.assert_close(m[0] / m[1], torch.tensor(3.0, dtype=torch.float64))


@pytest.mark.parametrize("magnitude", list(Magnitude))
@pytest.mark.parametrize("score", ["fisher", "fisher_sigma"])
def test_layer_factors_reconstruct_and_are_orthogonal(magnitude, score):
    torch.manual_seed(0)
    W = torch.randn(12, 9)
    A, G = _spd(9, 5).float(), _spd(12, 6).float()
    s = 2.0
    sel, B, A_lora = decompose_layer("layer", W, A, G, rank=4, scaling=s, score=score, magnitude=magnitude,
                                     backend="torch")
    W_res = residual_weight(W, B, A_lora, s)
    torch.testing.assert_close(W_res + s * B @ A_lora, W, rtol=0, atol=1e-5)
    # the directions of B and A are singular vectors of W: orthogonal columns / rows
    Bn = B / B.norm(dim=0)
    An = A_lora / A_lora.norm(dim=1, keepdim=True)
    torch.testing.assert_close(Bn.T @ Bn, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(An @ An.T, torch.eye(4), atol=1e-5, rtol=0)
    # the residual has no component along the chosen directions when they carry their own σ
    if magnitude == Magnitude.SIGMA:
        torch.testing.assert_close(Bn.T @ W_res @ An.T, torch.zeros(4, 4), atol=1e-4, rtol=0)
    assert sel.indices.numel() == 4 and 0 <= sel.energy_captured <= 1


def test_rank_larger_than_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(d_out, d_in\) = 4 of layer 'x'"):
        decompose_layer("x", torch.randn(4, 6), torch.eye(6), torch.eye(4), rank=5, scaling=1.0, backend="torch")


def test_lora_factors_scale():
    U = torch.eye(3)[:, :2]
    Vh = torch.eye(3)[:2]
    B, A = lora_factors(U, Vh, torch.tensor([4.0, 1.0], dtype=torch.float64), scaling=0.25)
    torch.testing.assert_close(0.25 * B @ A, torch.diag(torch.tensor([4.0, 1.0, 0.0])))




def test_fewer_counted_tokens_than_d_in_warns_with_damping_advice_and_ranks_deterministically():
    """Six tokens for 32-wide inputs: A has rank <= 6, most directions have zero A-energy."""
    import warnings

    import fisherlora
    from fisherlora import FisherLoraConfig
    from fisherlora.ops import available_backends
    from tests.models import pad_batch, random_sequences, tiny_llama

    seqs, labels = random_sequences(1, vocab=101, seed=4, min_len=6, max_len=6)
    data = [pad_batch(seqs, labels)]
    chosen = []
    for backend in available_backends("cpu")[:2]:
        for stats_dtype in ("float32", "float64"):
            cfg = FisherLoraConfig(rank=8, alpha=8, backend=backend, stats_dtype=stats_dtype)
            with pytest.warns(UserWarning, match=r"rank-deficient in 14 of 14 layers \(worst .*: 6 counted tokens for "
                                                     r"d_in = 48\).*damping") as rec:
                result = fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, data, cfg, progress=False)
            assert sum("rank-deficient" in str(w.message) for w in rec) == 1, "one warning listing the layers"
            chosen.append({n: s.indices.tolist() for n, s in result.selections.items()})
    assert all(c == chosen[0] for c in chosen[1:]), "the ranking depends on the backend or the statistics dtype"
    # one warning for the whole run, also when each layer group decomposes on its own
    with pytest.warns(UserWarning, match="rank-deficient") as rec:
        fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, data,
                                          FisherLoraConfig(rank=8, alpha=8, layer_groups=2), progress=False)
    found = [str(w.message) for w in rec if "rank-deficient" in str(w.message)]
    assert len(found) == 1 and "in 14 of 14 layers (worst " in found[0], found
    with warnings.catch_warnings():  # damping ranks those directions by their gradient curvature: no warning
        warnings.filterwarnings("error", message=".*rank-deficient")
        fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, data,
                                          FisherLoraConfig(rank=8, alpha=8, damping=1e-3), progress=False)
    with warnings.catch_warnings():  # enough tokens: no warning
        warnings.simplefilter("error", UserWarning)
        seqs, labels = random_sequences(8, vocab=101, seed=4, min_len=9, max_len=9)
        fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, [pad_batch(seqs, labels)],
                                          FisherLoraConfig(rank=4, alpha=8, backend="torch"), progress=False)
