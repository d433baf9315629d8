"""What a data pass costs besides its FLOPs, counted on the CPU (fisherlora/counting.py,
docs/DESIGN.md §11): Triton compiles and autotunings per run, host synchronisations in the hooks."""

import copy

import pytest
import torch

from fisherlora import ops
from fisherlora.calibration import run_calibration
from fisherlora.collect import StatisticsCollector
from fisherlora.config import MemoryMode
from fisherlora.counting import count_host_syncs, count_kernel_compiles
from fisherlora.testing import random_llama
from tests.models import pad_batch, random_sequences

LENGTHS = list(range(5, 25))  # 20 different padded lengths


def _batches(lengths, seed=0):
    out = []
    for n, length in enumerate(lengths):
        seqs, labels = random_sequences(2, vocab=101, seed=seed + n, min_len=length, max_len=length)
        seqs[1], labels[1] = seqs[1][: max(2, length - 3)], labels[1][: max(2, length - 3)]  # padding
        out.append(pad_batch(seqs, labels))
    return out


def _collector(model, backend, mode):
    """A collector on every decoder-layer projection (random orthonormal bases when projected)."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    bases = None
    if mode is MemoryMode.PROJECTED:
        g = torch.Generator().manual_seed(0)
        bases = {}
        for n, m in modules.items():  # (U, Vh) as a thin SVD gives them
            u, v = (torch.linalg.qr(torch.randn(d, min(m.weight.shape), generator=g))[0] for d in m.weight.shape)
            bases[n] = (u.to(m.weight.device), v.T.to(m.weight.device))
    return StatisticsCollector(model, modules, backend=backend, mode=mode, bases=bases)


def _collect(model, batches, backend, mode=MemoryMode.FULL):
    with _collector(model, backend, mode) as col:
        run_calibration(model, batches)
    return col.statistics()


@pytest.fixture(scope="module")
def model():
    return random_llama(hidden=32, intermediate=48, layers=1)


@pytest.mark.parametrize("mode", [MemoryMode.FULL, MemoryMode.PROJECTED])  # packed: full's kernel, PACKED set
def test_twenty_lengths_compile_and_autotune_each_kernel_as_often_as_one_length(model, mode):
    """A new sequence length or token count must not compile (or autotune) a kernel again: the
    token dimension is no specialisation of the kernels, and autotuning is keyed on the shapes
    of the weights, never on the batch."""
    pytest.importorskip("triton")
    from fisherlora.kernels import INTERPRET

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if not INTERPRET:  # on a GPU: the real compiles are counted too
        model = copy.deepcopy(model).cuda()
    with count_kernel_compiles() as one:
        _collect(model, _batches([LENGTHS[0]]), "triton", mode)
    with count_kernel_compiles() as many:
        _collect(model, _batches(LENGTHS), "triton", mode)
    assert sum(many.launches.values()) > sum(one.launches.values()) > 0
    for name in many.launches:
        assert many.compiles(name) == one.compiles(name), (name, many.summary()[name], one.summary()[name])
        assert many.autotunes(name) == one.autotunes(name), (name, many.summary()[name], one.summary()[name])
        if not INTERPRET:  # everything was compiled by the one-length run: 20 new lengths add nothing
            assert many.compiled[name] == 0, (name, many.summary()[name])


def test_split_k_reductions_compile_once_for_every_split():
    """The number of token slices follows the token count; the reduction kernels must not be
    compiled once per slice count."""
    pytest.importorskip("triton")
    from fisherlora.kernels import INTERPRET, projected_sq, syrk

    if not INTERPRET:
        pytest.skip("interpreter check (the GPU check runs the same counts on the device)")
    g = torch.Generator().manual_seed(0)
    d = 40
    with count_kernel_compiles() as counts:
        for split, T in ((2, 37), (3, 64), (4, 91), (5, 128)):
            x = torch.randn(T, d, generator=g)
            acc = torch.zeros(d, d)
            syrk.syrk_accumulate_(acc, x, None, 1.0, split=split)
            Q = torch.randn(d, 24, generator=g)
            projected_sq.projected_sq_accumulate_(torch.zeros(24), x, Q, None, split=split)
    for name in counts.launches:
        assert counts.compiles(name) == 1, (name, counts.summary()[name])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["ext", "triton", "torch"])
@pytest.mark.parametrize("mode", [MemoryMode.FULL, MemoryMode.PROJECTED])
def test_hooks_make_no_host_synchronisation(model, backend, mode, device):
    """No ``.item()``, ``int(tensor)``, ``.nonzero()``, ``.cpu()``, boolean indexing... in the
    hooks, the ops or the kernels' launchers: each is a stall per layer or per batch on a GPU.
    The token counts stay on the device until the statistics are finalised."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend!r} unavailable on {device}")
    if device == "cuda":
        model = copy.deepcopy(model).cuda()
    batches = _batches(LENGTHS[:3])
    col = _collector(model, backend, mode)
    with count_host_syncs() as syncs:
        with col:
            run_calibration(model, batches)
    inside = {k: n for k, n in syncs.calls.items()
              if k.startswith(("fisherlora/collect.py", "fisherlora/ops/", "kernels/", "fisherlora/kernels/"))}
    assert not inside, f"host synchronisations in the hooks over {len(batches)} batches: {inside}"
    stats = col.statistics()  # finalising may synchronise, once
    assert all(isinstance(v, int) for v in stats.a_count.values())
    assert all(isinstance(v, int) for v in stats.g_count.values())


def test_the_sync_counter_sees_what_it_claims():
    """The shim itself: counted when called from the package, not when called from elsewhere."""
    from fisherlora import counting

    x = torch.arange(6.0)
    with count_host_syncs() as syncs:
        int(x.sum()), x[x > 2], x.tolist(), x.nonzero()  # from this test file: not the package's
        counting._syncs  # noqa: B018
    assert syncs.total() == 0
    with count_host_syncs() as syncs:
        ops.packed_size(4)
        torch.ops.aten.nonzero(x)
    assert syncs.total() == 0
    assert counting._syncs(torch.Tensor.item, (x,), None) and counting._syncs(torch.Tensor.to, (x, "cpu"), None)
    assert counting._syncs(torch.Tensor.__getitem__, (x, x > 2), None)
    assert not counting._syncs(torch.Tensor.__getitem__, (x, slice(1, 3)), None)


def test_the_light_compile_counter_patches_nothing_and_restores_triton_hooks():
    """``keys=False`` (what a timed benchmark uses) only listens to Triton's post-compile hook."""
    pytest.importorskip("triton")
    import triton.knobs as knobs
    from triton.runtime import jit

    before_hook, before_run = knobs.runtime.jit_post_compile_hook, jit.JITFunction.run
    with count_kernel_compiles(keys=False) as counts:
        assert jit.JITFunction.run is before_run and knobs.runtime.jit_post_compile_hook is not None
        ops.syrk_accumulate_(torch.zeros(8, 8), torch.randn(3, 8), backend="torch")
    assert knobs.runtime.jit_post_compile_hook is before_hook and not counts.launches
    with pytest.raises(RuntimeError, match="boom"), count_kernel_compiles(keys=False):
        raise RuntimeError("boom")
    assert knobs.runtime.jit_post_compile_hook is before_hook
