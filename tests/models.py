"""Tiny models and an independent float64 reference for the K-FAC factors, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from bench.common import pad_batches, random_llama
from fisherlora.data import CalibrationData

QKV = ("q_proj", "k_proj", "v_proj")


def tiny_llama(dtype=torch.float64, seed=0, layers=2, vocab=101, hidden=32, intermediate=48):
    """A random 2-layer Llama (sdpa attention: eager gives NaN on left padding in float64)."""
    return random_llama(seed=seed, vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layers,
                        dtype=dtype)


def tiny_gpt2(dtype=torch.float64, seed=0):
    """A random 2-layer GPT-2 (its projections are transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=24, n_layer=2, n_head=4,
                     attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


class TinyMLP(nn.Module):
    def __init__(self, d_in=5, d_hidden=7, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        h = self.fc1(x)
        h = torch.tanh(h)  # not in place: the reference re-runs this
        return self.fc2(h)


def random_sequences(n, vocab, seed=0, min_len=3, max_len=9, label_drop=0.3):
    """``n`` token sequences of varying length and their labels (-100 on a random prompt prefix)."""
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (L,), generator=g)
        lab = ids.clone()
        n_prompt = int(torch.randint(0, L, (1,), generator=g))
        lab[:n_prompt] = -100
        seqs.append(ids.tolist())
        labels.append(lab.tolist())
    return seqs, labels


def pad_batch(seqs, labels, side="right", pad_id=0):
    """One padded batch of all ``seqs`` (see :func:`bench.common.pad_batches`)."""
    return next(pad_batches(CalibrationData(seqs, labels), len(seqs), pad_id=pad_id, side=side))


def reference_factors(model, names, seqs, labels):
    """Hand computation, one unpadded sequence at a time, in float64, with autograd.grad.

    Returns ``(A, G, counts)``: layer name -> ``Σ aaᵀ / N`` and ``Σ ggᵀ / N`` over every token
    of every sequence (``g = ∂(Σ_label-tokens CE)/∂s``), and N.
    """
    modules = {n: model.get_submodule(n) for n in names}
    sums_A = {n: 0 for n in names}
    sums_G = {n: 0 for n in names}
    count = 0
    for ids, lab in zip(seqs, labels):
        captured = {}
        handles = [m.register_forward_hook(lambda mod, a, o, n=n, c=captured: c.__setitem__(n, (a[0], o)))
                   for n, m in modules.items()]
        try:
            params = [p for p in model.parameters()]
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(False)
            emb = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
            L = len(ids)
            logits = model(inputs_embeds=emb, attention_mask=torch.ones(1, L, dtype=torch.long),
                           position_ids=torch.arange(L)[None]).logits
            target = torch.tensor([lab])[:, 1:]
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=-100, reduction="sum")
            outs = [captured[n][1] for n in names]
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        for n, g in zip(names, grads):
            a = captured[n][0].reshape(-1, captured[n][0].shape[-1]).double()
            g = torch.zeros_like(outs[names.index(n)]) if g is None else g
            g = g.reshape(-1, g.shape[-1]).double()
            sums_A[n] = sums_A[n] + a.T @ a
            sums_G[n] = sums_G[n] + g.T @ g
        count += len(ids)
    return {n: sums_A[n] / count for n in names}, {n: sums_G[n] / count for n in names}, count


def target_names(model, suffixes=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]
