"""bench/distributed.py runs end to end at toy size (2 spawned gloo ranks, unsharded and FSDP2)."""

import json

from bench import distributed


def test_distributed_benchmark_runs_at_toy_size(tmp_path):
    assert distributed.main(["--quick", "--worlds", "2", "--sharding", "none,fsdp2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "distributed.json").read_text())
    rows = doc["rows"]
    assert [(r["world"], r["sharding"], r["rank"]) for r in rows] == [
        (2, "none", 0), (2, "none", 1), (2, "fsdp2", 0), (2, "fsdp2", 1)]
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_mb"] > 0 and r["collectives"] > 0
        assert r["bytes_reduced"] > 0 and r["sequences"] == 2 * doc["sizes"]["num_samples"]  # weak scaling
        assert {"collect", "decompose", "initialize"} <= set(r["timings_s"])
    assert sum(r["bytes_broadcast"] for r in rows) > 0  # each rank owns some decompositions
    whole, shard = rows[0], rows[2]
    assert whole["gathered_peak_mb"] == 0 and shard["gathered_peak_mb"] > 0
    assert shard["params_mb"] < 0.6 * whole["params_mb"]  # a rank holds about half the parameters
    assert (tmp_path / "distributed.md").read_text().count("\n") == len(rows) + 2
