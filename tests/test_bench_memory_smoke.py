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


def test_svd_paths_benchmark_runs_at_toy_size(tmp_path):
    from bench import svd_paths

    assert svd_paths.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "svd_paths.json").read_text())["rows"]
    by_path = {r["path"]: r for r in rows if r["shape"] == rows[0]["shape"]}
    assert set(by_path) == set(svd_paths.PATHS)
    # the float64 Gram path fisherlora uses on CPUs keeps the smallest directions; float32 Gram loses them
    assert by_path["gram_eigh64"]["smallest_dirs_err"] < 1e-6 < by_path["gram_eigh"]["smallest_dirs_err"]
