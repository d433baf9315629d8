"""fisherlora on 1, 2 and 4 processes side by side (torch.distributed, docs/DESIGN.md §7).

Each world size runs in its own group of freshly spawned ranks (gloo on the CPU, one thread per
rank; ``--backend nccl`` puts rank r on ``cuda:r``), on the same random-weight Llama and the
same calibration batches. Reported per world size and rank: wall time per phase (``collect``,
``svd``, ``decompose``, ``initialize``, as ``FisherLoraResult.timings``), the payload bytes the
rank sent into reductions and broadcasts, the number of collectives, and the rank's memory in
use before the job and its peak during it, in MiB (RSS on the CPU, the CUDA allocator on a GPU).

``--sharding none,fsdp2`` also runs each world size on the same model sharded with FSDP2
(``fully_shard`` per decoder layer and the root), side by side with the unsharded run: the
rank's parameter bytes (its shard), the peak of whole weights gathered at once
(``fisherlora.sharded.METER``) and the peak memory show what each rank holds.

``--scaling weak`` (default) gives every rank ``--num-samples`` sequences (the whole set grows
with the world size; the issue's target: 2 ranks over twice the data within 1.15x the wall time
of 1 rank); ``--scaling strong`` splits one set of ``--num-samples``. Figures go into
bench/RESULTS.md, taken on an idle machine.

    python -m bench.distributed [--out bench/out/distributed] [--worlds 1,2,4] [--quick] [--backend nccl]
                                [--sharding none,fsdp2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

DEFAULT = dict(hidden=1024, intermediate=3584, layers=8, vocab=32000, heads=16, kv_heads=4,
               num_samples=32, max_length=256, batch_size=4, rank=16)
QUICK = dict(hidden=32, intermediate=64, layers=2, vocab=200, heads=4, kv_heads=2,
             num_samples=4, max_length=32, batch_size=2, rank=4)


def _rank_main(rank: int, world: int, sizes: dict, backend: str, memory_mode: str, rendezvous: str, out: str,
               sharding: str = "none"):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        row = _rank_job(rank, world, sizes, backend, memory_mode, sharding)
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def _rank_job(rank: int, world: int, sizes: dict, backend: str, memory_mode: str, sharding: str = "none") -> dict:
    from bench import common
    from fisherlora import FisherLoraConfig, initialize_fisher_lora, sharded

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, _, batches = common.random_llama_setup(
        sizes["num_samples"], sizes["max_length"], sizes["batch_size"], vocab=sizes["vocab"], hidden=sizes["hidden"],
        intermediate=sizes["intermediate"], layers=sizes["layers"], heads=sizes["heads"], kv_heads=sizes["kv_heads"])
    model.to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    if sharding == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    params_mb = sum(sharded.local(p).numel() * p.element_size() for p in model.parameters()) / 2**20
    sharded.METER.reset()
    cfg = FisherLoraConfig(rank=sizes["rank"], alpha=sizes["rank"], memory_mode=memory_mode)
    base = common.memory_mark(device)
    t0 = time.perf_counter()
    res = initialize_fisher_lora(model, None, batches, cfg, progress=False, keep_statistics=False)
    common.synchronize(device)
    wall = time.perf_counter() - t0
    ctx = res.process_group
    return {"world": world, "rank": rank, "wall_s": wall, "timings_s": dict(res.timings),
            "bytes_reduced": ctx.bytes_reduced, "bytes_broadcast": ctx.bytes_broadcast,
            "collectives": ctx.collectives, "peak_mb": common.memory_peak(device), "base_mb": base,
            "sequences": res.statistics.info["calibration"]["sequences"],
            "memory_mode": res.extra["memory_mode"], "sharding": sharding, "params_mb": params_mb,
            "gathered_peak_mb": sharded.METER.peak / 2**20}


def run_world(world: int, sizes: dict, backend: str, memory_mode: str, timeout: float = 3600.0,
              sharding: str = "none") -> list[dict]:
    """All ranks of one world size, freshly spawned; their rows in rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="fisherlora-bench-dist-") as tmp:
        ctx = mp.start_processes(_rank_main, args=(world, sizes, backend, memory_mode, f"{tmp}/pg", tmp, sharding),
                                 nprocs=world, join=False, start_method="spawn")
        end = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > end:
                    raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv=None) -> int:
    from bench import common

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out/distributed")
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--scaling", default="weak", choices=["weak", "strong"])
    p.add_argument("--memory-mode", default="full", choices=["full", "packed", "projected"])
    p.add_argument("--sharding", default="none",
                   help="comma list of 'none' (every rank holds the model) and 'fsdp2' (fully_shard), side by side")
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds): the smoke test")
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick or common.quick() else DEFAULT)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    shardings = [x.strip() for x in args.sharding.split(",")]
    bad = [x for x in shardings if x not in ("none", "fsdp2")]
    if bad:
        p.error(f"--sharding: {bad} is not 'none' or 'fsdp2'")
    for world in (int(w) for w in args.worlds.split(",")):
        s = dict(sizes, num_samples=sizes["num_samples"] * (world if args.scaling == "weak" else 1))
        for how in shardings:
            rows += run_world(world, s, args.backend, args.memory_mode, sharding=how)
    (out / "distributed.json").write_text(json.dumps(
        {"sizes": sizes, "backend": args.backend, "scaling": args.scaling, "threads_per_rank": 1,
         "cpu_count": os.cpu_count(), "rows": rows}, indent=1))
    phases = ("collect", "svd", "decompose", "initialize")
    table = [[r["world"], r["sharding"], r["rank"], r["sequences"], f"{r['wall_s']:.2f}",
              *(f"{r['timings_s'].get(k, 0.0):.2f}" for k in phases),
              f"{(r['bytes_reduced'] + r['bytes_broadcast']) / 2**20:.2f}", r["collectives"],
              f"{r['params_mb']:.1f}", f"{r['gathered_peak_mb']:.2f}",
              *("" if r[k] is None else f"{r[k]:.0f}" for k in ("base_mb", "peak_mb"))] for r in rows]
    print(common.write_markdown_table(out / "distributed.md", [
        "ranks", "sharding", "rank", "sequences", "wall s", *(f"{k} s" for k in phases), "sent MiB", "collectives",
        "weights held MiB", "gathered peak MiB", "memory before MiB", "peak MiB"], table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
