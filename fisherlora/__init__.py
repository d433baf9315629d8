"""fisherlora: Fisher-guided LoRA initialisation (FILet, arXiv 2605.01046) with fused curvature kernels.

Quick use, next to PEFT::

    import fisherlora
    from fisherlora.data import calibration_batches, load_records, tokenize_records

    cal = tokenize_records(load_records("gsm8k", num_samples=128), tokenizer)
    peft_model = fisherlora.get_peft_model(model, lora_config, calibration_batches(cal, tokenizer, 4))

Attributes are imported lazily so that ``import fisherlora`` stays light (no PEFT, Triton or
compiled extension is loaded, and CUDA is never initialised).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FisherLoraConfig": "fisherlora.config",
    "FisherType": "fisherlora.config",
    "Score": "fisherlora.config",
    "Magnitude": "fisherlora.config",
    "FisherStatistics": "fisherlora.collect",
    "StatisticsCollector": "fisherlora.collect",
    "find_target_modules": "fisherlora.collect",
    "collect_statistics": "fisherlora.initialize",
    "compute_initialization": "fisherlora.initialize",
    "initialize": "fisherlora.initialize",
    "get_peft_model": "fisherlora.initialize",
    "load": "fisherlora.initialize",
    "FisherLoraResult": "fisherlora.initialize",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fisherlora' has no attribute {name!r}")


def __dir__():
    return __all__
