"""The measured choice of ``backend="auto"``, per op and shape (docs/DESIGN.md §11).

A *table* holds, per device type and op, measured rows: the op's width ``d`` (``x.shape[-1]``,
``Q.shape[0]`` for ``fisher_energy``, the geometric mean ``round(√(d_out·d_in))`` for
``gradient_accumulate_``), the accumulator's or ``M``'s layout (``"dense"`` or ``"packed"``;
``"dense"`` or ``"transposed"`` for ``gradient_accumulate_``) and the median seconds of each
provider, the naive PyTorch path included::

    {"cuda": {"syrk_accumulate_": [{"d": 4096, "layout": "dense",
                                    "seconds": {"naive": 0.011, "triton": 0.006, "ext": 0.004}}]}}

:func:`from_benchmark` builds one from the pytest-benchmark JSON of ``bench/test_bench_ops.py``.
The table in use is read once per process from the file named by ``FISHERLORA_DISPATCH_TABLE``
(a table or a benchmark JSON), else from ``dispatch_table.json`` beside this module when it
exists; without either, ``auto`` keeps the fixed order of :data:`fisherlora.ops.dispatch.AUTO_ORDER`.

The rule (:func:`choose`): take the measured row of the same layout whose ``d`` is nearest on a
log scale (a tie goes to the larger ``d``); among the backends available here that were measured
there, keep those not slower than naive and pick the fastest. When none is, pick ``"torch"``, the
reference, which computes what the naive path computes. An op, device or layout without a
measured row gets the fixed order. So ``auto`` never picks a backend that was measured slower than
the naive path at the nearest measured shape.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

__all__ = ["from_benchmark", "load", "choose", "shape_key", "gradient_width", "TABLE_FILE", "ENV"]

ENV = "FISHERLORA_DISPATCH_TABLE"
TABLE_FILE = Path(__file__).with_name("dispatch_table.json")
NAIVE = "naive"


def from_benchmark(data: dict) -> dict:
    """A table from pytest-benchmark JSON (``bench/test_bench_ops.py``'s ``extra_info``: ``op``,
    ``provider``, ``d``, ``layout``, ``device`` and ``median_s``). Rows without a median
    (skipped or failed benchmarks) are left out; repeated providers keep the fastest."""
    table: dict = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median = info.get("median_s")
        if median is None or "op" not in info or "provider" not in info:
            continue
        device = torch.device(info.get("device", "cpu")).type
        layout = info.get("layout", "dense")
        rows = table.setdefault(device, {}).setdefault(info["op"], [])
        row = next((r for r in rows if r["d"] == info["d"] and r["layout"] == layout), None)
        if row is None:
            row = {"d": int(info["d"]), "layout": layout, "seconds": {}}
            rows.append(row)
        old = row["seconds"].get(info["provider"])
        row["seconds"][info["provider"]] = median if old is None else min(old, median)
    for ops in table.values():
        for rows in ops.values():
            rows.sort(key=lambda r: (r["layout"], r["d"]))
    return table


@functools.cache
def load() -> dict:
    """The table in use (empty without one); read once per process (see the module docstring).

    Raises:
        ValueError: the file is not valid JSON of either form (naming the file).
    """
    path = os.environ.get(ENV)
    path = Path(path) if path else (TABLE_FILE if TABLE_FILE.exists() else None)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"fisherlora: cannot read the dispatch table {str(path)!r}: {exc}") from exc
    if "benchmarks" in data:
        return from_benchmark(data)
    if not isinstance(data, dict):
        raise ValueError(f"fisherlora: the dispatch table {str(path)!r} is not a JSON object")
    return data


def gradient_width(d_out: int, d_in: int) -> int:
    """The ``d`` of a ``gradient_accumulate_`` row: ``round(√(d_out·d_in))`` (its work per token is
    ``d_out·d_in``, as a ``d``-wide square's)."""
    return max(1, round(math.sqrt(d_out * d_in)))


def shape_key(op: str, args: tuple) -> tuple[int, str]:
    """``(d, layout)`` of an op call's positional arguments (as :mod:`fisherlora.ops` passes them)."""
    if op == "fisher_energy":
        M, Q = args[0], args[1]
        return int(Q.shape[0]), "packed" if M.dim() == 1 else "dense"
    if op == "gradient_accumulate_":  # (acc, g, a, mask, scale, transpose)
        g, a = args[1], args[2]
        transpose = len(args) > 5 and bool(args[5])
        return gradient_width(int(g.shape[-1]), int(a.shape[-1])), "transposed" if transpose else "dense"
    acc, x = args[0], args[1]
    layout = "packed" if op == "syrk_accumulate_" and acc.dim() == 1 else "dense"
    return int(x.shape[-1]), layout


def choose(op: str, device_type: str, d: int, layout: str, available: tuple[str, ...],
           table: dict | None = None) -> str | None:
    """The backend the table picks among ``available``, or ``None`` when it has no row for this
    op, device type and layout (then the fixed order applies). See the module docstring."""
    rows = [r for r in (load() if table is None else table).get(device_type, {}).get(op, [])
            if r.get("layout", "dense") == layout and r.get("d", 0) > 0]
    if not rows:
        return None
    row = min(rows, key=lambda r: (abs(math.log(r["d"] / d)), -r["d"]))
    seconds = row["seconds"]
    naive = seconds.get(NAIVE)
    ok = [(t, name) for name, t in seconds.items()
          if name != NAIVE and name in available and t is not None and (naive is None or t <= naive)]
    if ok:
        return min(ok)[1]
    return "torch"
