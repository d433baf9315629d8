"""bench/init_methods.py runs end to end on a tiny random Llama (seconds), so the model-level
benchmarks never rot (bench/quality.py: tests/test_bench_quality_smoke.py)."""

import json

import pytest

pytest.importorskip("matplotlib")


def run_init_methods(tmp_path, methods: list[str]) -> dict:
    """``bench/init_methods.py`` at toy size over ``methods``, in process; its JSON report, once
    every method ran without error, in the order given."""
    from bench import init_methods

    rc = init_methods.main(["--tiny", "--in-process", "--num-samples", "4", "--max-length", "12", "--rank", "2",
                            "--methods", ",".join(methods), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "init_methods.json").read_text())
    failed = {r["method"]: r["error"] for r in report["results"] if "error" in r}
    assert rc == 0 and not failed, failed
    assert [r["method"] for r in report["results"]] == methods
    return report

def test_init_methods_every_method_on_tiny_llama(tmp_path):
    from bench import init_methods

    variants = init_methods.fisherlora_variants("cpu")
    assert variants and init_methods.select_methods("fisherlora", "cpu") == variants
    torch_variant = next(v for v in variants if v.startswith("fisherlora[torch"))
    methods = ["floor", torch_variant, *init_methods.STATIC_METHODS[1:]]
    report = run_init_methods(tmp_path, methods)
    for r in report["results"]:
        assert r["total_s"] > 0 and r["cpu_s"] > 0 and r["x_floor"] is not None, r["method"]
    assert report["results"][1]["statistics_mb"] > 0 and report["results"][2]["statistics_mb"] > 0
    assert "tokens_per_pass" in next(r for r in report["results"] if r["method"] == "eva")
    assert (tmp_path / "init_methods.md").read_text().count("\n| ") >= len(methods)
    assert (tmp_path / "init_methods.png").stat().st_size > 0


def test_init_methods_lists_and_runs_the_gradient_starts_beside_lora_ga(tmp_path):
    """Issue 31's cost comparison: both gradient starts are variants of every backend, selected by
    ``fisherlora``, and run beside PEFT's ``lora_ga`` (no timing is checked here)."""
    from bench import init_methods

    variants = init_methods.fisherlora_variants("cpu")
    starts = [f"fisherlora[torch,full,init={i}]" for i in ("gradient", "natural_gradient")]
    assert set(starts) <= set(variants) and init_methods.select_methods(",".join(starts), "cpu") == starts
    methods = [*starts, "lora_ga"]
    run_init_methods(tmp_path, methods)


def test_milora_keeps_outputs_and_takes_minor_components():
    import peft
    import torch

    from bench import common, init_methods

    model, _, batches = common.tiny_setup(2, 8, 2)
    with torch.no_grad():
        before = model(input_ids=batches[0]["input_ids"]).logits
    pm = peft.get_peft_model(model, init_methods.lora_config(2, 4.0))
    init_methods.milora_write(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    W = layer.get_base_layer().weight + layer.scaling["default"] * layer.lora_B["default"].weight @ \
        layer.lora_A["default"].weight
    S = torch.linalg.svdvals(W.detach())
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(torch.linalg.svdvals(delta.detach())[:2], S[-2:], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        after = pm(input_ids=batches[0]["input_ids"]).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)

