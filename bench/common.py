"""Shared benchmark setup: device choice, op inputs, synchronisation, peak-memory measurement.

A plain module of functions, imported by every ``bench/`` file (``from bench import common``) so
that each op's inputs are built in one place.
"""

from __future__ import annotations

import copy
import os

import torch

from fisherlora import testing

#: ``FISHERLORA_BENCH_QUICK=1`` shrinks every benchmark to toy sizes (seconds on a CPU); the smoke
#: test in ``tests/`` uses it so the benchmark files never rot.
QUICK_ENV = "FISHERLORA_BENCH_QUICK"


#: the calibration-size flags every model-level benchmark takes, generated from FisherLoraConfig
SIZE_FIELDS = ("num_samples", "max_length", "batch_size", "rank")
#: the CPU benchmarks' smaller calibration set (FisherLoraConfig's own defaults are 128 x 512)
CPU_SIZES = {"num_samples": 32, "max_length": 256}


def add_size_flags(parser, *extra_fields: str, **defaults) -> None:
    """``--num-samples --max-length --batch-size --rank`` (and ``extra_fields``) from
    :func:`fisherlora.flags.add_config_flags`, with benchmark ``defaults``."""
    from fisherlora.flags import add_config_flags

    add_config_flags(parser, SIZE_FIELDS + extra_fields, defaults=defaults, title="calibration and LoRA shape")


def write_markdown_table(path, header: list[str], rows: list[list[str]]) -> str:
    """Write (and return) a Markdown table: the benchmarks' human-readable result beside their JSON."""
    from pathlib import Path

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text


def quick() -> bool:
    return os.environ.get(QUICK_ENV) == "1"


def pick_device() -> torch.device:
    """CUDA when a device is visible (``FISHERLORA_BENCH_DEVICE`` overrides), else CPU."""
    name = os.environ.get("FISHERLORA_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def tokens_input(tokens: int, d: int, dtype: torch.dtype, mask_frac: float, device: torch.device,
                 batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hook-like activations ``(batch, tokens // batch, d)`` and a token mask.

    ``mask_frac`` is the fraction of tokens masked OUT (padding); ``0`` gives ``mask=None``.
    Masked-out rows hold NaN, as padding may: a correct backend never reads them.
    """
    batch = max(1, min(batch, tokens))
    g = generator(device, seed)
    x = torch.randn(batch, tokens // batch, d, device=device, dtype=torch.float32, generator=g).to(dtype)
    if mask_frac <= 0:
        return x, None
    mask = torch.rand(x.shape[:-1], device=device, generator=g) >= mask_frac
    x.masked_fill_(~mask.unsqueeze(-1), float("nan"))
    return x, mask


def directions(d: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 1) -> torch.Tensor:
    """``(d, k)`` orthonormal columns (float32 QR), cast to ``dtype``."""
    g = generator(device, seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, device=device, generator=g))
    return q.to(dtype).contiguous()


def spd_factor(d: int, device: torch.device, packed: bool = False, tokens: int = 256,
               seed: int = 2) -> torch.Tensor:
    """A float32 symmetric positive semi-definite ``(d, d)`` matrix (or its packed triangle)."""
    from fisherlora.ops import pack_triu

    g = generator(device, seed)
    a = torch.randn(tokens, d, device=device, generator=g)
    M = a.T @ a / tokens
    return pack_triu(M) if packed else M


def syrk_flops(tokens: int, d: int) -> float:
    """FLOPs counted for one SYRK update: ``T·d²`` (the upper triangle's multiply-adds ×2)."""
    return float(tokens) * d * d


def energy_flops(d: int, k: int) -> float:
    """FLOPs of ``diag(Qᵀ M Q)`` counted as the symmetric kernel does them: ``d²·k``."""
    return float(d) * d * k


def projected_flops(tokens: int, d: int, k: int) -> float:
    return 2.0 * tokens * d * k


# ----------------------------------------------------------------------------- model-level setup
def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (:func:`fisherlora.memory.peak_memory_mb`)."""
    from fisherlora.memory import peak_memory_mb

    return peak_memory_mb("cpu")


def embedded_setup(num_samples: int, max_length: int, batch_size: int, *, model: str = "smollm2-135m",
                   data: str = "gsm8k", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The embedded SmolLM2-135M-Instruct and ``num_samples`` GSM8K pairs, tokenised and batched.

    Every model-level benchmark (naive baseline, init methods, memory, quality) starts here so
    that they compare the same model on the same calibration batches.

    Returns:
        ``(model, tokenizer, batches)`` with ``batches`` a list of padded dicts.
    """
    from fisherlora import data as fdata

    lm, tok = fdata.load_model_and_tokenizer(model, dtype=dtype, device=device)
    records = fdata.load_records(data, num_samples=num_samples, seed=seed)
    cal = fdata.tokenize_records(records, tok, max_length=max_length)
    return lm, tok, list(fdata.calibration_batches(cal, tok, batch_size))


# ----------------------------------------------------------------------------- per-phase memory
def _proc_status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """The process's resident memory now, in MiB (Linux ``VmRSS``; None elsewhere)."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS, so that a later
    :func:`peak_rss_since_reset_mb` sees only what follows (Linux >= 4.0: ``clear_refs`` = 5).

    ``ru_maxrss`` (:func:`peak_rss_mb`) is NOT reset by this. Returns False where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float | None:
    """Peak resident memory (``VmHWM``) since the last :func:`reset_peak_rss`, in MiB."""
    kb = _proc_status_kb("VmHWM")
    return None if kb is None else kb / 1024


def memory_mark(device: torch.device) -> float | None:
    """Start a peak-memory window on ``device``; returns the memory in use now, in MiB (the base
    that :func:`memory_peak` subtracts): CUDA allocator bytes on a GPU, RSS on a CPU."""
    import gc

    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    reset_peak_rss()
    return rss_mb()


def memory_peak(device: torch.device) -> float | None:
    """Peak memory (MiB, absolute) since the last :func:`memory_mark` on ``device``."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_since_reset_mb()


# ----------------------------------------------------------------------------- tiny stand-in model
def random_llama_setup(num_samples: int, max_length: int, batch_size: int, *, seed: int = 0, vocab: int = 101,
                       hidden: int = 32, intermediate: int = 48, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                       dtype: torch.dtype = torch.float32):
    """A :func:`random_llama` and random supervised sequences, batched like
    :func:`embedded_setup` (right padding, labels -100 on a random prompt prefix and on padding).

    No tokenizer (returned as None). Returns ``(model, None, batches)``.
    """
    model = testing.random_llama(seed=seed, vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layers,
                         heads=heads, kv_heads=kv_heads, max_positions=max(128, max_length), dtype=dtype)
    data = testing.tiny_data(num_samples, max_length, seed=seed, vocab=vocab)
    return model, None, list(testing.pad_batches(data, batch_size))


def config_setup(config, num_samples: int, max_length: int, batch_size: int, *, seed: int = 0,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, num_layers: int | None = None):
    """A random-weight model of an architecture config (a bundled name such as ``llama-3.2-1b``,
    a ``config.json``, or a ``transformers`` config object), built directly on ``device``, and
    random supervised sequences of its vocabulary batched like :func:`random_llama_setup` (no
    tokenizer: returned as None).
    ``num_layers`` keeps only the first decoder layers (shapes unchanged)."""
    from transformers import AutoModelForCausalLM

    from fisherlora.models import load_config, meta_model_from_config

    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else copy.deepcopy(config)
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:num_layers]
    meta = meta_model_from_config(cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(meta.config, dtype=dtype, attn_implementation="sdpa").eval()
    data = testing.tiny_data(num_samples, max_length, seed=seed, vocab=meta.config.vocab_size)
    return model, None, list(testing.pad_batches(data, batch_size))


def tiny_setup(num_samples: int, max_length: int, batch_size: int, *, seed: int = 0, vocab: int = 101):
    """A random 2-layer Llama (hidden 32) for smoke tests of the model-level benchmarks: seconds
    on a CPU. See :func:`random_llama_setup`."""
    return random_llama_setup(num_samples, max_length, batch_size, seed=seed, vocab=vocab)


def unpadded_sequences(batches) -> list[torch.Tensor]:
    """Every sequence of padded ``batches`` without its padding, as ``(1, T)`` id tensors."""
    out = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            out.append(ids[mask.bool()].unsqueeze(0))
    return out


def batch_tokens(batches) -> int:
    """Non-padding tokens in ``batches``."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches))
