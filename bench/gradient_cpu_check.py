"""Side-by-side CPU check of the compiled backend's gradient_accumulate_ against autograd's product.

The weight-gradient statistic of issue 31 (``∇W += gᵀa`` over the kept tokens) costs one product
per layer, as autograd's own weight gradient does. This times ``gradient_accumulate_(backend="ext")``
against that product on the kept rows (``g[mask].T @ a[mask]``, the rows gathered beforehand, so
the naive side is charged for the product only) at SmolLM2-135M's four weight shapes, one
calibration batch of the quality benchmark's size (4 × 256 tokens, 85 % kept, float32 as the
CPU runs; ``--padded`` keeps each sequence's prefix as a padded batch does, which the op reads in
place, where the default scattered mask makes it gather). Both run in the same process,
interleaved, on the same inputs; time is the median of wall-clock repeats.

    python -m bench.gradient_cpu_check [--json bench/runs/gradient_cost/gradient_op_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fisherlora import ops

#: (d_out, d_in) of SmolLM2-135M's projections: q/o, k/v, gate/up, down
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))


def make_mask(batch: int, tokens: int, padded: bool, gen: torch.Generator) -> torch.Tensor:
    """About 85 % of the tokens kept: scattered at random, or (``padded``) as the calibration
    batches keep them, each sequence a prefix (right padding) of a length drawn from 70-100 %."""
    if not padded:
        return torch.rand(batch, tokens, generator=gen) < 0.85
    lengths = (tokens * (0.7 + 0.3 * torch.rand(batch, generator=gen))).long().clamp(1, tokens)
    return torch.arange(tokens) < lengths[:, None]


def case(d_out: int, d_in: int, batch: int, tokens: int, repeats: int, padded: bool = False) -> dict:
    gen = torch.Generator().manual_seed(d_out * 7 + d_in)
    g, a = torch.randn(batch, tokens, d_out, generator=gen), torch.randn(batch, tokens, d_in, generator=gen)
    mask = make_mask(batch, tokens, padded, gen)
    kept_g, kept_a = g[mask], a[mask]
    acc_naive, acc_ext = torch.zeros(d_out, d_in), torch.zeros(d_out, d_in)
    providers = {"autograd_product": lambda: acc_naive.addmm_(kept_g.T, kept_a),
                 "ext": lambda: ops.gradient_accumulate_(acc_ext, g, a, mask, backend="ext")}
    for fn in providers.values():  # warm-up (thread pools, allocator)
        fn()
    times = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    err = (acc_ext - acc_naive).abs().max().item() / acc_naive.abs().max().item()
    return {"d_out": d_out, "d_in": d_in, "kept_tokens": int(mask.sum()),
            "median_ms": {k: 1e3 * v for k, v in med.items()},
            "ext_over_autograd": med["ext"] / med["autograd_product"], "max_rel_diff": err}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES),
                        help="comma list of d_outxd_in (default: SmolLM2-135M's)")
    parser.add_argument("--padded", action="store_true",
                        help="keep each sequence's prefix, as a padded calibration batch does (default: a "
                             "scattered 85 %% of the tokens, which the op must gather)")
    parser.add_argument("--json", default="bench/runs/gradient_cost/gradient_op_cpu.json")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = {"batch": args.batch, "tokens": args.tokens, "mask": "padded" if args.padded else "scattered",
               "threads": torch.get_num_threads(),
               "torch": torch.__version__, "load_avg": os.getloadavg()[0], "cases": []}
    for d_out, d_in in shapes:
        c = case(d_out, d_in, args.batch, args.tokens, args.repeats, args.padded)
        results["cases"].append(c)
        ms = c["median_ms"]
        print(f"{d_out:>5} x {d_in:<5}: autograd's product {ms['autograd_product']:.2f} ms, ext {ms['ext']:.2f} ms "
              f"-> ext {c['ext_over_autograd']:.2f}x its time; max rel diff {c['max_rel_diff']:.1e}")
    total = {k: sum(c["median_ms"][k] for c in results["cases"]) for k in ("autograd_product", "ext")}
    results["total_ms"], results["total_ext_over_autograd"] = total, total["ext"] / total["autograd_product"]
    print(f"all shapes: ext {results['total_ext_over_autograd']:.2f}x autograd's product")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
