"""The reference ops against float64 hand computations, and the shared argument checks."""

import warnings

import pytest
import torch

from fisherlora import ops
from tests.op_cases import (
    BAD_CALLS,
    ENERGY_CASES,
    GRAD_CALLS,
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
