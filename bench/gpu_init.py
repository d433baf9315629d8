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
    p.add_argument("--free-gb", type=float, default=None,
                   help="take the layer groups the plan picks for this much memory in --memory-mode (e.g. 24)")
    p.add_argument("--warmup", action="store_true",
                   help="first run the init once on a 1-layer model of the same shapes (one batch), timed apart: "
                        "Triton compiles and autotunes there, so the timed run is the work alone")
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
    if args.free_gb is not None:  # the groups the planner picks for that budget, in this mode
        from fisherlora.plan import GB, choose_mode

        picked = choose_mode([q for q in plans if q.label == args.memory_mode], int(args.free_gb * GB))
        args.layer_groups = picked.layer_groups
        cfg = config_from_args(args, alpha=args.rank)
    planned = next((q.to_dict() for q in plans if q.label == args.memory_mode and q.layer_groups == args.layer_groups),
                   None)
    warmup_s = warmup_compiles = None
    if args.warmup:
        warmup_s, warmup_compiles = _warmup(args, config, cfg, device, dtype)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(meta.config, dtype=dtype, attn_implementation="sdpa").eval()
    data = testing.tiny_data(args.num_samples, args.max_length, vocab=meta.config.vocab_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in testing.pad_batches(data, args.batch_size)]
    build_s = time.perf_counter() - t0
    common.memory_mark(device)
    t0 = time.perf_counter()
    with _compile_counter(device) as compiles:
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
        "free_gb": args.free_gb, "warmup_s": warmup_s, "warmup_kernel_compiles": warmup_compiles,
        "kernel_compiles_in_timed_run": None if compiles is None else dict(compiles.compiled),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def _compile_counter(device):
    """Triton's compiles during the block (``None`` off a GPU, or without Triton)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext(None)
    try:
        from fisherlora.counting import count_kernel_compiles

        return count_kernel_compiles(keys=False)
    except ImportError:
        return contextlib.nullcontext(None)


def _warmup(args, config, cfg, device, dtype) -> tuple[float, dict | None]:
    """The init once on a 1-layer model of the same shapes and one batch: every kernel the timed
    run launches is compiled (and autotuned) here. Returns its seconds and Triton's compiles."""
    import dataclasses

    from bench import common
    from fisherlora import initialize_fisher_lora

    t0 = time.perf_counter()
    model, _, batches = common.config_setup(config, args.batch_size, args.max_length, args.batch_size,
                                            device=str(device), dtype=dtype, num_layers=1)
    with _compile_counter(device) as compiles:
        initialize_fisher_lora(model, None, batches[:1], dataclasses.replace(cfg, layer_groups=1), num_batches=1,
                               keep_statistics=False)
        common.synchronize(device)
    del model, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0, None if compiles is None else dict(compiles.compiled)


if __name__ == "__main__":
    raise SystemExit(main())
