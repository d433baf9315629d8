"""Fisher-guided rank allocation (fisherlora/allocation.py, docs/DESIGN.md §10): the budget met
exactly, the bounds respected, the largest comparable energies chosen, determinism, outputs
unchanged at step 0, the adapter in plain PEFT and fisherlora.load, conversion to plain LoRA,
the refusals, the flag and the heat map."""

import argparse

import pytest
import torch
from peft import LoraConfig, PeftModel

import fisherlora
from fisherlora import FisherLoraConfig
from fisherlora.allocation import share_budget
from fisherlora.flags import add_config_flags, config_from_args
from fisherlora.report import rank_grid
from tests.models import assert_logits_close, init_llama, logits, tiny_llama

GLOBAL = FisherLoraConfig(rank=4, alpha=8, backend="torch", rank_allocation="global", min_rank=2, max_rank=7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_share_budget_meets_it_exactly_within_bounds_by_the_largest_scores(seed):
    g = torch.Generator().manual_seed(seed)
    bounds, scores = {}, {}
    for i in range(9):
        lo, hi = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(3, 9, (1,), generator=g))
        bounds[f"l{i}"] = (lo, hi)
        s = torch.rand(hi, generator=g, dtype=torch.float64).sort(descending=True).values
        if i % 3 == 0:
            s = s.round(decimals=1)  # ties, inside and across layers
        scores[f"l{i}"] = s * 10 ** int(torch.randint(-2, 3, (1,), generator=g))
    budget = (sum(lo for lo, _ in bounds.values()) + sum(hi for _, hi in bounds.values())) // 2
    ranks = share_budget(scores, bounds, budget)
    assert sum(ranks.values()) == budget
    assert all(bounds[n][0] <= r <= bounds[n][1] for n, r in ranks.items())
    taken = [float(scores[n][i]) for n, r in ranks.items() for i in range(bounds[n][0], r)]
    left = [float(scores[n][i]) for n, r in ranks.items() for i in range(r, bounds[n][1])]
    assert not taken or not left or min(taken) >= max(left)
    assert share_budget(scores, bounds, budget) == ranks  # deterministic, ties included


def test_global_allocation_is_a_standard_peft_adapter_that_round_trips(tmp_path):
    model, result, ids, before = init_llama(GLOBAL)
    ranks = {n: s.rank for n, s in result.selections.items()}
    assert sum(ranks.values()) == 4 * len(ranks)  # the budget, exactly
    assert all(2 <= r <= min(7, min(s.shape)) for r, s in zip(ranks.values(), result.selections.values()))
    assert len(set(ranks.values())) > 1
    assert_logits_close(before, logits(result.model, ids), "global allocation at step 0")
    cfg = result.model.peft_config["default"]
    assert cfg.rank_pattern == ranks
    from fisherlora.adapter import lora_layers

    for name, layer in lora_layers(result.model):  # every layer keeps the uniform scaling alpha/r
        assert layer.r["default"] == ranks[name] and layer.scaling["default"] == pytest.approx(8 / 4)
    # deterministic
    _, again, _, _ = init_llama(GLOBAL)
    assert {n: s.rank for n, s in again.selections.items()} == ranks
    for (n, a), (_, b) in zip(lora_layers(result.model), lora_layers(again.model)):
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight), n
    # the top r_l of the candidates are the directions a uniform rank-r_l selection would choose
    for name, sel in result.selections.items():
        uni = fisherlora.initialize_fisher_lora(
            tiny_llama(torch.float32), LoraConfig(r=sel.rank, lora_alpha=8, target_modules=[name.split(".")[-1]]),
            [], FisherLoraConfig(backend="torch"), statistics=result.statistics, progress=False)
        assert uni.selections[name].indices.tolist() == sel.indices.tolist(), name
        break
    out = result.save(tmp_path / "out", residual=True)
    assert (out / "energy.png").is_file()
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "residual"), str(out))
    assert_logits_close(before, logits(plain, ids), "plain PEFT on the residual")
    loaded = fisherlora.load(tiny_llama(torch.float32), out)
    assert_logits_close(before, logits(loaded, ids), "fisherlora.load")
    # conversion to a plain LoRA on the original base after "training"
    with torch.no_grad():
        for n, p in result.model.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    trained = logits(result.model, ids)
    result.model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(out))
    converted = PeftModel.from_pretrained(tiny_llama(torch.float32), str(tmp_path / "plain"))
    assert_logits_close(trained, logits(converted, ids), "converted plain LoRA on the original base")


def test_rank_grid_is_by_layer_and_projection():
    _, result, _, _ = init_llama(GLOBAL)
    rows, kinds, grid = rank_grid(result.selections)
    assert rows == ["model.layers.0", "model.layers.1"]
    assert kinds[:2] == ["self_attn.q_proj", "self_attn.k_proj"] and len(kinds) == 7
    assert grid[1][0] == result.selections["model.layers.1.self_attn.q_proj"].rank


@pytest.mark.parametrize("cfg, lora, match", [
    (dict(use_rslora=True), None, "does not support use_rslora"),
    (dict(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2}),
     "writes rank_pattern and alpha_pattern itself"),
    (dict(min_rank=5, max_rank=0), None, "outside what the per-layer bounds allow"),
    (dict(min_rank=1, max_rank=3), None, "outside what the per-layer bounds allow"),
])
def test_what_global_allocation_cannot_do_is_refused_before_any_pass(cfg, lora, match):
    model = tiny_llama(torch.float32)
    config = FisherLoraConfig(rank=4, alpha=8, backend="torch", rank_allocation="global", **cfg)

    def no_data():
        raise AssertionError("a pass was run")
        yield

    with pytest.raises(ValueError, match=match):
        fisherlora.initialize_fisher_lora(model, lora, no_data(), config, progress=False)
    assert not hasattr(model, "peft_config")


def test_config_and_flag():
    with pytest.raises(ValueError, match="rank_allocation must be one of"):
        FisherLoraConfig(rank_allocation="eva")
    with pytest.raises(ValueError, match="must not exceed max_rank"):
        FisherLoraConfig(min_rank=5, max_rank=3)
    with pytest.raises(ValueError, match="min_rank must be a positive integer"):
        FisherLoraConfig(min_rank=0)
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--rank-allocation", "global", "--min-rank", "2", "--max-rank", "8"])
    cfg = config_from_args(args)
    assert (cfg.rank_allocation, cfg.min_rank, cfg.max_rank) == ("global", 2, 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["--rank-allocation", "eva"])


def test_energies_are_compared_per_example_counted_rows_included():
    """Two layers with the same per-row energies: the one that sees 10 rows per example (a token
    layer) outweighs the one that sees 1 (a pooler), because their per-example Fisher differs."""
    from types import SimpleNamespace

    from fisherlora.allocation import allocate
    from fisherlora.decompose import LayerInit, LayerSelection

    k = 8
    sigma = torch.linspace(2, 1, k, dtype=torch.float64)
    energy = torch.linspace(1, 0.5, k, dtype=torch.float64)
    sels = {n: LayerSelection(n, (k, k), 8, torch.arange(8), sigma, energy, energy, torch.ones(8))
            for n in ("tokens", "pooler")}
    inits = {n: LayerInit(torch.eye(k), torch.eye(k), 1.0) for n in sels}
    stats = SimpleNamespace(info={"calibration": {"sequences": 4}}, a_key={"tokens": "tokens", "pooler": "pooler"},
                            a_count={"tokens": 40, "pooler": 4})
    cfg = FisherLoraConfig(rank=4, rank_allocation="global", min_rank=1, max_rank=8)
    lc, _, new, ranks = allocate(inits, sels, stats, LoraConfig(r=4, lora_alpha=8, target_modules=list(sels)), cfg)
    assert ranks == {"tokens": 7, "pooler": 1}
    assert lc.alpha_pattern == {"tokens": 14.0, "pooler": 2.0} and new["tokens"].indices.tolist() == list(range(7))
