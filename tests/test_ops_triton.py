"""The Triton backend against the float64 reference over the shared op cases.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``
before the kernels are imported); on a CUDA machine without that variable the same tests run
compiled on the GPU. Shapes stay small: the interpreter executes every program in Python.
"""

from __future__ import annotations

import pytest
import torch

from fisherlora import ops
from fisherlora.ops import dispatch, reference
from tests.op_cases import (
    BAD_CALLS,
    ENERGY_CASES,
    GRAD_CALLS,
    GRADIENT_CASES,
    GRADIENT_GRAD_CALLS,
    PROJECTED_CASES,
    SYRK_CASES,
    GradCase,
    OpCase,
    assert_close_to_reference,
    assert_no_graph,
    assert_refused,
)

kernels = dispatch._load("triton")
if kernels is None:
    pytest.skip(f"Triton backend unavailable: {dispatch.load_error('triton')}", allow_module_level=True)
if kernels.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fisherlora.kernels._common import RowView  # noqa: E402

from fisherlora.kernels import gradient as triton_gradient  # noqa: E402 (after the skips)
from fisherlora.kernels import projected_sq as triton_projected  # noqa: E402
from fisherlora.kernels import syrk as triton_syrk  # noqa: E402

# The floor of the tolerance: relative to the reference's scale, as in test_ops_reference.py.
REL_FLOOR = 1e-5


def _new_acc(layout: str, d: int, device=DEVICE) -> torch.Tensor:
    return torch.zeros((d, d) if layout == "dense" else (ops.packed_size(d),), device=device)


def _full(acc: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric matrix an accumulator stands for (dense: its upper triangle mirrored)."""
    return ops.symmetrize_(acc.clone()) if acc.dim() == 2 else ops.unpack_triu(acc, d)


def _syrk(case: OpCase, x, mask, backend: str, dtype=torch.float32) -> torch.Tensor:
    acc = _new_acc(case.layout, case.d).to(dtype)
    ops.syrk_accumulate_(acc, x, mask, scale=0.5, backend=backend)
    return _full(acc, case.d)


# --- each op against the float64 reference ---------------------------------------------------

@pytest.mark.parametrize("case", SYRK_CASES)
def test_syrk_matches_reference(case):
    x, mask = case.make_x(DEVICE)
    out = _syrk(case, x, mask, "triton")
    ref64 = _syrk(case, x, mask, "torch", torch.float64)
    torch_out = _syrk(case, x, mask, "torch")  # PyTorch's own float32 result
    assert_close_to_reference(out, ref64, torch_out, case.id, rel_floor=REL_FLOOR)


@pytest.mark.parametrize("case", ENERGY_CASES)
def test_fisher_energy_matches_reference(case):
    # Q in the case's dtype: covers fp32 Q and the 16-bit Q that the kernel upcasts tile by tile.
    M, Q = case.make_sym(DEVICE), case.make_q(DEVICE).to(case.dtype)
    out = ops.fisher_energy(M, Q, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (case.k,)
    ref64 = reference.fisher_energy(M.double(), Q.double())
    torch_out = reference.fisher_energy(M, Q)
    assert_close_to_reference(out, ref64, torch_out, case.id, rel_floor=REL_FLOOR)


def _projected(x, Q, mask, backend, dtype=torch.float32):
    acc = torch.zeros(Q.shape[1], device=x.device, dtype=dtype)
    return ops.projected_sq_accumulate_(acc, x, Q, mask, backend=backend)


@pytest.mark.parametrize("case", PROJECTED_CASES)
def test_projected_sq_matches_reference(case):
    x, mask = case.make_x(DEVICE)
    Q = case.make_q(DEVICE)
    out = _projected(x, Q, mask, "triton")
    assert_close_to_reference(out, _projected(x, Q, mask, "torch", torch.float64),
                              _projected(x, Q, mask, "torch"), case.id, rel_floor=REL_FLOOR)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projected_sq_native_16bit_path(dtype):
    """x and Q in the same 16-bit dtype: the tensor-core path (upcast under the interpreter for bf16)."""
    case = OpCase(129, dtype, "dense", 37, "batched", "random", k=65)
    x, mask = case.make_x(DEVICE)
    Q = case.make_q(DEVICE).to(dtype)
    out = _projected(x, Q, mask, "triton")
    assert_close_to_reference(out, _projected(x, Q, mask, "torch", torch.float64),
                              _projected(x, Q, mask, "torch"), case.id, rel_floor=REL_FLOOR)


def _gradient(case: GradCase, g, a, mask, backend: str, dtype=torch.float32) -> torch.Tensor:
    acc = torch.zeros(case.acc_shape(), device=g.device, dtype=dtype)
    return ops.gradient_accumulate_(acc, g, a, mask, -0.5, transpose=case.transpose, backend=backend)


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradient_matches_reference(case):
    g, a, mask = case.make_ga(DEVICE)
    out = _gradient(case, g, a, mask, "triton")
    assert_close_to_reference(out, _gradient(case, g, a, mask, "torch", torch.float64),
                              _gradient(case, g, a, mask, "torch"), case.id, rel_floor=REL_FLOOR)


@pytest.mark.parametrize("split, block", [(3, None), (2, (32, 64)), (5, (64, 32))])
def test_gradient_split_k_path_and_rectangular_tiles(split, block):
    case = GradCase(129, 70, torch.float16, False, 37, "batched", "random", torch.float32)
    g, a, mask = case.make_ga(DEVICE)
    acc = torch.full(case.acc_shape(), 1.5, device=DEVICE)  # accumulates onto what is there
    triton_gradient.gradient_accumulate_(acc, g, a, mask, -0.5, split=split, block=block)
    assert_close_to_reference(acc, _gradient(case, g, a, mask, "torch", torch.float64) + 1.5,
                              _gradient(case, g, a, mask, "torch") + 1.5, case.id, rel_floor=REL_FLOOR)
    again = torch.full(case.acc_shape(), 1.5, device=DEVICE)
    triton_gradient.gradient_accumulate_(again, g, a, mask, -0.5, split=split, block=block)
    assert torch.equal(acc, again), "not bit-identical"


def test_gradient_two_calls_equal_one_call_and_float64_delegation():
    g, a = _integer_valued((50, 33), torch.bfloat16, 1), _integer_valued((50, 20), torch.bfloat16, 2)
    mask = (torch.arange(50) % 3 != 0).to(DEVICE)
    one = torch.zeros(20, 33, device=DEVICE)
    ops.gradient_accumulate_(one, g, a, mask, transpose=True, backend="triton")
    two = torch.zeros(20, 33, device=DEVICE)
    ops.gradient_accumulate_(two, g[:20], a[:20], mask[:20], transpose=True, backend="triton")
    ops.gradient_accumulate_(two, g[20:], a[20:], mask[20:], transpose=True, backend="triton")
    assert torch.equal(one, two)
    ref = reference.gradient_accumulate_(torch.zeros(20, 33, dtype=torch.float64), g, a, mask, 1.0, True)
    assert torch.equal(one.double(), ref)  # small integers: exact in every order
    acc64 = torch.zeros(20, 33, dtype=torch.float64, device=DEVICE)
    ops.gradient_accumulate_(acc64, g.double(), a, mask, transpose=True, backend="triton")
    assert torch.equal(acc64, ref)


def test_gradient_reads_non_mergeable_leading_dims_correctly():
    g = torch.randn(3, 4, 6, 9, device=DEVICE)[:, :, :5].transpose(0, 1)  # copied to rows
    a = torch.randn(4, 3, 5, 7, device=DEVICE)[..., :6]  # (4, 3, 5) tokens with a column stride of 1, row step 7
    mask = torch.rand(g.shape[:-1], device=DEVICE) > 0.3
    acc = torch.zeros(9, 6, device=DEVICE)
    ops.gradient_accumulate_(acc, g, a, mask, backend="triton")
    ref = reference.gradient_accumulate_(torch.zeros(9, 6, dtype=torch.float64), g, a, mask)
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-5)


# --- split-K / split-token reductions (forced: the heuristics never split under the interpreter)

@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_syrk_split_k_path(layout):
    case = OpCase(129, torch.bfloat16, layout, 37, "batched", "random")
    x, mask = case.make_x(DEVICE)
    acc = _new_acc(layout, case.d)
    triton_syrk.syrk_accumulate_(acc, x, mask, 0.5, split=3)
    assert_close_to_reference(_full(acc, case.d), _syrk(case, x, mask, "torch", torch.float64),
                              _syrk(case, x, mask, "torch"), case.id, rel_floor=REL_FLOOR)


def test_projected_sq_split_path():
    case = OpCase(64, torch.float16, "dense", 37, "strided", "random", k=33)
    x, mask = case.make_x(DEVICE)
    Q = case.make_q(DEVICE)
    acc = torch.full((case.k,), 1.5, device=DEVICE)  # accumulates onto what is there
    triton_projected.projected_sq_accumulate_(acc, x, Q, mask, split=3)
    ref = _projected(x, Q, mask, "torch", torch.float64) + 1.5
    assert_close_to_reference(acc, ref, _projected(x, Q, mask, "torch") + 1.5, case.id, rel_floor=REL_FLOOR)


# --- accumulation, determinism -----------------------------------------------------------

def _integer_valued(shape, dtype, seed=0):
    """Small integers: exact in bf16 and their products' sums exact in float32, so any two
    summation orders agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_two_calls_equal_one_call_on_the_concatenation(layout):
    d = 70
    x = _integer_valued((50, d), torch.bfloat16)
    mask = (torch.arange(50) % 3 != 0).to(DEVICE)
    one, two = _new_acc(layout, d), _new_acc(layout, d)
    ops.syrk_accumulate_(one, x, mask, backend="triton")
    ops.syrk_accumulate_(two, x[:20], mask[:20], backend="triton")
    ops.syrk_accumulate_(two, x[20:], mask[20:], backend="triton")
    assert torch.equal(one, two)
    # random values: equal up to float32 summation order
    xr = torch.randn(50, d, device=DEVICE)
    one, two = _new_acc(layout, d), _new_acc(layout, d)
    ops.syrk_accumulate_(one, xr, backend="triton")
    ops.syrk_accumulate_(two, xr[:20], backend="triton")
    ops.syrk_accumulate_(two, xr[20:], backend="triton")
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


def test_projected_two_calls_equal_one_call():
    x = _integer_valued((50, 33), torch.bfloat16, seed=1)
    Q = _integer_valued((33, 20), torch.bfloat16, seed=2)
    one = _projected(x, Q, None, "triton")
    two = _projected(x[:20], Q, None, "triton")
    ops.projected_sq_accumulate_(two, x[20:], Q, backend="triton")
    assert torch.equal(one, two)


def test_repeats_are_bit_identical():
    case = OpCase(129, torch.bfloat16, "packed", 37, "strided", "random", k=65)
    x, mask = case.make_x(DEVICE)
    Q, M = case.make_q(DEVICE), case.make_sym(DEVICE)
    for split in (1, 3):
        a, b = _new_acc("packed", case.d), _new_acc("packed", case.d)
        triton_syrk.syrk_accumulate_(a, x, mask, 0.5, split=split)
        triton_syrk.syrk_accumulate_(b, x, mask, 0.5, split=split)
        assert torch.equal(a, b), f"syrk split={split} not bit-identical"
    assert torch.equal(ops.fisher_energy(M, Q, backend="triton"), ops.fisher_energy(M, Q, backend="triton"))
    assert torch.equal(_projected(x, Q, mask, "triton"), _projected(x, Q, mask, "triton"))


# --- layout handling ---------------------------------------------------------------------

def test_row_view_avoids_copies_for_hook_layouts():
    big = torch.randn(3, 10, 16)
    assert not RowView(big).copied and not RowView(big).two_level
    sliced = big[:, :7]  # (B, T, d) slice of a longer buffer: two index levels, no copy
    v = RowView(sliced)
    assert not v.copied and v.two_level and (v.n_inner, v.s_inner, v.s_outer) == (7, 16, 160)
    transposed = torch.randn(16, 20).mT[::2]  # (T, d) with a row step and a column stride
    v = RowView(transposed)
    assert not v.copied and (v.s_inner, v.s_col) == (2, 20)
    assert RowView(torch.randn(2, 3, 5, 4)[:, :, :4].transpose(0, 1)).copied  # 3 groups: copied


def test_non_mergeable_leading_dims_still_correct():
    x = torch.randn(3, 4, 6, 9, device=DEVICE)[:, :, :5].transpose(0, 1)  # copied to rows
    mask = torch.rand(x.shape[:-1], device=DEVICE) > 0.3
    acc = _new_acc("packed", 9)
    ops.syrk_accumulate_(acc, x, mask, backend="triton")
    ref = reference.syrk_accumulate_(_new_acc("packed", 9).double(), x, mask)
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-5)


def test_integer_mask_and_float64_delegation():
    x = torch.randn(2, 11, 5, device=DEVICE)
    mask = (torch.arange(22, device=DEVICE).reshape(2, 11) % 2).to(torch.int64)
    acc = _new_acc("dense", 5)
    ops.syrk_accumulate_(acc, x, mask, backend="triton")
    ref = reference.syrk_accumulate_(_new_acc("dense", 5).double(), x, mask)
    torch.testing.assert_close(acc.double().triu(), ref.triu(), rtol=1e-5, atol=1e-5)
    # float64 is the reference's precision: the backend hands it to the reference unchanged
    acc64 = _new_acc("dense", 5).double()
    ops.syrk_accumulate_(acc64, x.double(), mask, backend="triton")
    torch.testing.assert_close(acc64, ref, rtol=1e-12, atol=1e-12)


# --- errors (raised once by fisherlora.ops, whatever the backend) ----------------------------

@pytest.mark.parametrize(
    "acc, err, match",
    [
        (torch.zeros(4, 4, dtype=torch.bfloat16), TypeError, "acc must be float32"),
        (torch.zeros(5, 5), ValueError, r"acc must be \(4, 4\) or packed \(10,\)"),
        (torch.zeros(9), ValueError, "packed"),
        (torch.zeros(4, 4, device="meta"), ValueError, "acc is on meta"),
    ],
)
def test_clear_errors_for_bad_accumulators(acc, err, match):
    x = torch.randn(3, 4, device=DEVICE)
    if acc.device.type != "meta":
        acc = acc.to(DEVICE)
    with pytest.raises(err, match=match):
        ops.syrk_accumulate_(acc, x, backend="triton")


@pytest.mark.parametrize("call", BAD_CALLS)
def test_bad_arguments_are_refused_before_any_work(call):
    assert_refused(call, "triton", DEVICE)


@pytest.mark.parametrize("call", GRAD_CALLS + GRADIENT_GRAD_CALLS)
def test_inputs_that_require_grad_are_read_as_values(call):
    assert_no_graph(call, "triton", DEVICE)


def test_clear_errors_for_projected_and_energy():
    x, Q = torch.randn(3, 4, device=DEVICE), torch.randn(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"acc must be \(2,\)"):
        ops.projected_sq_accumulate_(torch.zeros(3, device=DEVICE), x, Q, backend="triton")
    with pytest.raises(TypeError, match="acc must be float32"):
        acc16 = torch.zeros(2, dtype=torch.float16, device=DEVICE)
        ops.projected_sq_accumulate_(acc16, x, Q, backend="triton")
    with pytest.raises(TypeError, match="M must be float32"):
        ops.fisher_energy(torch.zeros(4, 4, dtype=torch.bfloat16, device=DEVICE), Q, backend="triton")


# --- torch.library registration ------------------------------------------------------------

def test_custom_ops_pass_opcheck():
    x = torch.randn(2, 5, 16, device=DEVICE)
    mask = torch.rand(2, 5, device=DEVICE) > 0.5
    Q = torch.randn(16, 8, device=DEVICE)
    M = torch.randn(16, 20, device=DEVICE)
    M = M @ M.T
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fisherlora.triton_syrk_accumulate_.default,
                          (torch.zeros(16, 16, device=DEVICE), x, mask, 0.5), test_utils=checks)
    torch.library.opcheck(torch.ops.fisherlora.triton_fisher_energy.default, (M, Q), test_utils=checks)
    torch.library.opcheck(torch.ops.fisherlora.triton_projected_sq_accumulate_.default,
                          (torch.zeros(8, device=DEVICE), x, Q, mask), test_utils=checks)
    torch.library.opcheck(torch.ops.fisherlora.triton_gradient_accumulate_.default,
                          (torch.zeros(8, 16, device=DEVICE), x[..., :8], x, mask, 0.5, False), test_utils=checks)


# --- end to end: statistics collection ------------------------------------------------------

@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_collection_gives_the_same_factors_as_the_torch_backend(model_dtype):
    """The tiny Llama's K-FAC factors with backend="triton" (float32 statistics) match
    backend="torch", with padding (masked rows) and a bf16 model (the upcast path when interpreted)."""
    from fisherlora.calibration import run_calibration
    from fisherlora.collect import StatisticsCollector
    from tests.models import pad_batch, random_sequences, target_names, tiny_llama

    model = tiny_llama(dtype=model_dtype).to(DEVICE)
    seqs, labels = random_sequences(4, vocab=101, seed=3)
    batches = [{k: v.to(DEVICE) for k, v in pad_batch(seqs, labels, "left").items()}]
    names = target_names(model)

    def factors(backend):
        modules = {n: model.get_submodule(n) for n in names}
        with StatisticsCollector(model, modules, stats_dtype=torch.float32, backend=backend) as col:
            run_calibration(model, batches)
        return col.statistics()

    ours, theirs = factors("triton"), factors("torch")
    for name in names:
        for a, b, what in zip(ours.factors(name), theirs.factors(name), ("A", "G"), strict=True):
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30),
                                       msg=f"{what} of {name} ({model_dtype})")


# --- GPU only ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or DEVICE != "cuda", reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("d", [1024, 1536])
def test_gpu_autotuned_split_k_matches_reference(d):
    """Compiled, autotuned, with the heuristic split-K: the paths the interpreter never takes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 2048, d, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = torch.rand(4, 2048, device="cuda", generator=g) > 0.5
    x.masked_fill_(~mask.unsqueeze(-1), float("nan"))
    for layout in ("dense", "packed"):
        acc = _new_acc(layout, d, "cuda")
        ops.syrk_accumulate_(acc, x, mask, backend="triton")
        again = _new_acc(layout, d, "cuda")
        ops.syrk_accumulate_(again, x, mask, backend="triton")
        assert torch.equal(acc, again)
        ref64 = reference.syrk_accumulate_(_new_acc(layout, d, "cuda").double(), x, mask)
        torch_out = reference.syrk_accumulate_(_new_acc(layout, d, "cuda"), x, mask)
        assert_close_to_reference(_full(acc, d), _full(ref64, d), _full(torch_out, d), f"d{d}-{layout}",
                                  rel_floor=REL_FLOOR)
    Q = torch.linalg.qr(torch.randn(d, d // 2, device="cuda", generator=g))[0]
    M = _full(acc, d)
    assert_close_to_reference(ops.fisher_energy(M, Q, backend="triton"),
                              reference.fisher_energy(M.double(), Q.double()),
                              reference.fisher_energy(M, Q), "energy", rel_floor=REL_FLOOR)
    for q in (Q, Q.bfloat16()):
        assert_close_to_reference(_projected(x, q, mask, "triton"),
                                  _projected(x, q, mask, "torch", torch.float64),
                                  _projected(x, q, mask, "torch"), f"projected-{q.dtype}",
                                  rel_floor=REL_FLOOR)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or DEVICE != "cuda", reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("d_out, d_in", [(1024, 4096), (4096, 1024), (96, 200)])
def test_gpu_autotuned_gradient_matches_reference(d_out, d_in):
    """Compiled and autotuned: 128-wide tiles, the heuristic token split (few tiles at 96 x 200),
    native bf16 tensor-core dots, mixed dtypes; bit-identical repeats."""
    for a_dtype in (torch.bfloat16, torch.float32):
        case = GradCase(d_out, d_in, torch.bfloat16, False, 8192, "batched", "random", a_dtype)
        g, a, mask = case.make_ga("cuda")
        for transpose in (False, True):
            shape = (d_in, d_out) if transpose else (d_out, d_in)
            acc, again = torch.zeros(shape, device="cuda"), torch.zeros(shape, device="cuda")
            ops.gradient_accumulate_(acc, g, a, mask, 0.5, transpose=transpose, backend="triton")
            ops.gradient_accumulate_(again, g, a, mask, 0.5, transpose=transpose, backend="triton")
            assert torch.equal(acc, again)
            ref64 = reference.gradient_accumulate_(torch.zeros(shape, device="cuda", dtype=torch.float64), g, a, mask,
                                                   0.5, transpose)
            torch_out = reference.gradient_accumulate_(torch.zeros(shape, device="cuda"), g, a, mask, 0.5, transpose)
            assert_close_to_reference(acc, ref64, torch_out, f"o{d_out}-i{d_in}-{a_dtype}-T{transpose}",
                                      rel_floor=REL_FLOOR)
