"""The naive baseline (bench/naive.py) and fisherlora choose the same directions."""

import torch

from bench.naive import naive_select, naive_statistics
from fisherlora import FisherLoraConfig, find_target_modules, initialize_fisher_lora
from tests.models import pad_batch, random_sequences, tiny_llama


def test_naive_baseline_and_fisherlora_choose_the_same_directions():
    seqs, labels = random_sequences(8, vocab=101, seed=4, max_len=12)
    batches = [pad_batch(seqs[:4], labels[:4]), pad_batch(seqs[4:], labels[4:])]
    cfg = FisherLoraConfig(rank=5, alpha=5, backend="torch")
    model = tiny_llama(torch.float32)
    modules = find_target_modules(model, cfg.to_lora_config())
    naive = naive_select(model, modules, naive_statistics(model, modules, batches), rank=5)
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(False)
    result = initialize_fisher_lora(model, None, batches, cfg, progress=False)
    assert set(naive) == set(result.selections)
    for name, idx in naive.items():
        assert idx.tolist() == result.selections[name].indices.tolist(), name
    # not vacuous: Fisher energy picks other directions than PiSSA's top-σ somewhere
    assert any(idx.tolist() != list(range(5)) for idx in naive.values())
