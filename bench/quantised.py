"""The 4-bit base of ``bench/init_methods.py --load-in-4bit`` (docs/DESIGN.md §8): a benchmark's
float model quantised by bitsandbytes as ``transformers`` loads it, and the step-0 output change
an initialiser leaves on it (no longer exactly zero once a residual is requantised)."""

from __future__ import annotations

import tempfile

import torch


def no_cpu_repack(model):
    """Keep bitsandbytes from repacking 4-bit layers for CPU inference on a no-grad eval forward
    (AVX512-BF16 CPUs): that rounds the scales, drops the backward, and fisherlora refuses it."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def quantise_model(model, device: str, dtype: torch.dtype, quant_type: str = "nf4"):
    """``model`` saved (rebuilt from its config first: ``save_pretrained`` refuses GGUF-loaded models)
    and loaded back with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type)``
    onto ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fisherlora.models import plain_config

    with tempfile.TemporaryDirectory(prefix="fisherlora-bench-4bit-") as tmp:
        with torch.device("meta"):
            clean = type(model)(plain_config(model.config))
        clean.load_state_dict(model.state_dict(), assign=True, strict=False)
        clean.tie_weights()
        clean.save_pretrained(tmp)
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=dtype)
        quantised = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=cfg, device_map=str(device),
                                                         dtype=dtype)
    return no_cpu_repack(quantised).eval()


def logits(model, batch) -> torch.Tensor:
    """float64 logits of one padded batch, masked to its non-padding tokens."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out.double()[batch["attention_mask"].bool()]


def output_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """``‖after − before‖ / ‖before‖`` of two :func:`logits`."""
    return float((after - before).norm() / before.norm())
