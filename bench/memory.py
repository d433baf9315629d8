"""Peak memory and wall time of each memory mode against the naive baseline, side by side.

Every mode runs in a fresh subprocess on the same random-weight Llama and the same calibration
batches, so that one mode's peak cannot hide another's. Reported per mode: wall time of the
whole initialisation (statistics, SVD, selection, writing the adapter), the process's peak RSS
(CPU) or CUDA allocator peak (GPU), and the peak beyond what was resident before the run
(model and data), with ratios to the naive baseline (memory) and to ``full`` (time).

Defaults (issue 5): hidden 1024, intermediate 3584, 8 layers, vocab 32000, 32 sequences × 256
tokens, r = 16, all seven projections. Targets: ``projected`` with 2 layer groups at most 0.35
of the naive baseline's peak, wall time at most 1.5× ``full``'s.

    python -m bench.memory [--out bench/out/memory] [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = [("naive", 1), ("full", 1), ("packed", 1), ("projected", 1), ("projected", 2)]
DEFAULT = dict(hidden=1024, intermediate=3584, layers=8, vocab=32000, heads=16, kv_heads=4,
               num_samples=32, max_length=256, batch_size=4, rank=16)
QUICK = dict(hidden=32, intermediate=64, layers=2, vocab=200, heads=4, kv_heads=2,
             num_samples=8, max_length=32, batch_size=4, rank=4)


def worker(mode: str, groups: int, sizes: dict, device: str) -> dict:
    """One mode in this process: build, mark memory, initialise, measure."""
    from bench import common
    from bench.naive import naive_select, naive_statistics
    from fisherlora import FisherLoraConfig, find_target_modules, initialize_fisher_lora

    dev = torch.device(device)
    model, _, batches = common.random_llama_setup(
        sizes["num_samples"], sizes["max_length"], sizes["batch_size"], vocab=sizes["vocab"],
        hidden=sizes["hidden"], intermediate=sizes["intermediate"], layers=sizes["layers"],
        heads=sizes["heads"], kv_heads=sizes["kv_heads"])
    model.to(dev)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    cfg = FisherLoraConfig(rank=sizes["rank"], alpha=sizes["rank"], memory_mode="full" if mode == "naive" else mode,
                           layer_groups=groups)
    base = common.memory_mark(dev)
    t0 = time.perf_counter()
    if mode == "naive":
        modules = find_target_modules(model, cfg.to_lora_config())
        naive_select(model, modules, naive_statistics(model, modules, batches), sizes["rank"])
    else:
        initialize_fisher_lora(model, None, batches, cfg, progress=False, keep_statistics=False)
    common.synchronize(dev)
    wall = time.perf_counter() - t0
    peak = common.memory_peak(dev)
    return {"mode": mode, "layer_groups": groups, "wall_s": wall, "peak_mb": peak, "base_mb": base,
            "beyond_model_mb": None if peak is None or base is None else peak - base,
            "tokens": common.batch_tokens(batches)}


def main(argv=None) -> int:
    from bench import common

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/out/memory", help="folder for memory.json and memory.md")
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds), for smoke tests")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "GROUPS"), help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = json.loads(args.sizes) if args.sizes else (QUICK if args.quick else DEFAULT)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], int(args.worker[1]), sizes, args.device)))
        return 0
    rows = []
    for mode, groups in MODES:
        cmd = [sys.executable, "-m", "bench.memory", "--worker", mode, str(groups), "--sizes", json.dumps(sizes),
               "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"{mode}/{groups} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(f"{mode:>9} g={groups}: {rows[-1]['wall_s']:.1f} s, peak {rows[-1]['peak_mb']:.0f} MiB", flush=True)
    naive = rows[0]
    full = next(r for r in rows if r["mode"] == "full")
    for r in rows:
        r["peak_vs_naive"] = r["peak_mb"] / naive["peak_mb"]
        r["beyond_model_vs_naive"] = r["beyond_model_mb"] / naive["beyond_model_mb"]
        r["time_vs_full"] = r["wall_s"] / full["wall_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"sizes": sizes, "device": args.device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (out / "memory.json").write_text(json.dumps(meta, indent=1))
    header = ["mode", "layer groups", "wall s", "× full", "peak MiB", "× naive", "beyond model MiB", "× naive"]
    table = [[r["mode"], r["layer_groups"], f"{r['wall_s']:.1f}", f"{r['time_vs_full']:.2f}", f"{r['peak_mb']:.0f}",
              f"{r['peak_vs_naive']:.2f}", f"{r['beyond_model_mb']:.0f}", f"{r['beyond_model_vs_naive']:.2f}"]
             for r in rows]
    print(common.write_markdown_table(out / "memory.md", header, table), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
