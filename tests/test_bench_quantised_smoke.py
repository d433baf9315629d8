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


def test_fisherlora_variants_take_config_fields_and_refuse_bad_ones(tmp_path):
    """``fisherlora[backend,mode,field=value]`` sets FisherLoraConfig fields of that run (the
    magnitude comparison on an NF4 base in bench/RESULTS.md); a bad field or value exits first."""
    from bench import init_methods

    unit, top = "fisherlora[torch,full,magnitude=unit]", "fisherlora[torch,full,magnitude=top_sigma]"
    assert init_methods.select_methods(f"{unit},{top},pissa", "cpu") == [unit, top, "pissa"]
    damped = "fisherlora[torch,full,damping=1e-3,score=fisher_sigma]"  # values are Python literals, else strings
    assert init_methods.select_methods(damped, "cpu") == [damped]
    assert init_methods._parse_variant(damped) == ("torch", "full", {"damping": 1e-3, "score": "fisher_sigma"})
    for bad in ("fisherlora[torch,full,magnitude=huge]", "fisherlora[torch,full,no_such_field=1]",
                "fisherlora[nosuch,full,magnitude=unit]", "fisherlora[magnitude=unit]",  # no backend
                "fisherlora[torch,full,extra,magnitude=unit]", "fisherlora[torch,magnitude=unit,full]",
                "fisherlora[torch,full,rank=4]", "fisherlora[torch,full,memory_mode=projected]", ",", " , "):
        with pytest.raises(SystemExit) as exc:  # each set elsewhere, or silently dropped or relabelled before
            init_methods.select_methods(bad, "cpu")
        assert isinstance(exc.value.code, str) and "\n" not in exc.value.code, (bad, exc.value.code)
    init_methods.main(["--tiny", "--in-process", "--load-in-4bit", "--num-samples", "4", "--max-length", "12",
                       "--rank", "2", "--methods", f"{unit},{top}", "--out", str(tmp_path)])
    results = {r["method"]: r for r in json.loads((tmp_path / "init_methods.json").read_text())["results"]}
    assert list(results) == [unit, top]
    changes = [results[m]["step0_output_change"] for m in (unit, top)]
    assert all(0 < c < 10 for c in changes) and changes[0] != changes[1], changes  # the magnitude reached the run
