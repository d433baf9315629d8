"""The op benchmarks run end to end at toy size on CPU, so bench/ never rots (seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]


def test_op_benchmarks_run_at_toy_size(tmp_path):
    out = tmp_path / "ops.json"
    # a pytest of its own: not an xdist worker, whose variables would make pytest-benchmark disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.update(FISHERLORA_BENCH_QUICK="1", FISHERLORA_BENCH_DEVICE="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "bench" / "test_bench_ops.py"), "--benchmark-only", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())["benchmarks"]
    seen = {(b["extra_info"]["op"], b["extra_info"]["provider"]) for b in results}
    for op in ("syrk_accumulate_", "fisher_energy", "projected_sq_accumulate_"):
        assert {(op, "naive"), (op, "torch")} <= seen, f"{op}: providers run {sorted(seen)}"
    for b in results:
        info = b["extra_info"]
        assert info["median_s"] > 0 and info["tflops"] > 0 and info["peak_mem_bytes"] is not None, b["name"]


def test_the_gradient_op_check_compares_ext_with_autograds_product(tmp_path):
    """bench/gradient_cpu_check.py at toy size: both sides time the same product (they agree to
    float32 rounding), and the json holds the per-shape and total ratios."""
    from bench import gradient_cpu_check

    for mask in ([], ["--padded"]):
        out = tmp_path / "op.json"
        assert gradient_cpu_check.main(["--batch", "2", "--tokens", "40", "--repeats", "1", "--shapes",
                                        "33x70,16x16", "--json", str(out), *mask]) == 0
        res = json.loads(out.read_text())
        assert [(c["d_out"], c["d_in"]) for c in res["cases"]] == [(33, 70), (16, 16)]
        for c in res["cases"]:
            assert c["max_rel_diff"] < 1e-5 and c["ext_over_autograd"] > 0 and 0 < c["kept_tokens"] <= 80
        assert res["total_ext_over_autograd"] > 0 and res["mask"] == ("padded" if mask else "scattered")


def test_the_gradient_pass_check_times_four_passes_on_the_same_batches(tmp_path):
    """bench/gradient_pass.py at toy size: every pass runs once per repeat, and autograd's pass
    forms a weight gradient for every target (it raises otherwise)."""
    from bench import gradient_pass

    out = tmp_path / "pass.json"
    res = gradient_pass.main(["--tiny", "--num-samples", "4", "--max-length", "32", "--batch-size", "2",
                              "--repeats", "2", "--json", str(out)])
    assert json.loads(out.read_text())["median_s"] == res["median_s"]
    assert set(res["times_s"]) == set(gradient_pass.VARIANTS)
    assert all(len(t) == 2 and min(t) > 0 for t in res["times_s"].values())
    lo, hi = res["gradient_share_per_repeat"]
    assert lo <= hi and res["tokens"] > 0 and res["settings"]["model"] == "tiny random Llama"
