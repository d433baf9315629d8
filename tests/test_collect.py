"""K-FAC statistics collection against float64 hand computations (docs/DESIGN.md §1 step 1)."""

import pytest
import torch
from torch import nn

from fisherlora.calibration import run_calibration
from fisherlora.collect import StatisticsCollector
from tests.models import (
    TOL,
    TinyMLP,
    collect,
    pad_batch,
    reference_factors,
    target_names,
    tiny_llama,
)


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_factors_equal_hand_computation_one_sequence_at_a_time(llama, data, side):
    seqs, labels = data
    names = target_names(llama)
    A_ref, G_ref, n = reference_factors(llama, names, seqs, labels)
    batches = [pad_batch(seqs[:4], labels[:4], side), pad_batch(seqs[4:], labels[4:], side)]
    st = collect(llama, names, batches)
    for name in names:
        A, G = st.factors(name)
        torch.testing.assert_close(A, A_ref[name], **TOL, msg=f"A of {name} ({side} padding)")
        torch.testing.assert_close(G, G_ref[name], **TOL, msg=f"G of {name} ({side} padding)")
        assert st.g_count[name] == n
        assert st.a_count[st.a_key[name]] == n


def test_micro_batches_duplicates_and_padding_only_batches(llama, data):
    seqs, labels = data
    names = target_names(llama)
    one = collect(llama, names, [pad_batch(seqs, labels)])
    micro = collect(llama, names, [pad_batch(seqs[:2], labels[:2]), pad_batch(seqs[2:], labels[2:])])
    dup = collect(llama, names, [pad_batch(seqs + seqs, labels + labels)])
    only_pad = pad_batch(seqs[:2], labels[:2])
    only_pad["attention_mask"].zero_()
    only_pad["labels"].fill_(-100)
    padded = collect(llama, names, [pad_batch(seqs, labels), only_pad])
    for other, what in ((micro, "two micro-batches"), (dup, "a duplicated batch"), (padded, "a padding-only batch")):
        for name in names:
            for a, b in zip(one.factors(name), other.factors(name)):
                torch.testing.assert_close(b, a, **TOL, msg=f"{what} changed the factors of {name}")
    assert padded.g_count == one.g_count and padded.a_count == one.a_count


def test_qkv_and_gate_up_share_one_activation_factor(llama, data):
    seqs, labels = data
    names = target_names(llama)
    st = collect(llama, names, [pad_batch(seqs, labels)])
    for layer in range(2):
        p = f"model.layers.{layer}"
        qkv = {st.a_key[f"{p}.self_attn.{x}"] for x in ("q_proj", "k_proj", "v_proj")}
        assert len(qkv) == 1
        assert st.factors(f"{p}.self_attn.q_proj")[0] is st.factors(f"{p}.self_attn.v_proj")[0]
        assert st.a_key[f"{p}.mlp.gate_proj"] == st.a_key[f"{p}.mlp.up_proj"]
        assert st.a_key[f"{p}.mlp.down_proj"] == f"{p}.mlp.down_proj"
    assert len(st.A) == 2 * 4  # qkv, o, gate/up, down per layer


def test_tiny_mlp_factors_by_hand():
    torch.manual_seed(0)
    mlp = TinyMLP().double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    y = torch.randn(2, 6, 3, dtype=torch.float64)
    modules = {"fc1": mlp.fc1, "fc2": mlp.fc2}
    with StatisticsCollector(mlp, modules, stats_dtype=torch.float64, backend="torch") as col:
        out = mlp(x)
        ((out - y).square().sum(-1) * mask).sum().backward()
    st = col.statistics()
    # by hand: a1 = x, g2 = 2 (out - y) masked; a2 = tanh(W1 x + b1), g1 = (W2ᵀ g2) * (1 - a2²)
    W1, b1, W2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    with torch.no_grad():
        h = torch.tanh(x @ W1.T + b1)
        o = h @ W2.T + b2
        g2 = 2 * (o - y) * mask[..., None]
        g1 = (g2 @ W2) * (1 - h.square())
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    N = 12  # no attention mask passed: every row counts
    torch.testing.assert_close(st.factors("fc1")[0], rows(x).T @ rows(x) / N, **TOL)
    torch.testing.assert_close(st.factors("fc2")[0], rows(h).T @ rows(h) / N, **TOL)
    torch.testing.assert_close(st.factors("fc2")[1], rows(g2).T @ rows(g2) / N, **TOL)
    torch.testing.assert_close(st.factors("fc1")[1], rows(g1).T @ rows(g1) / N, **TOL)
    assert all(p.grad is None for p in mlp.parameters())


def test_no_weight_gradients_and_everything_restored(llama, data):
    seqs, labels = data
    names = target_names(llama)
    llama.train()
    llama.model.layers[0].mlp.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    modes = {n: m.training for n, m in llama.named_modules()}
    rng = torch.random.get_rng_state()
    collect(llama, names, [pad_batch(seqs, labels)])
    assert all(p.grad is None for p in llama.parameters())
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert {n: m.training for n, m in llama.named_modules()} == modes
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())
    llama.requires_grad_(True)
    llama.eval()


def test_restored_when_the_data_iterator_raises_midway(llama, data):
    seqs, labels = data
    names = target_names(llama)
    llama.train()
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}

    def batches():
        yield pad_batch(seqs[:3], labels[:3])
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        collect(llama, names, batches())
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert all(m.training for m in llama.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())
    assert all(p.grad is None for p in llama.parameters())
    llama.eval()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_does_not_double_count(data, reentrant):
    seqs, labels = data
    plain = tiny_llama()
    names = target_names(plain)
    ref = collect(plain, names, [pad_batch(seqs, labels)])
    ckpt = tiny_llama()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.train()  # transformers only checkpoints in training mode (dropout is 0 in tiny_llama)
    calls = []
    hook = ckpt.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    st = collect(ckpt, names, [pad_batch(seqs, labels)])
    hook.remove()
    assert len(calls) == 2, "the forward was not recomputed: checkpointing did not happen"
    assert st.a_count == ref.a_count and st.g_count == ref.g_count
    for name in names:
        for a, b in zip(ref.factors(name), st.factors(name)):
            torch.testing.assert_close(b, a, **TOL, msg=f"checkpointing (reentrant={reentrant}) changed {name}")


def test_own_checkpointing_recomputes_layers_and_keeps_the_factors(data):
    """checkpoint=True (the projected mode's) recomputes every decoder layer from the lowest
    hooked one, gives the same factors, and leaves no wrapper behind."""
    seqs, labels = data
    model = tiny_llama(layers=3)
    names = target_names(model)
    ref = collect(model, names, [pad_batch(seqs, labels)])
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    st = collect(model, names, [pad_batch(seqs, labels)], checkpoint=True)
    for h in hooks:
        h.remove()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2], f"every layer runs twice (forward + recompute); got {calls}"
    assert st.a_count == ref.a_count and st.g_count == ref.g_count
    for name in names:
        for a, b in zip(ref.factors(name), st.factors(name)):
            torch.testing.assert_close(b, a, **TOL, msg=f"checkpoint=True changed {name}")
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    # upper layers only: layer 0 runs once (no graph below the hooked layers), layers 1-2 twice
    calls.clear()
    hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    upper = [n for n in names if ".layers.0." not in n]
    collect(model, upper, [pad_batch(seqs, labels)], checkpoint=True)
    for h in hooks:
        h.remove()
    assert sorted(calls) == [0, 1, 1, 2, 2]


def test_backward_starts_at_the_lowest_hooked_layer(data):
    """Layers below every hooked module keep no autograd graph, and the upper layers' factors
    are those of a pass whose backward reaches the embeddings."""
    seqs, labels = data
    model = tiny_llama(layers=3)
    names = target_names(model)
    upper = [n for n in names if ".layers.2." in n]
    everything = collect(model, names, [pad_batch(seqs, labels)])
    seen = []
    hook = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    only_top = collect(model, upper, [pad_batch(seqs, labels)])
    hook.remove()
    assert seen == [False], "layer 1 built an autograd graph although nothing below layer 2 is hooked"
    for name in upper:
        for a, b in zip(everything.factors(name), only_top.factors(name)):
            torch.testing.assert_close(b, a, **TOL, msg=f"starting the backward at layer 2 changed {name}")


def test_checkpoint_wrappers_removed_when_the_pass_fails(data):
    seqs, labels = data
    model = tiny_llama()
    modules = {n: model.get_submodule(n) for n in target_names(model)}

    def batches():
        yield pad_batch(seqs, labels)
        raise RuntimeError("data source failed")

    with pytest.raises(RuntimeError, match="data source failed"):
        with StatisticsCollector(model, modules, backend="torch", checkpoint=True):
            run_calibration(model, batches())
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_layer_called_twice_counts_both_calls_and_inplace_after_hook_works():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            h.add_(1.0)  # in-place op right after a hooked layer
            return self.lin(torch.relu(h))

    torch.manual_seed(0)
    model = Twice().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with StatisticsCollector(model, {"lin": model.lin}, stats_dtype=torch.float64, backend="torch") as col:
        model(x).square().sum().backward()
    st = col.statistics()
    assert st.a_count["lin"] == 6 and st.g_count["lin"] == 6
    W, b = model.lin.weight, model.lin.bias
    with torch.no_grad():
        h = x @ W.T + b + 1.0
        a2 = torch.relu(h)
        out = a2 @ W.T + b
        g2 = 2 * out
        g1 = (g2 @ W) * (h > 0)
    A_ref = (x.T @ x + a2.T @ a2) / 6
    G_ref = (g1.T @ g1 + g2.T @ g2) / 6
    torch.testing.assert_close(st.factors("lin")[0], A_ref, **TOL)
    torch.testing.assert_close(st.factors("lin")[1], G_ref, **TOL)


def test_non_finite_statistics_name_the_layer(llama, data):
    seqs, labels = data
    names = target_names(llama)
    modules = {n: llama.get_submodule(n) for n in names}
    bad = "model.layers.1.mlp.down_proj"
    with StatisticsCollector(llama, modules, stats_dtype=torch.float64, backend="torch") as col:
        h = modules[bad].register_forward_pre_hook(lambda m, a: (a[0] * float("inf"),))
        try:
            run_calibration(llama, [pad_batch(seqs, labels)])
        finally:
            h.remove()
    with pytest.raises(FloatingPointError, match="down_proj"):
        col.statistics()


class _TokenLayout(nn.Module):
    """One linear layer that sees the batch's ``(B, T, d)`` hidden states laid out by ``layout``."""

    LAYOUTS = {
        "batch_first": lambda x: x,
        "flattened": lambda x: x.reshape(-1, x.shape[-1]),  # (B·T, d), row-major: as reshape(-1, d)
        "extra_unit_dim": lambda x: x.unsqueeze(2),  # (B, T, 1, d)
        "seq_first": lambda x: x.transpose(0, 1),  # (T, B, d): same element count, other order
        "split_tokens": lambda x: x.reshape(x.shape[0] * 2, -1, x.shape[-1]),  # (2B, T/2, d)
    }

    def __init__(self, layout: str):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.layout = self.LAYOUTS[layout]

    def forward(self, x, attention_mask=None):
        return self.lin(self.layout(x))


def test_the_attention_mask_reaches_each_layer_in_its_token_order_or_is_refused():
    """The collector maps the attention mask onto a layer's token dims only where the order of
    the tokens is unambiguous (the same dims up to size-1 dims, or all tokens in one dim);
    any other shape with the same element count is refused naming the layer, never reshaped."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :1] = False
    x[~mask] = float("nan")  # padding may hold anything: it must never be counted
    ref_rows = x[mask]
    A_ref = ref_rows.T @ ref_rows / len(ref_rows)

    def run(layout):
        model = _TokenLayout(layout).double()
        with StatisticsCollector(model, {"lin": model.lin}, stats_dtype=torch.float64, backend="torch") as col:
            out = model(x, attention_mask=mask)
            torch.where(torch.isfinite(out), out, 0).square().sum().backward()
        return col.statistics()

    for layout in ("batch_first", "flattened", "extra_unit_dim"):
        st = run(layout)
        assert st.a_count["lin"] == int(mask.sum()), layout
        torch.testing.assert_close(st.factors("lin")[0], A_ref, **TOL, msg=layout)
    for layout in ("seq_first", "split_tokens"):
        with pytest.raises(ValueError, match=r"layer 'lin': attention_mask of shape \(2, 6\) does not match"):
            run(layout)


@pytest.mark.parametrize("mode, dtype, backend", [("full", torch.float32, "auto"), ("full", torch.float64, "torch"),
                                                  ("packed", torch.float32, "auto")])
def test_statistics_are_the_accumulators_normalised_in_place(mode, dtype, backend):
    """Finalising allocates no factor-sized temporary (docs/DESIGN.md §4): each accumulator is
    mirrored (dense, over several diagonal blocks: d = 600 and 700) and divided in place and
    becomes the statistic; taking them twice divides once; a later pass is refused."""
    from fisherlora import ops
    from fisherlora.testing import peak_memory

    torch.manual_seed(0)
    mlp = TinyMLP(600, 700, 300).to(dtype)
    x = torch.randn(3, 40, 600, dtype=dtype)
    with StatisticsCollector(mlp, {"fc1": mlp.fc1, "fc2": mlp.fc2}, stats_dtype=dtype, backend=backend,
                             mode=mode) as col:
        mlp(x).square().sum().backward()
    accumulators = {**{f"A.{k}": v for k, v in col._A.items()}, **{f"G.{k}": v for k, v in col._G.items()}}
    smallest = min(v.numel() * v.element_size() for v in accumulators.values())  # 180 kB and more
    st = None

    def take():
        nonlocal st
        st = col.statistics()

    peak, _ = peak_memory(take, torch.device("cpu"))
    assert peak <= 4096 < smallest, f"statistics() allocated {peak} bytes (the smallest factor has {smallest})"
    taken = {**{f"A.{k}": v for k, v in st.A.items()}, **{f"G.{k}": v for k, v in st.G.items()}}
    assert {k: v.data_ptr() for k, v in taken.items()} == {k: v.data_ptr() for k, v in accumulators.items()}
    with torch.no_grad():
        h = torch.tanh(mlp.fc1(x)).double().reshape(-1, 700)
        g2 = 2 * mlp(x).double().reshape(-1, 300)
        g1 = (g2 @ mlp.fc2.weight.double()) * (1 - h.square())
    a1 = x.double().reshape(-1, 600)
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for factor, rows in (("A.fc1", a1), ("A.fc2", h), ("G.fc2", g2), ("G.fc1", g1)):
        ref = rows.T @ rows / 120
        got = taken[factor] if mode == "full" else ops.unpack_triu(taken[factor])
        torch.testing.assert_close(got.double(), ref, **tol, msg=f"{factor} ({mode}, {dtype})")
    again = col.statistics()
    for factor, value in taken.items():
        kind, name = factor.split(".")
        assert torch.equal(getattr(again, kind)[name], value), f"a second statistics() changed {factor}"
    with pytest.raises(RuntimeError, match="statistics"):
        with col:
            mlp(x)
