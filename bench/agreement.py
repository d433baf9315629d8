"""The cost of the agreement every distributed run makes before its passes (issue 30,
docs/DESIGN.md §7): the digest of every parameter and buffer of the model, of the whole
calibration set and of the configuration, and the size of what one rank sends to the others.

Single process: the digests are what each rank computes alone; the exchange is one
``all_gather_object`` of the payload measured here. Writes JSON (and prints it).

example:
  python -m bench.agreement                      # the embedded SmolLM2-135M, 128 x 512 tokens
  python -m bench.agreement --quick              # a tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from pathlib import Path

import torch


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> dict:
    from fisherlora import FisherLoraConfig, digest
    from fisherlora.heads import default_lora_config, resolve_head

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a model fisherlora.models can load (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="the median of this many runs is reported")
    p.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 x 32 tokens (a smoke run)")
    p.add_argument("--output", default="bench/out/agreement.json")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    if args.quick:
        from fisherlora.testing import random_llama

        model, name = random_llama(dtype=dtype), "random tiny Llama"
        args.num_samples, args.max_length, args.batch_size = 8, 32, 4
    else:
        from fisherlora.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(args.model, dtype=dtype)
        name = args.model
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = []  # the bytes are what a digest reads: random tokens of the calibration set's sizes
    for i in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - i)
        ids = torch.randint(vocab, (n, args.max_length), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    config = FisherLoraConfig()
    lora_config = default_lora_config(config, resolve_head(model), model)
    load_before = os.getloadavg()
    model_s, model_digest = _timed(lambda: digest.model_digest(model), args.repeats)
    data_s, _ = _timed(lambda: digest.data_digest(batches), args.repeats)
    config_s, _ = _timed(lambda: digest.config_items(config, lora_config), args.repeats)
    payload = digest.run_digest(model, config, lora_config, batches)
    tensors = [*model.parameters(), *model.buffers()]
    out = {
        "model": name, "dtype": args.dtype,
        "tensors": len(model_digest["tensors"]),
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "data": f"{args.num_samples} x {args.max_length} tokens",
        "data_bytes": sum(v.numel() * v.element_size() for b in batches for v in b.values()),
        "model_digest_s": round(model_s, 4), "data_digest_s": round(data_s, 4), "config_s": round(config_s, 5),
        "total_s": round(model_s + data_s + config_s, 4),
        "payload_bytes_per_rank": len(pickle.dumps((None, payload))),
        "repeats": args.repeats, "hash_threads": digest.THREADS, "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    out["model_GB_per_s"] = round(out["model_bytes"] / model_s / 1e9, 2)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
