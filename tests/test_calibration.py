"""The calibration passes: the summed loss and its gradient, label masks, the true Fisher's draws,
and clear errors for data without labels."""

import pytest
import torch
from torch import nn

from tests.models import TOL, collect, labels_mask, pad_batch, target_names


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_token_loss_sum_equals_cross_entropy_and_its_gradient(dtype, reuse):
    from fisherlora.calibration import _SumCrossEntropy, token_loss_sum

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


def test_labels_at_padding_never_count(llama, data):
    seqs, labels = data
    names = target_names(llama)[:4]
    batch = pad_batch(seqs, labels)
    ref = collect(llama, names, [batch])
    loose = dict(batch, labels=batch["input_ids"].masked_fill(torch.tensor(labels_mask(labels, batch)), -100))
    got = collect(llama, names, [loose])  # labels left on padded positions
    for name in names:
        torch.testing.assert_close(got.factors(name)[1], ref.factors(name)[1], **TOL)


def test_no_label_tokens_is_a_clear_error(llama, data):
    seqs, labels = data
    batch = pad_batch(seqs, [[-100] * len(s) for s in seqs])
    with pytest.raises(ValueError, match="no label tokens"):
        collect(llama, target_names(llama), [batch])


def test_empty_data_is_a_clear_error(llama):
    names = target_names(llama)
    with pytest.raises(ValueError, match="calibration data is empty"):
        collect(llama, names, [])


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_a_not_counted_batch_runs_its_passes_and_adds_nothing(llama, data, fisher_type, with_labels):
    """A lock-step batch (docs/DESIGN.md §7) makes one forward and one backward per label draw,
    even without a label token, and leaves every factor, count and total as without it."""
    from fisherlora.calibration import NOT_COUNTED, run_calibration
    from fisherlora.collect import StatisticsCollector

    seqs, labels = data
    names = target_names(llama)[:3]
    batch = pad_batch(seqs, labels)
    spare = pad_batch(seqs[:1], labels[:1] if with_labels else [[-100] * len(seqs[0])])
    kw = dict(fisher_type=fisher_type, mc_samples=2, seed=3)
    ref = collect(llama, names, [batch], **kw)
    modules = {n: llama.get_submodule(n) for n in names}
    backwards = []
    layer = llama.get_submodule(names[0])
    handle = layer.register_full_backward_hook(lambda *a: backwards.append(1))
    try:
        with StatisticsCollector(llama, modules, stats_dtype=torch.float64, backend="torch") as col:
            totals = run_calibration(llama, [{**spare, NOT_COUNTED: True}, batch], collector=col, **kw)
    finally:
        handle.remove()
    got = col.statistics()
    assert len(backwards) == (2 if fisher_type == "true" else 1) * 2  # the spare batch's, then the batch's
    assert totals["batches"] == 1 and totals["sequences"] == len(seqs)
    for name in names:
        assert got.a_count[got.a_key[name]] == ref.a_count[ref.a_key[name]] and got.g_count[name] == ref.g_count[name]
        torch.testing.assert_close(got.factors(name)[0], ref.factors(name)[0], rtol=0, atol=0)
        torch.testing.assert_close(got.factors(name)[1], ref.factors(name)[1], rtol=0, atol=0)
