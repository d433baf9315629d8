"""The naive baseline: Fisher-guided LoRA selection as a user would first write it in PyTorch.

Kept forever as the comparison point for speed, memory and correctness (issue 2, item 7):

- one dense float32 ``A`` and ``G`` per module (no sharing between q/k/v or gate/up);
- ``register_forward_hook`` for ``A`` and ``register_full_backward_hook`` for ``G``;
- weight gradients enabled (a plain ``loss.backward()`` on a model with trainable weights);
- masked rows copied out (``x[mask].float()``) before ``xᵀx``;
- the energy as ``(Uᵀ G U).diagonal() * (Vᵀ A V).diagonal()`` with the full ``(k, k)`` products.

It follows the same conventions as fisherlora (sum-reduced next-token loss on label tokens,
padding excluded, factors normalised by the counted tokens) so that both choose the same
directions; ``tests/test_naive.py`` checks that they do.

Run: ``python -m bench.naive --num-samples 32 --max-length 256`` (embedded SmolLM2 and GSM8K).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def naive_statistics(model: nn.Module, modules: dict[str, nn.Module], batches) -> dict[str, dict]:
    """Per-module dense ``A``, ``G`` (float32 or the model's float64) from module hooks."""
    stats = {n: {"A": 0.0, "G": 0.0, "n": 0} for n in modules}
    current_mask = {}

    def fwd(name, module, args, output):
        x = args[0].detach()
        m = current_mask["mask"]
        rows = x[m.bool()].float() if x.dtype != torch.float64 else x[m.bool()]
        stats[name]["A"] = stats[name]["A"] + rows.T @ rows
        stats[name]["n"] += rows.shape[0]

    def bwd(name, module, grad_input, grad_output):
        g = grad_output[0].detach()
        m = current_mask["mask"]
        rows = g[m.bool()].float() if g.dtype != torch.float64 else g[m.bool()]
        stats[name]["G"] = stats[name]["G"] + rows.T @ rows

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(lambda mod, a, o, n=name: fwd(n, mod, a, o)))
        handles.append(module.register_full_backward_hook(lambda mod, gi, go, n=name: bwd(n, mod, gi, go)))
    try:
        model.requires_grad_(True)
        for batch in batches:
            mask = batch["attention_mask"]
            current_mask["mask"] = mask
            logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
            labels = batch["labels"][:, 1:]
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).to(
                torch.promote_types(logits.dtype, torch.float32)), labels.reshape(-1), ignore_index=-100,
                reduction="sum")
            loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        s["A"] = s["A"] / s["n"]
        s["G"] = s["G"] / s["n"]
    return stats


def naive_select(model: nn.Module, modules: dict[str, nn.Module], stats: dict, rank: int) -> dict[str, torch.Tensor]:
    """Indices of the ``rank`` directions of largest Fisher energy, per module (score order)."""
    chosen = {}
    for name, module in modules.items():
        W = module.weight.detach().float()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        A, G = stats[name]["A"].to(W.dtype), stats[name]["G"].to(W.dtype)
        e = (U.T @ G @ U).diagonal() * (Vh @ A @ Vh.T).diagonal()
        chosen[name] = torch.argsort(e, descending=True)[:rank]
    return chosen


def main(argv=None) -> int:
    from bench import common
    from fisherlora.config import FisherLoraConfig
    from fisherlora.layers import find_target_modules

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_flags(p, **common.CPU_SIZES)
    p.add_argument("--json", default=None, help="write timings and peak memory here")
    args = p.parse_args(argv)
    model, tok, batches = common.embedded_setup(args.num_samples, args.max_length, args.batch_size)
    modules = find_target_modules(model, FisherLoraConfig(rank=args.rank).to_lora_config())
    t0 = time.perf_counter()
    stats = naive_statistics(model, modules, batches)
    t1 = time.perf_counter()
    naive_select(model, modules, stats, args.rank)
    t2 = time.perf_counter()
    stat_mb = sum((s["A"].numel() + s["G"].numel()) * 4 for s in stats.values()) / 2**20
    result = {"collect_s": t1 - t0, "select_s": t2 - t1, "statistics_mb": stat_mb,
              "peak_rss_mb": common.peak_rss_mb()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
