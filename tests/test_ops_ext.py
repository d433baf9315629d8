"""The compiled backend (``backend="ext"``, ``fisherlora._C``) against the float64 reference.

Same shape/dtype/mask matrix as every backend (tests/op_cases.py). CPU tensors here; the CUDA
kernels run the same cases when a GPU is present (``gpu`` marker).
"""

import importlib.util
import shutil
import sys

import pytest
import torch

from fisherlora import ops
from fisherlora.ops import dispatch
from tests.op_cases import (
    BAD_CALLS,
    ENERGY_CASES,
    GRAD_CALLS,
    GRADIENT_CASES,
    GRADIENT_GRAD_CALLS,
    PROJECTED_CASES,
    SYRK_CASES,
    GradCase,
    assert_close_to_reference,
    assert_no_graph,
    assert_refused,
)

if importlib.util.find_spec("fisherlora._C") is None:  # genuinely not built: skip; broken: fail below
    pytest.skip(f"fisherlora._C is not built ({dispatch.load_error('ext')})", allow_module_level=True)

from fisherlora.ops import ext  # noqa: E402  (a built but broken extension fails here, loudly)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(device):
    if device == "cuda" and not (torch.cuda.is_available() and ext.supports("cuda")):
        pytest.skip("needs a CUDA device and an extension built with CUDA")
    return device


def _syrk64(x, mask):
    rows = x.reshape(-1, x.shape[-1]).double().cpu()
    if mask is not None:
        rows = rows[mask.reshape(-1).bool().cpu()]
    return rows.T @ rows


def _acc(case, dtype, device):
    shape = (case.d, case.d) if case.layout == "dense" else (ops.packed_size(case.d),)
    return torch.zeros(shape, dtype=dtype, device=device)


def _full(acc, d):
    return ops.symmetrize_(acc.clone()) if acc.dim() == 2 else ops.unpack_triu(acc, d)


def single_threaded(fn):
    """``fn()`` on one intra-op thread, the caller's thread count restored afterwards."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SYRK_CASES)
def test_syrk_ext_matches_reference(case, device):
    device = _device(device)
    x, mask = case.make_x(device)
    ref = 0.5 * _syrk64(x, mask)
    torch_acc = ops.syrk_accumulate_(_acc(case, torch.float32, "cpu"), x.cpu(),
                                     None if mask is None else mask.cpu(), 0.5, backend="torch")
    out = ops.syrk_accumulate_(_acc(case, torch.float32, device), x, mask, 0.5, backend="ext")
    assert_close_to_reference(_full(out, case.d), ref, _full(torch_acc, case.d), case.id, rel_floor=1e-5)
    # float64 accumulator: the kernel itself, without fp32 rounding, matches to float64 precision
    out64 = ops.syrk_accumulate_(_acc(case, torch.float64, device), x, mask, 0.5, backend="ext")
    assert_close_to_reference(_full(out64, case.d), ref, ref, case.id + "-acc64", rel_floor=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ENERGY_CASES)
def test_fisher_energy_ext_matches_reference(case, device):
    device = _device(device)
    M, Q = case.make_sym(device), case.make_q(device).to(case.dtype)  # Q in the case's dtype
    dense = M if case.layout == "dense" else ops.unpack_triu(M, case.d)
    ref = torch.diag(Q.double().T @ dense.double() @ Q.double()).cpu()
    torch_out = ops.fisher_energy(M.cpu(), Q.cpu(), backend="torch")
    out = ops.fisher_energy(M, Q, backend="ext")
    assert out.dtype == torch.float32 and out.shape == (case.k,) and out.device.type == device
    assert_close_to_reference(out, ref, torch_out, case.id, rel_floor=1e-5)
    out64 = ops.fisher_energy(M.double(), Q, backend="ext")
    assert out64.dtype == torch.float64
    assert_close_to_reference(out64, ref, ref, case.id + "-acc64", rel_floor=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PROJECTED_CASES)
def test_projected_sq_ext_matches_reference(case, device):
    device = _device(device)
    x, mask = case.make_x(device)
    Q = case.make_q(device)
    ref = torch.diag(Q.double().T.cpu() @ _syrk64(x, mask) @ Q.double().cpu())
    torch_acc = ops.projected_sq_accumulate_(torch.zeros(case.k), x.cpu(), Q.cpu(),
                                             None if mask is None else mask.cpu(), backend="torch")
    out = ops.projected_sq_accumulate_(torch.zeros(case.k, device=device), x, Q, mask, backend="ext")
    assert_close_to_reference(out, ref, torch_acc, case.id, rel_floor=1e-5)
    out64 = ops.projected_sq_accumulate_(torch.zeros(case.k, dtype=torch.float64, device=device), x, Q, mask,
                                         backend="ext")
    assert_close_to_reference(out64, ref, ref, case.id + "-acc64", rel_floor=1e-12)


def _gradient64(g, a, mask, transpose=False):
    gr, ar = g.reshape(-1, g.shape[-1]).double().cpu(), a.reshape(-1, a.shape[-1]).double().cpu()
    if mask is not None:
        keep = mask.reshape(-1).bool().cpu()
        gr, ar = gr[keep], ar[keep]
    return ar.T @ gr if transpose else gr.T @ ar


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradient_ext_matches_reference(case, device):
    device = _device(device)
    g, a, mask = case.make_ga(device)
    ref = -0.5 * _gradient64(g, a, mask, case.transpose)
    torch_acc = ops.gradient_accumulate_(torch.zeros(case.acc_shape()), g.cpu(), a.cpu(),
                                         None if mask is None else mask.cpu(), -0.5, transpose=case.transpose,
                                         backend="torch")
    out = ops.gradient_accumulate_(torch.zeros(case.acc_shape(), device=device), g, a, mask, -0.5,
                                   transpose=case.transpose, backend="ext")
    assert_close_to_reference(out, ref, torch_acc, case.id, rel_floor=1e-5)
    # float64 accumulator: the kernel itself, without fp32 rounding, matches to float64 precision
    out64 = ops.gradient_accumulate_(torch.zeros(case.acc_shape(), dtype=torch.float64, device=device), g, a, mask,
                                     -0.5, transpose=case.transpose, backend="ext")
    assert_close_to_reference(out64, ref, ref, case.id + "-acc64", rel_floor=1e-12)


@pytest.mark.parametrize("d_out, d_in", [(63, 257), (65, 513), (1, 300), (129, 40000)])
def test_gradient_blocks_and_chunks_at_odd_sizes_accumulate_onto_acc(d_out, d_in):
    """Sizes whose tiles of acc (csrc/cpu: near-equal, multiples of 16) end ragged, and d_out = 1
    (one row split no further), in both orientations;
    d_in = 40000 makes a float64 token chunk 256 rows (GRAD_PANEL_BYTES), so the 600 kept tokens of
    800 take three chunks, the last one partial; integer mask, float64 exact; the accumulator's
    previous contents are kept."""
    gen = torch.Generator().manual_seed(d_out + d_in)
    g, a = torch.randn(800, d_out, generator=gen), torch.randn(800, d_in, generator=gen).to(torch.bfloat16)
    mask = (torch.rand(800, generator=gen) > 0.25).to(torch.int64)
    for transpose in (False, True):
        ref = 7.0 + 0.25 * _gradient64(g, a, mask, transpose)
        acc = torch.full(ref.shape, 7.0, dtype=torch.float64)
        ops.gradient_accumulate_(acc, g, a, mask, 0.25, transpose=transpose, backend="ext")
        torch.testing.assert_close(acc, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())


def test_gradient_is_deterministic_across_runs_and_thread_counts():
    gen = torch.Generator().manual_seed(5)
    g, a = torch.randn(700, 600, generator=gen).to(torch.bfloat16), torch.randn(700, 300, generator=gen)
    mask = torch.rand(700, generator=gen) > 0.5

    def run():
        return ops.gradient_accumulate_(torch.zeros(600, 300), g, a, mask, backend="ext")

    first, single = run(), single_threaded(run)
    assert torch.equal(first, run()) and torch.equal(first, single)


@pytest.mark.gpu
@pytest.mark.parametrize("d_out, d_in, tokens", [(4096, 1024, 9000), (2048, 14336, 700), (77, 50, 50)])
def test_cuda_gradient_tensor_core_path_matches_float64_and_never_synchronises(d_out, d_in, tokens):
    """The float32-accumulator path of gradient_gemm (csrc/cuda/gemm_cuda.cu): masked bf16 rows in
    several chunks, block rows of acc (d_in = 14336 gives 1170-row blocks), a strided fp32 a read in
    place, mixed dtypes, both orientations; float32-exact against float64, no host synchronisation."""
    _device("cuda")
    case = GradCase(d_out, d_in, torch.bfloat16, False, tokens, "batched", "random")
    g, a, mask = case.make_ga("cuda")
    a32 = torch.randn(d_in, 2 * tokens).cuda().mT[::2]  # (tokens, d_in), row step 2, column stride
    g32 = torch.randn(tokens, d_out).cuda()
    outs = [torch.zeros(d_out, d_in, device="cuda"), torch.zeros(d_in, d_out, device="cuda"),
            torch.zeros(d_out, d_in, device="cuda"), torch.zeros(d_out, d_in, device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.gradient_accumulate_(outs[0], g, a, mask, 0.5, backend="ext")
        ops.gradient_accumulate_(outs[1], g, a, mask, 0.5, transpose=True, backend="ext")
        ops.gradient_accumulate_(outs[2], g32, a32, None, 1.0, backend="ext")
        ops.gradient_accumulate_(outs[3], g32.bfloat16(), a32, None, 1.0, backend="ext")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    refs = [0.5 * _gradient64(g, a, mask), 0.5 * _gradient64(g, a, mask, True), _gradient64(g32, a32, None),
            _gradient64(g32.bfloat16(), a32, None)]
    for n, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m, n=n: f"output {n}: {m}")


def test_auto_backend_picks_ext_on_cpu():
    assert dispatch.resolve("syrk_accumulate_", "auto", torch.device("cpu"))[0] == "ext"
    assert ops.available_backends("cpu")[0] == "ext"


def test_integer_mask_accumulation_and_scale():
    x = torch.randn(3, 40, 70, dtype=torch.float64)
    mask = (torch.rand(3, 40) > 0.3).to(torch.int32)
    acc = torch.full((70, 70), 1.0, dtype=torch.float64)
    ops.syrk_accumulate_(acc, x, mask, 0.25, backend="ext")
    ops.syrk_accumulate_(acc, x, mask, 0.25, backend="ext")
    ref = 1.0 + 0.5 * _syrk64(x, mask)
    torch.testing.assert_close(ops.symmetrize_(acc).triu(), ref.triu(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [31, 33, 65, 255, 257, 291, 545])
@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_syrk_diagonal_tiles_at_odd_sizes(d, layout):
    """Diagonal 256-tiles are computed as 32-column row panels (upper half only, csrc/cpu): sizes
    that end inside a panel, a tile, or just past one, exact against float64; a dense
    accumulator's strict lower triangle is never written."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 150, d, generator=g)
    mask = torch.rand(2, 150, generator=g) > 0.3
    x.masked_fill_(~mask.unsqueeze(-1), float("nan"))
    ref = _syrk64(x, mask)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        if layout == "dense":
            acc = torch.full((d, d), 7.0, dtype=dtype)
            ops.syrk_accumulate_(acc, x, mask, backend="ext")
            lower = torch.ones(d, d, dtype=torch.bool).tril(-1)
            assert (acc[lower] == 7.0).all(), "the strict lower triangle was written"
            got = (acc - 7.0).triu()
        else:
            acc = torch.zeros(ops.packed_size(d), dtype=dtype)
            ops.syrk_accumulate_(acc, x, mask, backend="ext")
            got = ops.unpack_triu(acc, d).triu()
        torch.testing.assert_close(got.double(), ref.triu(), rtol=rel, atol=rel * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("d, tokens", [(4096, 9000), (4609, 700), (77, 50)])
def test_cuda_tensor_core_paths_match_float64_and_never_synchronise(d, tokens):
    """The float32-accumulator paths of csrc/cuda/gemm_cuda.cu: several row chunks (9000 bf16 rows
    of 4096 exceed one 64 MiB workspace), block rows of 256 and of 512 (d > 4096), masked and
    strided rows, dense and packed accumulators; exact to float32 against float64, and not one
    host synchronisation (torch.cuda's sync debug mode raises on any)."""
    _device("cuda")
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, tokens // 2, d, generator=g).to(torch.bfloat16).cuda()
    mask = (torch.rand(2, tokens // 2, generator=g) > 0.3).cuda()
    x.masked_fill_(~mask.unsqueeze(-1), float("nan"))
    Q = torch.linalg.qr(torch.randn(d, min(d, 512), generator=g, dtype=torch.float64))[0]
    strided = torch.randn(d, 2 * tokens, generator=g).cuda().mT[::2]  # (tokens, d), column stride 2 tokens
    dense, packed = torch.zeros(d, d, device="cuda"), torch.zeros(ops.packed_size(d), device="cuda")
    dense_s = torch.zeros(d, d, device="cuda")
    proj, proj16 = torch.zeros(Q.shape[1], device="cuda"), torch.zeros(Q.shape[1], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.syrk_accumulate_(dense, x, mask, 0.5, backend="ext")
        ops.syrk_accumulate_(packed, x, mask, 0.5, backend="ext")
        ops.syrk_accumulate_(dense_s, strided, None, 1.0, backend="ext")
        ops.projected_sq_accumulate_(proj, x, Q.float().cuda(), mask, backend="ext")
        ops.projected_sq_accumulate_(proj16, x, Q.to(torch.bfloat16).cuda(), mask, backend="ext")
        energy = ops.fisher_energy(ops.symmetrize_(dense), Q.float().cuda(), backend="ext")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = 0.5 * _syrk64(x, mask)
    scale = ref.abs().max().item()
    torch.testing.assert_close(dense.double().cpu(), ref, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(ops.unpack_triu(packed.cpu(), d).double(), ref, rtol=1e-4, atol=1e-5 * scale)
    ref_s = _syrk64(strided, None)
    torch.testing.assert_close(ops.symmetrize_(dense_s).double().cpu(), ref_s, rtol=1e-4,
                               atol=1e-5 * ref_s.abs().max().item())
    want = torch.diag(Q.T @ (2 * ref) @ Q)
    torch.testing.assert_close(proj.double().cpu(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    q16 = Q.to(torch.bfloat16).double()
    want16 = torch.diag(q16.T @ (2 * ref) @ q16)
    torch.testing.assert_close(proj16.double().cpu(), want16, rtol=1e-3, atol=1e-4 * want16.abs().max().item())
    torch.testing.assert_close(energy.double().cpu(), torch.diag(Q.T @ ref @ Q), rtol=1e-4,
                               atol=1e-5 * scale)


def test_strided_inputs_need_no_copy_semantics():
    # non-contiguous leading dims (a permuted batch) and a non-contiguous, transposed Q and M
    x = torch.randn(5, 30, 2, 300).permute(2, 1, 0, 3)[:, ::2]
    Q = torch.randn(600, 300, dtype=torch.float64).mT[:, ::2]  # (300, 300) with odd strides
    acc = torch.zeros(300, 300, dtype=torch.float64)
    ops.syrk_accumulate_(acc, x, backend="ext")
    ref = _syrk64(x, None)
    torch.testing.assert_close(ops.symmetrize_(acc), ref, rtol=1e-10, atol=1e-9)
    M = ref.mT  # a transposed view: dense M may have any strides
    torch.testing.assert_close(ops.fisher_energy(M, Q, backend="ext"), torch.diag(Q.T @ ref @ Q), rtol=1e-10,
                               atol=1e-8)
    acc_p = torch.zeros(300, dtype=torch.float64)
    ops.projected_sq_accumulate_(acc_p, x, Q, backend="ext")
    torch.testing.assert_close(acc_p, torch.diag(Q.T @ ref @ Q), rtol=1e-10, atol=1e-8)


def test_projected_with_low_precision_q_and_many_columns():
    # Q in bf16 with k > 512 columns takes the column-chunked conversion path
    x = torch.randn(300, 24)
    Q = torch.randn(24, 700).to(torch.bfloat16)
    acc = torch.zeros(700, dtype=torch.float64)
    ops.projected_sq_accumulate_(acc, x, Q, backend="ext")
    ref = ((x.double() @ Q.double()) ** 2).sum(0)
    torch.testing.assert_close(acc, ref, rtol=1e-10, atol=1e-8)


def test_results_are_deterministic_across_runs_and_thread_counts():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(700, 600, generator=g).to(torch.bfloat16)
    mask = torch.rand(700, generator=g) > 0.5
    Q = torch.randn(600, 200, generator=g)

    def run():
        acc = torch.zeros(ops.packed_size(600))
        ops.syrk_accumulate_(acc, x, mask, backend="ext")
        proj = ops.projected_sq_accumulate_(torch.zeros(200), x, Q, mask, backend="ext")
        return acc, ops.fisher_energy(acc, Q, backend="ext"), proj

    first, single = run(), single_threaded(run)
    for a, b, c in zip(first, run(), single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda o: o.syrk_accumulate_(torch.zeros(4, 4, dtype=torch.half), torch.randn(3, 4), None, 1.0),
         "acc must be float32"),
        (lambda o: o.syrk_accumulate_(torch.zeros(4, 4), torch.randint(0, 3, (3, 4)), None, 1.0),
         "x must be bf16/fp16/fp32/fp64"),
        (lambda o: o.syrk_accumulate_(torch.zeros(5, 5), torch.randn(3, 4), None, 1.0),
         r"acc must be \(4, 4\) or packed \(10,\)"),
        (lambda o: o.syrk_accumulate_(torch.zeros(8, 8)[:4, :4], torch.randn(3, 4), None, 1.0), "contiguous"),
        (lambda o: o.syrk_accumulate_(torch.zeros(4, 4), torch.randn(3, 4), torch.ones(5, dtype=torch.bool),
                                      1.0), "does not match the token dims"),
        (lambda o: o.syrk_accumulate_(torch.zeros(4, 4), torch.randn(3, 4), torch.ones(3), 1.0),
         "mask must be bool or an integer"),
        (lambda o: o.fisher_energy(torch.zeros(4, 4, dtype=torch.half), torch.randn(4, 2)),
         "M must be float32"),
        (lambda o: o.fisher_energy(torch.zeros(4, 4), torch.randn(4)), r"Q must be a \(d, k\)"),
        (lambda o: o.fisher_energy(torch.zeros(9), torch.randn(4, 2)), r"packed \(10,\)"),
        (lambda o: o.projected_sq_accumulate_(torch.zeros(3), torch.randn(5, 4), torch.randn(4, 2), None),
         r"acc must be \(2,\)"),
        (lambda o: o.projected_sq_accumulate_(torch.zeros(2), torch.randn(5, 4), torch.randn(3, 2), None),
         r"Q must be \(d=4, k\)"),
        (lambda o: o.gradient_accumulate_(torch.zeros(4, 5), torch.randn(3, 4), torch.randn(2, 5), None, 1.0, False),
         "the token dims of g .* and a .* differ"),
        (lambda o: o.gradient_accumulate_(torch.zeros(4, 5), torch.randn(3, 4), torch.randn(3, 5), None, 1.0, True),
         r"acc must be \(5, 4\) for g with d_out=4 and a with d_in=5 \(transpose=True\)"),
        (lambda o: o.gradient_accumulate_(torch.zeros(4, 5, dtype=torch.half), torch.randn(3, 4), torch.randn(3, 5),
                                          None, 1.0, False), "acc must be float32"),
        (lambda o: o.gradient_accumulate_(torch.zeros(4, 5), torch.randn(3, 4), torch.randint(0, 2, (3, 5)), None,
                                          1.0, False), "a must be bf16"),
        (lambda o: o.gradient_accumulate_(torch.zeros(4, 5), torch.randn(3, 4), torch.randn(3, 5),
                                          torch.ones(4, dtype=torch.bool), 1.0, False),
         "mask of shape .* does not match the token dims of g"),
        (lambda o: o.projected_sq_accumulate_(torch.zeros(2), torch.randn(5, 4),
                                              torch.randint(0, 2, (4, 2)), None), "Q must be bf16"),
    ],
)
def test_kernels_check_their_inputs(call, match):
    # straight through torch.ops, bypassing fisherlora.ops' validation: TORCH_CHECK must catch it
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.fisherlora_ext)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", BAD_CALLS)
def test_bad_arguments_are_refused_before_any_work(call, device):
    assert_refused(call, "ext", _device(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", GRAD_CALLS + GRADIENT_GRAD_CALLS)
def test_inputs_that_require_grad_are_read_as_values(call, device):
    assert_no_graph(call, "ext", _device(device))


def test_public_api_rejects_bad_arguments_for_ext():
    with pytest.raises(TypeError, match="acc must be float32"):
        ops.syrk_accumulate_(torch.zeros(4, 4, dtype=torch.bfloat16), torch.randn(3, 4), backend="ext")
    with pytest.raises(ValueError, match=r"acc must be \(4, 4\)"):
        ops.syrk_accumulate_(torch.zeros(3, 3), torch.randn(3, 4), backend="ext")
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        ops.syrk_accumulate_(torch.zeros(4, 4, device="meta"), torch.randn(3, 4), backend="ext")
    with pytest.raises(ValueError, match="Q is on meta"):
        ops.projected_sq_accumulate_(torch.zeros(2), torch.randn(3, 4), torch.zeros(4, 2, device="meta"),
                                     backend="ext")


@pytest.mark.gpu
def test_cuda_kernels_reject_mixed_devices():
    _device("cuda")
    with pytest.raises(RuntimeError, match="but x is on"):
        torch.ops.fisherlora_ext.syrk_accumulate_(torch.zeros(4, 4, device="cuda"), torch.randn(3, 4), None,
                                                  1.0)


def test_whole_init_with_ext_chooses_the_torch_backends_directions():
    import fisherlora
    from fisherlora import FisherLoraConfig
    from tests.models import pad_batch, random_sequences, tiny_llama

    seqs, labels = random_sequences(6, vocab=101, seed=1)
    data = [pad_batch(seqs[:3], labels[:3]), pad_batch(seqs[3:], labels[3:])]
    chosen = {}
    for backend in ("torch", "ext"):
        result = fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, data,
                                                   FisherLoraConfig(rank=4, alpha=8, backend=backend),
                                                   progress=False)
        chosen[backend] = {name: sel.indices.tolist() for name, sel in result.selections.items()}
    assert chosen["ext"] == chosen["torch"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="ldd (Linux)")
def test_extension_uses_the_shared_libstdcxx_that_torch_loads():
    """A static copy of libstdc++ inside _C (what g++ links when its libstdc++.so symlink is missing,
    as on the H200 machine's image) crashed on the first TORCH_CHECK message holding an integer;
    setup.py then names libstdc++.so.6 explicitly."""
    import subprocess

    so = importlib.util.find_spec("fisherlora._C").origin
    assert "libstdc++.so.6" in subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout


def test_gradient_op_passes_opcheck():
    """Schema (acc mutated, nothing returned) and fake implementation of the extension's op."""
    g, a = torch.randn(2, 5, 8), torch.randn(2, 5, 16).to(torch.bfloat16)
    mask = torch.rand(2, 5) > 0.5
    checks = ("test_schema", "test_faketensor")
    op = torch.ops.fisherlora_ext.gradient_accumulate_.default
    torch.library.opcheck(op, (torch.zeros(8, 16), g, a, mask, 0.5, False), test_utils=checks)
    torch.library.opcheck(op, (torch.zeros(16, 8), g, a, None, 1.0, True), test_utils=checks)
