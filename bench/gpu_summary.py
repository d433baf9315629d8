"""Markdown summary of one ``bench/gpu_check.sh`` run (or of any folder holding its result files).

Reads, where present: ``ops.json`` (pytest-benchmark JSON of ``bench/test_bench_ops.py``),
``svd/svd_paths.json`` (``bench/svd_paths.py``) and ``init_*.json`` (``bench/gpu_init.py``), and
prints one table each: ops side by side with the naive path (median time, ratio, TFLOP/s, peak
extra memory), SVD solvers per shape, and the whole-init runs (time per phase, allocator peak
against the plan's prediction).

    python -m bench.gpu_summary bench/out/gpu/work
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MiB = 1 << 20


def ops_table(path: Path) -> list[str]:
    """One row per (op, shape, provider); ``× naive`` is naive's median over this provider's (>1: faster)."""
    rows = [b["extra_info"] | {"group": b["group"]} for b in json.loads(path.read_text())["benchmarks"]]
    naive = {r["group"]: r["median_s"] for r in rows if r["provider"] == "naive" and r.get("median_s")}
    lines = ["| op shape | provider | median ms | × naive | TFLOP/s | peak extra MiB |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["group"], r["provider"] != "naive", r["provider"])):
        median = r.get("median_s")
        if median is None:
            continue
        base = naive.get(r["group"])
        speedup = f"{base / median:.2f}" if base else "n/a"
        peak = r.get("peak_mem_bytes")
        lines.append(f"| {r['group']} | {r['provider']} | {median * 1e3:.2f} | {speedup} | "
                     f"{(r.get('tflops') or 0):.1f} | {'n/a' if peak is None else f'{peak / MiB:.0f}'} |")
    return lines


def svd_table(path: Path) -> list[str]:
    rows = json.loads(path.read_text())["rows"]
    lines = ["| shape | path | s per matrix | × batched | residual | orthogonality loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = next((x["median_s"] for x in rows if x["shape"] == r["shape"] and x["path"] == "batched"), None)
        ratio = f"{r['median_s'] / base:.2f}" if base else "n/a"
        lines.append(f"| {r['shape']} | {r['path']} | {r['median_s'] / r['n']:.3f} | {ratio} | "
                     f"{r['residual']:.1e} | {r['orthogonality_loss']:.1e} |")
    return lines


def init_table(paths: list[Path]) -> list[str]:
    lines = ["| run | mode | layers | tokens | total s | collect s | svd s | initialize s | peak MiB | planned MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = json.loads(path.read_text())
        t = r["timings_s"]
        planned = (r.get("planned") or {}).get("total")
        lines.append(
            f"| {path.stem} | {r['memory_mode']} g={r['layer_groups']} | {r.get('num_layers_built', '?')} | "
            f"{r['tokens']} | {r['total_s']:.1f} | {t.get('collect', 0):.1f} | {t.get('svd', 0):.1f} | "
            f"{t.get('initialize', 0):.1f} | {r['peak_mb']:.0f} | "
            f"{'n/a' if planned is None else f'{planned / MiB:.0f}'} |")
        if r.get("warmup_s") is not None or r.get("kernel_compiles_in_timed_run") is not None:
            compiles = r.get("kernel_compiles_in_timed_run")
            lines.append(f"|  | warm-up {r.get('warmup_s') or 0:.1f} s (1 layer, 1 batch); Triton compiles in the "
                         f"timed run: {'n/a' if compiles is None else sum(compiles.values())} | | | | | | | | |")
        per_shape = r.get("svd_seconds_per_shape") or {}
        if per_shape:
            lines.append("|  | SVD s per shape: " + ", ".join(f"{k} {v:.2f}" for k, v in per_shape.items())
                         + " | | | | | | | | |")
    return lines


def summary(folder: Path) -> str:
    parts = []
    if (folder / "ops.json").exists():
        parts += ["### Curvature ops", "", *ops_table(folder / "ops.json"), ""]
    if (folder / "svd" / "svd_paths.json").exists():
        parts += ["### SVD solvers", "", *svd_table(folder / "svd" / "svd_paths.json"), ""]
    inits = sorted(folder.glob("init_*.json"))
    if inits:
        parts += ["### Whole init (random weights)", "", *init_table(inits), ""]
    methods = folder / "init_1b_methods" / "init_methods.md"
    if methods.exists():  # bench/init_methods.py's own table of the side-by-side run
        parts += ["### Whole init side by side (bench/init_methods.py)", "", methods.read_text(), ""]
    return "\n".join(parts) if parts else f"no results in {folder}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="the folder holding ops.json, svd/ and init_*.json")
    args = p.parse_args(argv)
    print(summary(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
