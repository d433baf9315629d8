"""The memory plan: closed forms on a tiny Llama, the Llama-3-8B yardstick, the plan command, and
memory_mode='auto'."""


import pytest
import torch

from fisherlora import FisherLoraConfig
from fisherlora.models import meta_model_from_config
from fisherlora.plan import choose_mode, plan_memory
from fisherlora.svd import svd_workspace_bytes
from tests.models import run_mode, tiny_llama


def test_auto_mode_picks_a_plan_that_fits_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="fisherlora"):
        result = run_mode("auto")
    assert result.extra["memory_mode"] == "full"  # a tiny model fits anywhere: the fastest mode
    assert "memory_mode=auto chose full" in caplog.text


def test_plan_equals_closed_form_on_the_tiny_llama():
    model = tiny_llama(torch.float32)
    lc = FisherLoraConfig().to_lora_config()
    from fisherlora.layers import find_target_modules, layer_shape

    shapes = {n: layer_shape(m) for n, m in find_target_modules(model, lc).items()}
    naive, full, packed = _closed_form(shapes, _share)
    plans = {(p.label, p.layer_groups): p for p in plan_memory(model, lc)}
    assert plans[("naive", 1)].statistics == naive
    assert plans[("full", 1)].statistics == full
    assert plans[("packed", 1)].statistics == packed
    assert plans[("full", 2)].statistics == full // 2  # two identical decoder layers
    assert plans[("projected", 1)].statistics == 2 * 4 * sum(min(s) for s in shapes.values())
    # activations of one batch (4 x 512): every block saved, or (projected) recomputed from its input
    c = model.config
    block, tokens = (10 * c.hidden_size + 4 * c.intermediate_size) * 4, 4 * 512
    assert plans[("full", 1)].activations == tokens * (c.num_hidden_layers * block + c.vocab_size * 4)
    assert plans[("projected", 1)].activations == tokens * (c.num_hidden_layers * c.hidden_size * 4 + 2 * block
                                                            + c.vocab_size * 4)


def test_plan_of_llama_3_8b_matches_the_design_table():
    model = meta_model_from_config("llama-3-8b")  # bundled in fisherlora/configs
    assert next(model.parameters()).device.type == "meta"
    plans = {(p.label, p.layer_groups): p for p in plan_memory(model, FisherLoraConfig().to_lora_config(),
                                                              dtype=torch.bfloat16, bases_bytes=2)}
    h, i, kv, L = 4096, 14336, 1024, 32
    per_layer = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    shapes = {f"model.layers.{n}.{k}": s for n in range(L) for k, s in per_layer.items()}
    share = lambda name: name.rsplit(".", 1)[0] + {"q": ".qkv", "k": ".qkv", "v": ".qkv", "gate": ".gu",  # noqa: E731
                                                   "up": ".gu"}.get(name.rsplit(".", 1)[1], "." + name)
    naive, full, packed = _closed_form(shapes, share)
    assert plans[("naive", 1)].statistics == naive
    assert plans[("full", 1)].statistics == full
    assert plans[("packed", 1)].statistics == packed
    # docs/DESIGN.md §4's table, within 2 %
    for (mode, g), gb in {("naive", 1): 98.5, ("full", 1): 92.1, ("packed", 1): 46.0}.items():
        assert abs(plans[(mode, g)].statistics / 1e9 - gb) <= 0.02 * gb, mode
    bases = plans[("projected", 1)].svd_workspace - plans[("full", 1)].svd_workspace
    assert abs(bases / 1e9 - 19.5) <= 0.02 * 19.5
    # one matrix's SVD workspace at a time (the largest, 14336 x 4096: 1.31 GB on the float64 Gram path)
    assert plans[("full", 1)].svd_workspace == svd_workspace_bytes(i, h)
    assert abs((plans[("projected", 8)].svd_workspace - svd_workspace_bytes(i, h)) / 1e9 - 19.5 / 8) <= 0.02 * 19.5 / 8
    # the 24 GB goal at the default batch (4 x 512): projected with 4 layer groups (recomputed layers)
    pick = choose_mode(list(plans.values()), 24 * 10**9)
    assert (pick.label, pick.layer_groups) == ("projected", 4) and pick.total < 24 * 10**9


def test_plan_command_prints_every_mode(capsys):
    from fisherlora import cli

    assert cli.main(["plan", "--model", "llama-3-8b", "--json", "-"]) == 0
    out = capsys.readouterr().out
    assert '"mode": "projected"' in out and '"statistics"' in out


def test_plan_refuses_a_rank_init_refuses(capsys):
    """The planner makes init's rank check (layers.check_ranks), and the command prints it as one
    line with exit status 2."""
    from fisherlora import cli

    model = meta_model_from_config("llama-3-8b")
    with pytest.raises(ValueError, match=r"rank 100000 exceeds min\(d_out, d_in\) = 4096 of layer "
                                         r"'model.layers.0.self_attn.q_proj'"):
        plan_memory(model, FisherLoraConfig(rank=100000).to_lora_config())
    assert cli.main(["plan", "--model", "llama-3-8b", "--rank", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fisherlora plan: error: rank 100000 exceeds") and "\n" not in err, err


def _closed_form(shapes, shared_groups):
    """Statistics bytes by hand: naive, full, packed for (d_out, d_in) shapes per layer."""
    naive = sum(i * i + o * o for o, i in shapes.values()) * 4
    inputs = {}
    for name, (_, i) in shapes.items():
        inputs[shared_groups(name)] = i
    full = (sum(i * i for i in inputs.values()) + sum(o * o for o, _ in shapes.values())) * 4
    tri = lambda d: d * (d + 1) // 2  # noqa: E731
    packed = (sum(tri(i) for i in inputs.values()) + sum(tri(o) for o, _ in shapes.values())) * 4
    return naive, full, packed


def _share(name):
    layer, _, proj = name.rpartition(".")
    return layer.rsplit(".", 1)[0] + ".qkv" if proj in ("q_proj", "k_proj", "v_proj") else (
        layer + ".gate_up" if proj in ("gate_proj", "up_proj") else name)
