"""The whole initialisation on a full-size architecture with random weights (docs/DESIGN.md §6).

Builds the model from an architecture config (a bundled one such as ``llama-3-8b``, or a
``config.json``) directly on the device with random weights, makes ``num_samples`` random token
sequences (lengths between ``max_length/2`` and ``max_length``, labels on a random suffix), and runs
:func:`fisherlora.initialize_fisher_lora` with the chosen memory mode. Reports time per phase,
the peak memory (CUDA allocator peak, or peak RSS on a CPU) and the plan's prediction, as JSON.

``--num-layers N`` keeps only the first ``N`` decoder layers of the architecture (every shape
unchanged): the SVD of every projection costs the same per layer, so a short GPU lease can time
one layer's worth of an 8B init and check the memory plan on the same truncated model.

    python -m bench.gpu_init --config llama-3-8b --memory-mode projected \\
        --layer-groups 4 --json $OUT/init_8b.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from bench import common
    from fisherlora import initialize_fisher_lora, testing
    from fisherlora.flags import config_from_args
    from fisherlora.models import load_config, meta_model_from_config
    from fisherlora.plan import plan_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True,
                   help="a bundled architecture (llama-3-8b, llama-2-7b, llama-3.2-1b) or a transformers config.json")
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep only the first N decoder layers (same shapes; default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    toy = {"num_samples": 8, "max_length": 32} if common.quick() else {}  # FISHERLORA_BENCH_QUICK=1: smoke tests
    common.add_size_flags(p, "memory_mode", "layer_groups", "bases_dtype", "backend", memory_mode="projected",
                          bases_dtype="model", **toy)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = load_config(args.config)
    if args.num_layers is not None:
        if not 1 <= args.num_layers <= config.num_hidden_layers:
            p.error(f"--num-layers must be in 1..{config.num_hidden_layers}")
        config.num_hidden_layers = args.num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: args.num_layers]
    meta = meta_model_from_config(config)
    cfg = config_from_args(args, alpha=args.rank)
    plans = plan_memory(meta, cfg.to_lora_config(), batch_size=args.batch_size, max_length=args.max_length,
                        dtype=dtype, bases_bytes=dtype.itemsize if args.bases_dtype == "model" else 4,
                        keep_statistics=False, backend=cfg.backend, fisher_type=cfg.fisher_type.value,
                        mc_samples=cfg.mc_samples)  # as the run below
    planned = next((q.to_dict() for q in plans if q.label == args.memory_mode and q.layer_groups == args.layer_groups),
                   None)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(meta.config, dtype=dtype, attn_implementation="sdpa").eval()
    data = testing.tiny_data(args.num_samples, args.max_length, vocab=meta.config.vocab_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in testing.pad_batches(data, args.batch_size)]
    build_s = time.perf_counter() - t0
    common.memory_mark(device)
    t0 = time.perf_counter()
    result = initialize_fisher_lora(model, None, batches, cfg, num_batches=len(data), keep_statistics=False)
    common.synchronize(device)
    total = time.perf_counter() - t0
    report = result.report()
    out = {
        "config": str(args.config), "num_layers_built": meta.config.num_hidden_layers,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "memory_mode": result.extra["memory_mode"], "layer_groups": result.extra["layer_groups"],
        "tokens": common.batch_tokens(batches), "build_s": build_s, "total_s": total,
        "timings_s": result.timings, "svd_seconds_per_shape": result.extra["svd_seconds_per_shape"],
        "peak_mb": common.memory_peak(device), "planned": planned, "num_layers": report["num_layers"],
        "mean_energy_captured": report["mean_energy_captured"], "torch": torch.__version__,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
