"""Side-by-side CPU check of the compiled backend's syrk_accumulate_ against the naive path.

Issue 4's performance target: at d=2048, 4096 tokens with half of them masked, bf16 input,
``syrk_accumulate_(backend="ext")`` is at least 1.5x faster than the naive
``x[mask].float().T @ x[mask].float()`` and needs less peak extra memory (no (T, d) fp32 copy).
Both run in the same process, interleaved, on the same inputs; time is the median of wall-clock
repeats (CPU ops are synchronous). Peak extra memory is measured for each provider in a fresh
child process (freed memory that the allocator keeps would hide it in a warm one): the rise of
the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the
resident size before one call, inputs already built.

    python bench/ext_cpu_check.py [--json bench/out/ext_cpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from fisherlora import ops


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(fn) -> float:
    """Peak resident memory above the level before ``fn()``, in MiB (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def make_inputs(d: int, T: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[torch.randperm(T, generator=g)[: T // 2]] = True
    x = torch.empty(T, d, dtype=dtype)
    for t0 in range(0, T, 256):  # filled in slices: no (T, d) fp32 temporary at setup
        x[t0:t0 + 256] = torch.randn(min(256, T - t0), d, generator=g)
    return x, mask


def make_providers(x, mask, d):
    acc_naive, acc_ext = torch.zeros(d, d), torch.zeros(d, d)

    def naive():
        xm = x[mask].float()
        acc_naive.add_(xm.T @ xm)

    def ext():
        ops.syrk_accumulate_(acc_ext, x, mask, backend="ext")

    return {"naive": naive, "ext": ext}, acc_naive, acc_ext


def child_memory(provider: str, d: int, T: int, dtype: str) -> float:
    """Peak extra MiB of one call of ``provider``, measured in a fresh interpreter."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", provider, "--dtype", dtype,
                          "--d", str(d), "--tokens", str(T)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="bench/out/ext_cpu_check.json")
    parser.add_argument("--memory-of", choices=("naive", "ext"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args()

    d, T = args.d, args.tokens
    if args.memory_of:  # child: one call, fresh process
        x, mask = make_inputs(d, T, getattr(torch, args.dtype))
        providers, _, _ = make_providers(x, mask, d)
        ops.syrk_accumulate_(torch.zeros(4, 4), torch.randn(3, 4), backend="ext")  # load the extension
        print(peak_extra_mib(providers[args.memory_of]))
        return

    results = {"d": d, "tokens": T, "masked_fraction": 0.5, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cases": []}
    for dtype in (torch.bfloat16, torch.float32):
        x, mask = make_inputs(d, T, dtype)
        providers, acc_naive, acc_ext = make_providers(x, mask, d)
        for fn in providers.values():  # warm-up (thread pools, allocator)
            fn()
        times = {name: [] for name in providers}
        for _ in range(args.repeats):
            for name, fn in providers.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        dname = str(dtype).removeprefix("torch.")
        mem = {name: child_memory(name, d, T, dname) for name in providers}
        # same result (upper triangle) after the same number of calls
        err = (acc_ext - acc_naive).triu().abs().max().item() / acc_naive.abs().max().item()
        med = {name: statistics.median(v) for name, v in times.items()}
        case = {
            "dtype": dname,
            "median_ms": {k: 1e3 * v for k, v in med.items()},
            "peak_extra_mib": mem,
            "speedup_ext_vs_naive": med["naive"] / med["ext"],
            "max_rel_diff_upper": err,
        }
        results["cases"].append(case)
        ms = case["median_ms"]
        print(f"{dname:>8}: naive {ms['naive']:.1f} ms, ext {ms['ext']:.1f} ms -> ext "
              f"{case['speedup_ext_vs_naive']:.2f}x faster; peak extra memory naive {mem['naive']:.1f} MiB, "
              f"ext {mem['ext']:.1f} MiB; max rel diff {err:.1e}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print("wrote", args.json)


if __name__ == "__main__":
    main()
