"""The measured choice of ``backend="auto"`` (fisherlora/ops/table.py, docs/DESIGN.md §11)."""

import json

import pytest
import torch

from fisherlora import ops
from fisherlora.ops import dispatch, table


def _bench(*rows):
    """pytest-benchmark JSON as bench/test_bench_ops.py writes it."""
    return {"benchmarks": [{"group": "g", "extra_info": dict(zip(("op", "provider", "d", "layout", "median_s"), r),
                                                             device="cuda:0")} for r in rows]}


BENCH = _bench(
    ("syrk_accumulate_", "naive", 1024, "dense", 1.0), ("syrk_accumulate_", "triton", 1024, "dense", 0.5),
    ("syrk_accumulate_", "ext", 1024, "dense", 0.4),
    ("syrk_accumulate_", "naive", 14336, "dense", 1.0), ("syrk_accumulate_", "triton", 14336, "dense", 0.6),
    ("syrk_accumulate_", "ext", 14336, "dense", 1.2),
    ("fisher_energy", "naive", 1024, "dense", 1.0), ("fisher_energy", "triton", 1024, "dense", 2.0),
    ("fisher_energy", "ext", 1024, "dense", 1.5),
    ("syrk_accumulate_", "triton", 4096, "packed", 0.3), ("syrk_accumulate_", "ext", 4096, "packed", 0.2),
    ("projected_sq_accumulate_", "triton", 4096, "dense", None),  # a skipped benchmark: no median
)


@pytest.fixture
def fresh_table(monkeypatch, tmp_path):
    """Point FISHERLORA_DISPATCH_TABLE at a file and forget the cached table around the test."""
    def use(data):
        path = tmp_path / "table.json"
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        monkeypatch.setenv(table.ENV, str(path))
        table.load.cache_clear()
        dispatch._choose.cache_clear()
        return path
    yield use
    table.load.cache_clear()
    dispatch._choose.cache_clear()


def test_from_benchmark_keeps_medians_per_device_op_shape_and_layout():
    t = table.from_benchmark(BENCH)
    rows = t["cuda"]["syrk_accumulate_"]
    assert [(r["layout"], r["d"]) for r in rows] == [("dense", 1024), ("dense", 14336), ("packed", 4096)]
    assert rows[0]["seconds"] == {"naive": 1.0, "triton": 0.5, "ext": 0.4}
    assert "projected_sq_accumulate_" not in t["cuda"]


@pytest.mark.parametrize("d, available, layout, want", [
    (1024, ("triton", "ext", "torch"), "dense", "ext"),      # the fastest
    (800, ("triton", "ext", "torch"), "dense", "ext"),       # nearest measured d on a log scale
    (1024, ("triton", "torch"), "dense", "triton"),          # a measured backend missing here is skipped
    (16384, ("triton", "ext", "torch"), "dense", "triton"),  # ext is slower than naive at 14336
    (16384, ("ext", "torch"), "dense", "torch"),             # nothing measured beats naive: the reference
    (4096, ("triton", "ext", "torch"), "packed", "ext"),     # rows without naive: fastest measured
    (1024, ("triton", "ext", "torch"), "packed", "ext"),     # the only packed row, whatever its d
])
def test_choose_picks_the_fastest_backend_not_slower_than_naive(d, available, layout, want):
    t = table.from_benchmark(BENCH)
    assert table.choose("syrk_accumulate_", "cuda", d, layout, available, t) == want


def test_choose_never_picks_a_backend_measured_slower_than_naive():
    t = table.from_benchmark(BENCH)
    for d in (1, 64, 1024, 3000, 5000, 14336, 100000):
        for available in (("triton", "ext", "torch"), ("ext", "torch"), ("triton", "torch"), ("torch",)):
            for op in ("syrk_accumulate_", "fisher_energy"):
                name = table.choose(op, "cuda", d, "dense", available, t)
                dense = [r for r in t["cuda"][op] if r["layout"] == "dense"]
                row = min(dense, key=lambda r: (abs(torch.tensor(r["d"] / d).log().item()), -r["d"]))
                assert name == "torch" or row["seconds"][name] <= row["seconds"]["naive"], (op, d, available, name)
    assert table.choose("fisher_energy", "cuda", 1024, "dense", ("triton", "ext", "torch"), t) == "torch"


def test_a_log_scale_tie_goes_to_the_larger_width():
    t = {"cuda": {"fisher_energy": [{"d": 1000, "seconds": {"naive": 1, "triton": 0.5}},
                                    {"d": 4000, "seconds": {"naive": 1, "ext": 0.5}}]}}
    assert table.choose("fisher_energy", "cuda", 2000, "dense", ("triton", "ext"), t) == "ext"


def test_without_a_row_the_fixed_order_applies():
    t = table.from_benchmark(BENCH)
    assert table.choose("projected_sq_accumulate_", "cuda", 4096, "dense", ("triton",), t) is None
    assert table.choose("syrk_accumulate_", "cpu", 4096, "dense", ("ext",), t) is None
    assert table.choose("syrk_accumulate_", "cuda", 4096, "dense", ("ext",), {}) is None


def test_auto_follows_a_table_named_by_the_environment(fresh_table):
    x = torch.randn(2, 5, 48)
    acc = torch.zeros(48, 48)
    # no table: the fixed order (ext first on a CPU)
    fresh_table({})
    first = ops.available_backends("cpu")[0]
    assert dispatch.resolve("syrk_accumulate_", "auto", x.device, (acc, x, None, 1.0))[0] == first
    # a CPU table where the reference is measured fastest, given as benchmark JSON
    fresh_table({"benchmarks": [
        {"extra_info": {"op": "syrk_accumulate_", "provider": p, "d": 48, "layout": "dense", "median_s": t,
                        "device": "cpu"}} for p, t in (("naive", 1.0), ("torch", 0.5), ("ext", 2.0))]})
    assert dispatch.resolve("syrk_accumulate_", "auto", x.device, (acc, x, None, 1.0))[0] == "torch"
    assert dispatch.resolve("syrk_accumulate_", "auto", x.device)[0] == first  # no shape: the fixed order
    out = ops.syrk_accumulate_(acc, x)
    ref = x.reshape(-1, 48).double().T @ x.reshape(-1, 48).double()
    torch.testing.assert_close(ops.symmetrize_(out).double(), ref, rtol=1e-5, atol=1e-5)


def test_an_unreadable_table_is_refused_by_name(fresh_table):
    path = fresh_table("{not json")
    with pytest.raises(ValueError, match="table.json"):
        table.load()
    assert str(path).endswith("table.json")


def test_the_gradient_op_is_keyed_by_its_geometric_width_and_orientation():
    g, a = torch.zeros(3, 1024), torch.zeros(3, 4096)
    assert table.shape_key("gradient_accumulate_", (torch.zeros(1024, 4096), g, a, None, 1.0, False)) == (2048, "dense")
    assert table.shape_key("gradient_accumulate_", (torch.zeros(4096, 1024), g, a, None, 1.0, True)) == (
        2048, "transposed")
    t = {"cuda": {"gradient_accumulate_": [{"d": 2048, "layout": "dense", "seconds": {"naive": 1.0, "ext": 0.5}}]}}
    assert table.choose("gradient_accumulate_", "cuda", 2000, "dense", ("triton", "ext", "torch"), t) == "ext"
    assert table.choose("gradient_accumulate_", "cuda", 2000, "transposed", ("ext", "torch"), t) is None


def test_auto_follows_the_table_for_the_gradient_op_per_orientation(fresh_table):
    """The bench's rows (d = table.gradient_width) steer the gradient op; the transposed layout has
    its own rows, and without them the fixed order applies."""
    g, a = torch.randn(2, 5, 32), torch.randn(2, 5, 72)
    d = table.gradient_width(32, 72)
    assert d == 48
    fresh_table({"benchmarks": [
        {"extra_info": {"op": "gradient_accumulate_", "provider": p, "d": d, "layout": "dense", "median_s": t,
                        "device": "cpu"}} for p, t in (("naive", 1.0), ("torch", 0.5), ("ext", 2.0))]})
    acc = torch.zeros(32, 72)
    assert dispatch.resolve("gradient_accumulate_", "auto", g.device, (acc, g, a, None, 1.0, False))[0] == "torch"
    first = ops.available_backends("cpu", "gradient_accumulate_")[0]
    accT = torch.zeros(72, 32)
    assert dispatch.resolve("gradient_accumulate_", "auto", g.device, (accT, g, a, None, 1.0, True))[0] == first
    ops.gradient_accumulate_(accT, g, a, transpose=True)
    ref = a.reshape(-1, 72).double().T @ g.reshape(-1, 32).double()
    torch.testing.assert_close(accT.double(), ref, rtol=1e-5, atol=1e-5)
