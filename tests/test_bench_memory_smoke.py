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
    # the reference-free columns (what a CUDA run reports): every path reconstructs W
    assert by_path["gram_eigh64"]["residual"] < 1e-12 and by_path["batched"]["residual"] < 1e-5
    assert by_path["batched"]["orthogonality_loss"] < 1e-5


def test_full_size_init_script_runs_on_a_tiny_config(tmp_path):
    """bench/gpu_init.py (run by bench/gpu_check.sh on a GPU) at toy size on the CPU."""
    from bench import gpu_init

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 128, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "r.json"
    assert gpu_init.main(["--config", str(tmp_path / "config.json"), "--device", "cpu", "--dtype", "float32",
                          "--num-samples", "4", "--max-length", "16", "--layer-groups", "2",
                          "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["memory_mode"] == "projected" and r["layer_groups"] == 2 and r["num_layers"] == 14
    assert r["planned"]["mode"] == "projected" and r["total_s"] > 0

    # --num-layers keeps the first decoder layers only (7 projections each), shapes unchanged
    assert gpu_init.main(["--config", str(tmp_path / "config.json"), "--device", "cpu", "--dtype", "float32",
                          "--num-samples", "2", "--max-length", "16", "--num-layers", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_layers_built"] == 1 and r["num_layers"] == 7
    assert set(r["svd_seconds_per_shape"]) == {"32x32", "16x32", "48x32", "32x48"}


def test_gpu_check_script_runs_its_cpu_capable_steps_and_packs_the_results(tmp_path):
    """bench/gpu_check.sh end to end on the CPU, on tiny stand-ins for its architectures: the SVD
    and whole-init steps run under the budget, and the status JSON, summary and archive come back."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    configs = tmp_path / "configs"
    configs.mkdir()
    tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "tie_word_embeddings": False}
    for name in ("llama-3-8b", "llama-3.2-1b"):
        (configs / f"{name}.json").write_text(json.dumps(tiny))
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "GPU_CHECK_CONFIGS": str(configs),
           "GPU_CHECK_STEPS": "init_8b_projected_24gb,init_8b_full,init_1b_methods,dispatch_table,svd_paths",
           "GPU_CHECK_TOKENS": "8x32", "GPU_CHECK_1B_METHODS": "naive,fisherlora[torch,full],pissa",
           "FISHERLORA_BENCH_QUICK": "1"}
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    status = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = ["init_8b_projected_24gb", "init_8b_full", "init_1b_methods", "dispatch_table", "svd_paths"]
    assert list(status) == steps, proc.stdout[-2000:]
    assert all(v.startswith("rc=0 ") for v in status.values()), (status, proc.stdout[-3000:])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "init_8b_projected_24gb" in summary and "warm-up" in summary, summary
    assert "side by side" in summary and "pissa" in summary, summary
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert {"work/init_8b_projected_24gb.json", "work/init_8b_full.json", "work/svd_paths.log",
            "work/dispatch_table.json", "work/init_1b_methods/init_methods.json"} <= set(names), names
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        r = json.load(tar.extractfile("work/init_8b_projected_24gb.json"))
    assert r["memory_mode"] == "projected" and r["free_gb"] == 24 and r["warmup_s"] > 0


def test_gpu_summary_tables_the_check_results(tmp_path):
    """bench/gpu_summary.py reads what gpu_check.sh leaves: ops JSON, svd/ and init_*.json."""
    from bench import gpu_init, gpu_summary, svd_paths

    def bench_row(provider, median):
        return {"group": "syrk-d48", "extra_info": {"provider": provider, "median_s": median, "tflops": 1.5,
                                                    "peak_mem_bytes": 2 << 20}}

    (tmp_path / "ops.json").write_text(json.dumps({"benchmarks": [bench_row("naive", 0.004),
                                                                  bench_row("triton", 0.001)]}))
    assert svd_paths.main(["--quick", "--out", str(tmp_path / "svd"), "--device", "cpu"]) == 0
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 128, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert gpu_init.main(["--config", str(tmp_path / "config.json"), "--device", "cpu", "--dtype", "float32",
                          "--num-samples", "2", "--max-length", "16", "--json", str(tmp_path / "init_tiny.json")]) == 0
    text = gpu_summary.summary(tmp_path)
    assert "| syrk-d48 | triton | 1.00 | 4.00 | 1.5 | 2 |" in text
    assert "| 48x32 | gram_eigh64 |" in text
    assert "| init_tiny | projected g=1 | 1 |" in text
