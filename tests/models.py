"""Tiny models, an independent float64 reference for the K-FAC factors, and the whole-init helpers
shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from fisherlora.config import FisherLoraConfig
from fisherlora.data import CalibrationData
from fisherlora.testing import pad_batches, random_llama, tiny_data

QKV = ("q_proj", "k_proj", "v_proj")
#: the whole-init tests' config: rank 4, the reference backend
CFG = FisherLoraConfig(rank=4, alpha=8, backend="torch")


def tiny_llama(dtype=torch.float64, seed=0, layers=2, vocab=101, hidden=32, intermediate=48):
    """A random 2-layer Llama (sdpa attention: eager gives NaN on left padding in float64)."""
    return random_llama(seed=seed, vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layers,
                        dtype=dtype)


def tiny_classifier(head_seed: int):
    """The same tiny Llama backbone on every call, with a 3-label head drawn with ``head_seed``
    (what ``from_pretrained(..., num_labels=3)`` does without a seed)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa", num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg).to(torch.float64).eval()
    g = torch.Generator().manual_seed(head_seed)
    with torch.no_grad():
        model.score.weight.copy_(0.02 * torch.randn(model.score.weight.shape, generator=g, dtype=torch.float64))
    return model


def classifier_batches(seed: int = 3):
    return [{**b, "labels": torch.arange(b["input_ids"].shape[0]) % 3}
            for b in pad_batches(tiny_data(6, 10, seed=seed), 3)]


def save_tiny_model(folder, vocab=101):
    """:func:`tiny_llama` (float32) and a character-level tokenizer of the same vocabulary, saved
    as a local ``transformers`` model folder (for the loaders and the command); returns ``folder``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 32 + vocab - len(specials))]
    ids = {t: i for i, t in enumerate(specials + chars)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(ids, [], unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tiny_llama(torch.float32, vocab=vocab).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
    """One padded batch of all ``seqs`` (see :func:`fisherlora.testing.pad_batches`)."""
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


# ----------------------------------------------------------------------------- whole-init helpers
def batches(vocab=101, n=6, seed=1):
    seqs, labels = random_sequences(n, vocab=vocab, seed=seed)
    return [pad_batch(seqs[:3], labels[:3]), pad_batch(seqs[3:], labels[3:])]


def probe(vocab=101):
    return torch.randint(1, vocab, (2, 11), generator=torch.Generator().manual_seed(7))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_logits_close(a, b, what):
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    assert diff <= 1e-4 * scale, f"{what}: max abs diff {diff:.3e} > 1e-4 × logit scale {scale:.3e}"


def init_llama(cfg=None, lora_config=None, **kw):
    """A tiny Llama initialised with ``cfg`` (default :data:`CFG`): ``(model, result, probe ids, logits before)``."""
    import fisherlora

    model = tiny_llama(torch.float32)
    ids = probe()
    before = logits(model, ids)
    result = fisherlora.initialize_fisher_lora(model, lora_config, batches(), cfg or CFG, progress=False, **kw)
    return model, result, ids, before


def _hooks(model):
    return {n: (set(m._forward_hooks), set(m._forward_pre_hooks)) for n, m in model.named_modules()}


def model_snapshot(model):
    """What :func:`assert_restored` compares: weights, module types, flags, attributes, hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            set(vars(model)), _hooks(model))


def assert_restored(model, snap):
    state, types, flags, attrs, hooks = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(vars(model)) == attrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert _hooks(model) == hooks


#: float64 factors against the float64 reference
TOL = dict(rtol=1e-9, atol=1e-11)


def collect(model, names, batches, checkpoint=False, **kw):
    """Float64 statistics of the layers ``names`` over ``batches`` (reference backend)."""
    from fisherlora.calibration import run_calibration
    from fisherlora.collect import StatisticsCollector

    modules = {n: model.get_submodule(n) for n in names}
    with StatisticsCollector(model, modules, stats_dtype=torch.float64, backend="torch", checkpoint=checkpoint) as col:
        run_calibration(model, batches, **kw)
    return col.statistics()


def labels_mask(labels, batch):
    """True where the padded batch has a real token whose label is -100 (padding stays False)."""
    out = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    return out.tolist()


def mode_batches(n=8, seed=2):
    seqs, labels = random_sequences(n, vocab=101, seed=seed, max_len=12)
    return [pad_batch(seqs[:4], labels[:4]), pad_batch(seqs[4:], labels[4:])]


def run_mode(mode, groups=1, layers=3, **kw):
    """A 3-layer tiny Llama initialised in memory mode ``mode`` with ``groups`` layer groups."""
    import fisherlora

    model = tiny_llama(torch.float32, layers=layers)
    kw.setdefault("backend", "torch")
    cfg = FisherLoraConfig(rank=4, alpha=8, memory_mode=mode, layer_groups=groups, **kw)
    return fisherlora.initialize_fisher_lora(model, None, mode_batches(), cfg, progress=False)
