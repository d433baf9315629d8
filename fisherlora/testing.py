"""Fixtures that the tests and the benchmarks share: a random-weight Llama, random supervised
sequences and their padded batches (no tokenizer needed), a tiny chat model folder (for the
examples and the walk-through at CI size), and the peak memory of one call.
Nothing here is used by an initialisation itself."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fisherlora.data import CalibrationData

__all__ = ["random_llama", "save_tiny_chat_model", "tiny_data", "pad_batches", "peak_memory"]


def random_llama(*, seed: int = 0, vocab: int = 101, hidden: int = 32, intermediate: int = 48, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, max_positions: int = 128, dtype: torch.dtype = torch.float32,
                 tie_word_embeddings: bool = False):
    """A random-weight Llama in eval mode with sdpa attention (eager attention turns left-padding
    rows into NaN in float64, docs/DESIGN.md). Shared by the benchmarks and the tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(dtype).eval()


#: the chat template of :func:`save_tiny_chat_model`: a turn is ``<role>content|``
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tiny_chat_model(folder, *, seed: int = 0):
    """Save a random 2-layer Llama and a character-level tokenizer (one token per printable ASCII
    character and newline; ``<pad>``, ``</s>``, ``<unk>``) with :data:`TINY_CHAT_TEMPLATE` as a
    local ``transformers`` folder, and return the folder (a ``Path``)."""
    from pathlib import Path

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    ids = {t: i for i, t in enumerate(specials + chars)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(ids, [], unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    folder = Path(folder)
    random_llama(seed=seed, vocab=len(ids), max_positions=1024).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_data(num_samples: int, max_length: int, *, seed: int = 0, vocab: int = 101):
    """``num_samples`` random token sequences (lengths ``max_length//2 .. max_length``) as
    :class:`fisherlora.data.CalibrationData`, labels -100 on a random prompt prefix."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(num_samples):
        n = int(torch.randint(max(2, max_length // 2), max_length + 1, (1,), generator=g))
        seq = torch.randint(1, vocab, (n,), generator=g).tolist()
        n_prompt = int(torch.randint(0, n - 1, (1,), generator=g))
        ids.append(seq)
        labels.append([-100] * n_prompt + seq[n_prompt:])
    return CalibrationData(ids, labels)


def pad_batches(data, batch_size: int, pad_id: int = 0, side: str = "right"):
    """Padded ``{"input_ids", "attention_mask", "labels"}`` batches of ``data``
    (:class:`fisherlora.data.CalibrationData`) without a tokenizer, padding on ``side``."""
    for start in range(0, len(data), batch_size):
        seqs = data.input_ids[start:start + batch_size]
        labs = data.labels[start:start + batch_size]
        T = max(len(s) for s in seqs)
        out = {"input_ids": torch.full((len(seqs), T), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros(len(seqs), T, dtype=torch.long),
               "labels": torch.full((len(seqs), T), -100, dtype=torch.long)}
        for b, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            out["input_ids"][b, sl] = torch.tensor(s)
            out["attention_mask"][b, sl] = 1
            out["labels"][b, sl] = torch.tensor(lab)
        yield out


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: the allocation events recorded by the
    PyTorch profiler (``profile_memory=True``), summed in time order. Returns ``(bytes, method)``;
    ``bytes`` is None when no method applies.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda_max_memory_allocated"
    if device.type == "cpu":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        running = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            running += e.nbytes()
            peak = max(peak, running)
        return peak, "torch_profiler_memory_events"
    return None, "unavailable"
