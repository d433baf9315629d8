"""K-FAC statistics collection against float64 hand computations (DESIGN.md §1 step 1)."""

import pytest
import torch
from torch import nn

from fisherlora.collect import FisherStatistics, StatisticsCollector, run_calibration
from tests.models import TinyMLP, pad_batch, random_sequences, reference_factors, target_names, tiny_llama

TOL = dict(rtol=1e-9, atol=1e-11)


def collect(model, names, batches, checkpoint=False, **kw):
    modules = {n: model.get_submodule(n) for n in names}
    with StatisticsCollector(model, modules, stats_dtype=torch.float64, backend="torch", checkpoint=checkpoint) as col:
        run_calibration(model, batches, **kw)
    return col.statistics()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def data():
    return random_sequences(6, vocab=101, seed=1)


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


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_token_loss_sum_equals_cross_entropy_and_its_gradient(dtype, reuse):
    from fisherlora.collect import _SumCrossEntropy, token_loss_sum

    torch.manual_seed(0)
    h = (3 * torch.randn(3, 9, 50, dtype=torch.float64)).to(dtype).requires_grad_()
    logits = h * 1.0  # a non-leaf, as a model's output: reuse_logits writes the gradient into it
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    labels[2, 6] = -100
    old = _SumCrossEntropy.CHUNK_ELEMENTS
    _SumCrossEntropy.CHUNK_ELEMENTS = 7 * 50  # several chunks, the last one partial
    try:
        loss, n = token_loss_sum(logits, labels, reuse_logits=reuse)
        loss.backward()
    finally:
        _SumCrossEntropy.CHUNK_ELEMENTS = old
    ref_logits = h.detach().double().requires_grad_()
    ref = nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                      ignore_index=-100, reduction="sum")
    ref.backward()
    assert n == int((labels[:, 1:] != -100).sum())
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    # half precision: the rounding of the stored gradient
    grad_tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    torch.testing.assert_close(h.grad.double(), ref_logits.grad, rtol=grad_tol, atol=grad_tol)
    assert h.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


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


def test_true_fisher_is_seeded_and_keeps_A(llama, data):
    seqs, labels = data
    names = target_names(llama)[:3]
    emp = collect(llama, names, [pad_batch(seqs, labels)])
    t1 = collect(llama, names, [pad_batch(seqs, labels)], fisher_type="true", mc_samples=2, seed=3)
    t2 = collect(llama, names, [pad_batch(seqs, labels)], fisher_type="true", mc_samples=2, seed=3)
    for name in names:
        torch.testing.assert_close(t1.factors(name)[0], emp.factors(name)[0], **TOL)
        torch.testing.assert_close(t1.factors(name)[1], t2.factors(name)[1], rtol=0, atol=0)
        assert not torch.allclose(t1.factors(name)[1], emp.factors(name)[1])
        assert t1.g_count[name] == 2 * emp.g_count[name]


def test_statistics_cache_round_trips_exactly(llama, data, tmp_path):
    seqs, labels = data
    names = target_names(llama)
    st = collect(llama, names, [pad_batch(seqs, labels)])
    st.info["note"] = "x"
    st.save(tmp_path / "s.safetensors")
    back = FisherStatistics.load(tmp_path / "s.safetensors")
    assert back.a_key == st.a_key and back.a_count == st.a_count and back.g_count == st.g_count
    assert back.shapes == st.shapes and back.info == st.info
    for name in names:
        for a, b in zip(st.factors(name), back.factors(name)):
            assert torch.equal(a, b)
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own header error)
        FisherStatistics.load(tmp_path / "other.safetensors")


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


def test_labels_at_padding_never_count(llama, data):
    seqs, labels = data
    names = target_names(llama)[:4]
    batch = pad_batch(seqs, labels)
    ref = collect(llama, names, [batch])
    loose = dict(batch, labels=batch["input_ids"].masked_fill(torch.tensor(labels_mask(labels, batch)), -100))
    got = collect(llama, names, [loose])  # labels left on padded positions
    for name in names:
        torch.testing.assert_close(got.factors(name)[1], ref.factors(name)[1], **TOL)


def labels_mask(labels, batch):
    """True where the padded batch has a real token whose label is -100 (padding stays False)."""
    out = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    return out.tolist()


def test_no_label_tokens_is_a_clear_error(llama, data):
    seqs, labels = data
    batch = pad_batch(seqs, [[-100] * len(s) for s in seqs])
    with pytest.raises(ValueError, match="no label tokens"):
        collect(llama, target_names(llama), [batch])


def test_empty_data_is_a_clear_error(llama):
    names = target_names(llama)
    with pytest.raises(ValueError, match="calibration data is empty"):
        collect(llama, names, [])
