"""The reference ops against float64 hand computations, and the shared argument checks."""

import warnings

import pytest
import torch

from fisherlora import ops
from tests.op_cases import (
    BAD_CALLS,
    ENERGY_CASES,
    GRAD_CALLS,
    GRADIENT_CASES,
    GRADIENT_GRAD_CALLS,
    PROJECTED_CASES,
    SYRK_CASES,
    assert_close_to_reference,
    assert_no_graph,
    assert_refused,
)


def _syrk64(x, mask):
    rows = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]
    return rows.T @ rows


@pytest.mark.parametrize("case", SYRK_CASES)
def test_syrk_reference_matches_hand_computation(case):
    x, mask = case.make_x()
    d = case.d
    acc = torch.zeros((d, d) if case.layout == "dense" else (ops.packed_size(d),))
    ops.syrk_accumulate_(acc, x, mask, scale=0.5, backend="torch")
    full = ops.symmetrize_(acc) if case.layout == "dense" else ops.unpack_triu(acc, d)
    ref = 0.5 * _syrk64(x, mask)
    assert_close_to_reference(full, ref, ref.float(), case.id, rel_floor=1e-5)


@pytest.mark.parametrize("case", ENERGY_CASES)
def test_fisher_energy_reference(case):
    M, Q = case.make_sym(), case.make_q()
    dense = M if case.layout == "dense" else ops.unpack_triu(M, case.d)
    ref = torch.diag(Q.double().T @ dense.double() @ Q.double())
    out = ops.fisher_energy(M, Q, backend="torch")
    assert out.dtype == torch.float32 and out.shape == (case.k,)
    assert_close_to_reference(out, ref, ref.float(), case.id, rel_floor=1e-5)


@pytest.mark.parametrize("case", PROJECTED_CASES)
def test_projected_sq_reference_equals_energy_of_gram(case):
    x, mask = case.make_x()
    Q = case.make_q()
    acc = torch.zeros(case.k)
    ops.projected_sq_accumulate_(acc, x, Q, mask, backend="torch")
    ref = torch.diag(Q.double().T @ _syrk64(x, mask) @ Q.double())
    assert_close_to_reference(acc, ref, ref.float(), case.id, rel_floor=1e-5)


def _gradient64(g, a, mask, transpose=False):
    """``Σ_t g_t a_tᵀ`` over the kept tokens, in float64, by an explicit loop over tokens."""
    gr, ar = g.reshape(-1, g.shape[-1]).double(), a.reshape(-1, a.shape[-1]).double()
    keep = torch.ones(gr.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    out = torch.zeros(gr.shape[1], ar.shape[1], dtype=torch.float64)
    for t in keep.nonzero().flatten().tolist():
        out += torch.outer(gr[t], ar[t])
    return out.T if transpose else out


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradient_reference_matches_hand_computation(case):
    g, a, mask = case.make_ga()
    ref = -0.5 * _gradient64(g, a, mask, case.transpose)
    acc = torch.zeros(case.acc_shape())
    out = ops.gradient_accumulate_(acc, g, a, mask, scale=-0.5, transpose=case.transpose, backend="torch")
    assert out is acc
    assert_close_to_reference(acc, ref, ref.float(), case.id, rel_floor=1e-5)
    acc64 = torch.ones(case.acc_shape(), dtype=torch.float64)  # accumulates onto what is there
    ops.gradient_accumulate_(acc64, g, a, mask, scale=-0.5, transpose=case.transpose, backend="torch")
    assert_close_to_reference(acc64, ref + 1, ref + 1, case.id + "-acc64", rel_floor=1e-12)


def test_gradient_is_the_autograd_weight_gradient_of_a_linear_and_a_conv1d():
    """Over the unmasked tokens, the op gives what autograd gives as the weight gradient of the
    loss restricted to those tokens: nn.Linear's (d_out, d_in), and transposed a Conv1D's (d_in, d_out)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, dtype=torch.float64)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.rand(2, 5) > 0.3
    y = lin(x)
    y.retain_grad()
    (y.sin() * mask.unsqueeze(-1)).sum().backward()
    acc = torch.zeros(4, 6, dtype=torch.float64)
    ops.gradient_accumulate_(acc, y.grad, x, mask, backend="torch")
    torch.testing.assert_close(acc, lin.weight.grad, rtol=1e-12, atol=1e-12)
    accT = torch.zeros(6, 4, dtype=torch.float64)
    ops.gradient_accumulate_(accT, y.grad, x, mask, transpose=True, backend="torch")
    torch.testing.assert_close(accT, lin.weight.grad.T, rtol=1e-12, atol=1e-12)


def test_gradient_nan_in_masked_rows_never_reaches_acc_and_zero_tokens_leave_it():
    g, a = torch.randn(4, 3), torch.randn(4, 2)
    g[1], a[2] = float("nan"), float("inf")
    mask = torch.tensor([True, False, False, True])
    acc = torch.zeros(3, 2)
    ops.gradient_accumulate_(acc, g, a, mask, backend="torch")
    torch.testing.assert_close(acc, torch.outer(g[0], a[0]) + torch.outer(g[3], a[3]))
    before = acc.clone()
    ops.gradient_accumulate_(acc, g[:0], a[:0], backend="torch")
    ops.gradient_accumulate_(acc, g, a, torch.zeros(4, dtype=torch.int32), backend="torch")
    assert torch.equal(acc, before)


def test_gradient_two_calls_equal_one_call_on_the_concatenation():
    g, a = torch.randn(50, 9, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    one, two = torch.zeros(9, 4, dtype=torch.float64), torch.zeros(9, 4, dtype=torch.float64)
    ops.gradient_accumulate_(one, g, a, backend="torch")
    ops.gradient_accumulate_(two, g[:20], a[:20], backend="torch")
    ops.gradient_accumulate_(two, g[20:], a[20:], backend="torch")
    torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", GRADIENT_GRAD_CALLS)
def test_gradient_inputs_that_require_grad_are_read_as_values(call):
    assert_no_graph(call, "torch")


def test_pack_unpack_roundtrip_and_layout():
    M = torch.arange(16.0).reshape(4, 4)
    M = M + M.T
    P = ops.pack_triu(M)
    assert P.shape == (10,)
    # element (i, j), i <= j, at i*d - i*(i-1)/2 + (j - i)
    assert P[1 * 4 - 0 + (3 - 1)] == M[1, 3]
    torch.testing.assert_close(ops.unpack_triu(P), M)
    with pytest.raises(ValueError, match="d\\(d\\+1\\)/2"):
        ops.packed_dim(11)


def test_two_calls_equal_one_call_on_concatenation():
    x = torch.randn(50, 9, dtype=torch.float64)
    one = torch.zeros(9, 9, dtype=torch.float64)
    two = torch.zeros(9, 9, dtype=torch.float64)
    ops.syrk_accumulate_(one, x, backend="torch")
    ops.syrk_accumulate_(two, x[:20], backend="torch")
    ops.syrk_accumulate_(two, x[20:], backend="torch")
    torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "acc, x, err, match",
    [
        (torch.zeros(4, 4, dtype=torch.float16), torch.randn(3, 4), TypeError, "acc must be float32"),
        (torch.zeros(5, 5), torch.randn(3, 4), ValueError, r"acc must be \(4, 4\) or packed \(10,\)"),
        (torch.zeros(9), torch.randn(3, 4), ValueError, "packed"),
        (torch.zeros(4, 4), torch.randint(0, 3, (3, 4)), TypeError, "x must be"),
        (torch.zeros(8, 8)[:4, :4], torch.randn(3, 4), ValueError, "contiguous"),
    ],
)
def test_syrk_rejects_bad_accumulators(acc, x, err, match):
    with pytest.raises(err, match=match):
        ops.syrk_accumulate_(acc, x)


@pytest.mark.parametrize("call", BAD_CALLS)
def test_bad_arguments_are_refused_before_any_work(call):
    assert_refused(call, "torch")


@pytest.mark.parametrize("call", GRAD_CALLS)
def test_inputs_that_require_grad_are_read_as_values(call):
    assert_no_graph(call, "torch")


def test_mask_errors():
    with pytest.raises(ValueError, match="does not match the token dims"):
        ops.syrk_accumulate_(torch.zeros(4, 4), torch.randn(2, 3, 4), torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        ops.syrk_accumulate_(torch.zeros(4, 4), torch.randn(3, 4), torch.ones(3))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.syrk_accumulate_(torch.zeros(2, 2), torch.randn(3, 2), backend="cublas")


def test_a_backend_that_fails_to_import_warns_once_and_auto_falls_back(monkeypatch):
    from fisherlora.ops import dispatch

    monkeypatch.setattr(dispatch, "_MODULES", {**dispatch._MODULES, "ext": "fisherlora.no_such_backend"})
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_errors", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(5, 3, dtype=torch.float64)
    acc = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="'ext' backend is unavailable .*ModuleNotFoundError"):
        ops.syrk_accumulate_(acc, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        ops.syrk_accumulate_(acc, x)
    torch.testing.assert_close(torch.triu(acc), torch.triu(2 * x.T @ x))
    assert "ext" not in ops.available_backends("cpu")
    with pytest.raises(RuntimeError, match="backend 'ext' is unavailable: ModuleNotFoundError"):
        ops.syrk_accumulate_(acc, x, backend="ext")


def test_a_backend_without_an_op_is_skipped_by_auto_and_refused_by_name(monkeypatch):
    """A backend built before an op existed (a stale extension): ``auto`` runs the op elsewhere,
    naming that backend raises a RuntimeError that says it lacks the op."""
    import types

    from fisherlora.ops import dispatch

    stale = types.ModuleType("stale_ext")
    stale.supports = lambda device_type: True
    stale.syrk_accumulate_ = lambda *args: pytest.fail("not this op")
    monkeypatch.setattr(dispatch, "_loaded", {**dispatch._loaded, "ext": stale})
    monkeypatch.setattr(dispatch, "_choose", lambda *args: None)
    g, a = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    acc = torch.zeros(3, 2, dtype=torch.float64)
    assert dispatch.resolve("gradient_accumulate_", "auto", torch.device("cpu"))[0] == "torch"
    ops.gradient_accumulate_(acc, g, a)
    torch.testing.assert_close(acc, g.T @ a)
    assert "ext" in ops.available_backends("cpu") and "ext" not in ops.available_backends("cpu", "gradient_accumulate_")
    with pytest.raises(RuntimeError, match="backend 'ext' has no gradient_accumulate_ .*rebuild the extension"):
        ops.gradient_accumulate_(acc, g, a, backend="ext")
