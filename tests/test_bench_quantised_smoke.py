"""bench/init_methods.py --load-in-4bit runs end to end on a tiny random Llama (docs/DESIGN.md §8):
fisherlora, PEFT's PiSSA and OLoRA on the same NF4 base, each as PEFT does it. Not timed."""

import json

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("matplotlib")


def test_init_methods_on_a_4bit_base(tmp_path):
    from bench import init_methods

    methods = ["fisherlora[torch,full]", "pissa", "olora"]
    init_methods.main(["--tiny", "--in-process", "--load-in-4bit", "--num-samples", "4", "--max-length", "12",
                       "--rank", "2", "--methods", ",".join(methods), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "init_methods.json").read_text())
    assert "NF4 4-bit base" in report["meta"]["settings"]
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == methods
    # PEFT's PiSSA refuses a quantised base ("initialize PiSSA under float32 ... re-quantize"): recorded
    assert "PiSSA" in results["pissa"]["error"]
    for m in ("fisherlora[torch,full]", "olora"):
        assert "error" not in results[m], results[m].get("error")
        assert 0 < results[m]["step0_output_change"] < 10, m  # requantised: no longer exactly zero
        assert "step-0 output change" in results[m]["notes"]
