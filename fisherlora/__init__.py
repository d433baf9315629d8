"""fisherlora: Fisher-guided LoRA initialisation (FILet, arXiv 2605.01046) with fused curvature kernels.

Quick use, next to PEFT::

    import fisherlora
    from fisherlora.data import calibration_batches, load_records, tokenize_records

    cal = tokenize_records(load_records("gsm8k", num_samples=128), tokenizer)
    peft_model = fisherlora.get_peft_model(model, lora_config, calibration_batches(cal, tokenizer, 4))

``import fisherlora`` imports torch but not PEFT, transformers, Triton or the compiled extension
(those load on first use), and never initialises CUDA.
"""

__version__ = "0.1.0"

from fisherlora.adapter import load  # noqa: E402
from fisherlora.collect import StatisticsCollector, collect_statistics  # noqa: E402
from fisherlora.config import FisherLoraConfig, FisherType, Init, Magnitude, Score  # noqa: E402
from fisherlora.decompose import compute_initialization  # noqa: E402
from fisherlora.export import convert, merge  # noqa: E402
from fisherlora.initialize import get_peft_model, initialize_fisher_lora  # noqa: E402
from fisherlora.layers import find_target_modules  # noqa: E402
from fisherlora.result import FisherLoraResult  # noqa: E402
from fisherlora.statistics import FisherStatistics  # noqa: E402

__all__ = [
    "FisherLoraConfig", "FisherType", "Init", "Score", "Magnitude",
    "FisherStatistics", "StatisticsCollector", "find_target_modules",
    "FisherLoraResult", "collect_statistics", "compute_initialization", "initialize_fisher_lora", "get_peft_model",
    "load", "convert", "merge",
    "__version__",
]
