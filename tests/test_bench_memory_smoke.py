"""bench/memory.py runs end to end at toy size (every mode in its own subprocess)."""

import json

from bench import memory


def test_memory_benchmark_runs_every_mode_at_toy_size(tmp_path):
    assert memory.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(r["mode"], r["layer_groups"]) for r in rows] == memory.MODES
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_mb"] > 0 and r["tokens"] > 0
    assert (tmp_path / "memory.md").read_text().count("\n") == len(rows) + 2
