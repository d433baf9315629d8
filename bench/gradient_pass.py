"""What the weight-gradient statistic adds to a calibration pass, measured in one process.

Issue 31's target: gathering ``∇W = Σ_t g_t a_tᵀ`` beside ``A`` and ``G`` adds at most 0.35× a
bare forward+backward pass on the embedded model. Whole-init runs (``bench/init_methods.py``, one
subprocess per method) measure it as the difference of two collect phases taken minutes apart,
and this 2-core machine drifts by 20 % between such runs. Here the four passes run in one
process, on the same batches, interleaved within every repeat, and the medians are compared:

- ``bare``: forward + backward of the label loss with every weight frozen (the gradient reaches
  each layer through the input embeddings): ``bench.init_methods.floor_pass``;
- ``autograd``: the same pass with the target weights trainable, so autograd forms each
  ``∇W`` itself (what PEFT's ``lora_ga`` does to get its gradients);
- ``filet``: fisherlora's calibration pass gathering ``A`` and ``G`` (``collect_statistics``);
- ``gradient``: the same pass gathering ``∇W`` too (``init="gradient"``; ``natural_gradient``
  gathers the same).

Reported: the median seconds of each, the statistic's share ``(gradient − filet) / bare`` and
autograd's ``(autograd − bare) / bare``, each also per repeat (min–max).

    python -m bench.gradient_pass [--num-samples 8] [--repeats 5] [--json bench/runs/gradient_cost/gradient_pass.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench import common
from bench.init_methods import PROJECTIONS, floor_pass, lora_config

VARIANTS = ("bare", "autograd", "filet", "gradient")


def autograd_pass(model, modules: dict, batches) -> None:
    """``floor_pass`` with the target weights trainable: autograd accumulates their ``∇W``."""
    weights = [m.weight for m in modules.values()]
    try:
        floor_pass(model, batches, trainable=weights)
        if any(w.grad is None for w in weights):
            raise RuntimeError("autograd formed no weight gradient: the pass did not reach a target layer")
    finally:
        for w in weights:
            w.grad = None


def statistics_pass(model, modules: dict, batches, init: str, backend: str) -> None:
    """fisherlora's calibration pass over ``batches`` (statistics dropped at once)."""
    from fisherlora import FisherLoraConfig
    from fisherlora.collect import collect_statistics

    cfg = FisherLoraConfig(rank=16, init=init, backend=backend)
    collect_statistics(model, modules, batches, cfg, progress=False)


def run(num_samples: int, max_length: int, batch_size: int, repeats: int, backend: str, tiny: bool = False) -> dict:
    from fisherlora.layers import find_target_modules

    setup = common.tiny_setup if tiny else common.embedded_setup
    model, _tok, batches = setup(num_samples, max_length, batch_size)
    model.requires_grad_(False)
    modules = find_target_modules(model, lora_config(16, 16.0))
    passes = {"bare": lambda: floor_pass(model, batches),
              "autograd": lambda: autograd_pass(model, modules, batches),
              "filet": lambda: statistics_pass(model, modules, batches, "filet", backend),
              "gradient": lambda: statistics_pass(model, modules, batches, "gradient", backend)}
    for fn in passes.values():  # warm-up: thread pools, the allocator, the extension's first call
        fn()
    times = {name: [] for name in passes}
    for rep in range(repeats):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]  # rotated: no fixed slot
        for name in order:
            t0 = time.perf_counter()
            passes[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {rep + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in VARIANTS), flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    share = [(g - f) / b for g, f, b in zip(times["gradient"], times["filet"], times["bare"])]
    auto = [(a - b) / b for a, b in zip(times["autograd"], times["bare"])]
    return {
        "median_s": med, "times_s": times,
        "gradient_share_of_bare": (med["gradient"] - med["filet"]) / med["bare"],
        "gradient_share_per_repeat": [min(share), max(share)],
        "autograd_share_of_bare": (med["autograd"] - med["bare"]) / med["bare"],
        "autograd_share_per_repeat": [min(auto), max(auto)],
        "target_share": 0.35,
        "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "settings": {"model": "tiny random Llama" if tiny else "embedded SmolLM2-135M", "num_samples": num_samples,
                     "max_length": max_length, "batch_size": batch_size,
                     "repeats": repeats, "backend": backend, "targets": PROJECTIONS,
                     "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()[0],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=8, help="GSM8K pairs (default 8: two batches of 4)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats after one warm-up of each pass")
    p.add_argument("--backend", default="ext", help="fisherlora backend of the statistics passes (default ext)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead (the smoke test)")
    args = p.parse_args(argv)
    res = run(args.num_samples, args.max_length, args.batch_size, args.repeats, args.backend, args.tiny)
    lo, hi = res["gradient_share_per_repeat"]
    alo, ahi = res["autograd_share_per_repeat"]
    print("median s: " + ", ".join(f"{n} {res['median_s'][n]:.2f}" for n in VARIANTS))
    print(f"∇W statistic: {res['gradient_share_of_bare']:.3f}× the bare pass (per repeat {lo:.3f}–{hi:.3f}; "
          f"target ≤ {res['target_share']}); autograd's ∇W: {res['autograd_share_of_bare']:.3f}× "
          f"({alo:.3f}–{ahi:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
