"""Initialisation invariants, save/load round trips, PEFT conversion, and errors that lose nothing."""

import dataclasses

import pytest
import torch
from peft import LoraConfig, PeftModel

import fisherlora
from fisherlora import FisherLoraConfig
from tests.models import (
    CFG,
    assert_logits_close,
    assert_restored,
    batches,
    init_llama,
    logits,
    mode_batches,
    model_snapshot,
    probe,
    run_mode,
    tiny_gpt2,
    tiny_llama,
)


@pytest.mark.parametrize("magnitude", ["sigma", "top_sigma", "unit", "energy"])
def test_logits_unchanged_right_after_init(magnitude):
    cfg = FisherLoraConfig(rank=4, alpha=8, backend="torch", magnitude=magnitude)
    model, result, ids, before = init_llama(cfg)
    assert isinstance(result.model, PeftModel)
    assert_logits_close(before, logits(result.model, ids), f"after init ({magnitude})")
    # the adapter is not a no-op: disabling it changes the outputs
    with result.model.disable_adapter():
        assert (logits(result.model, ids) - before).abs().max() > 1e-3


@pytest.mark.parametrize("magnitude", ["top_sigma", "unit", "sigma"])
def test_written_factors_are_the_chosen_singular_directions(magnitude):
    model = tiny_llama(torch.float32)
    W = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    cfg = dataclasses.replace(CFG, magnitude=magnitude)
    result = fisherlora.initialize_fisher_lora(model, None, batches(), cfg, progress=False)
    name = "model.layers.1.self_attn.o_proj"
    layer = result.model.get_base_model().get_submodule(name)
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    idx = result.selections[name].indices
    Bn = (B / B.norm(dim=0)).double()
    # each column of B is ± the chosen left singular vector
    torch.testing.assert_close((Bn * U[:, idx]).sum(0).abs(), torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(Bn.T @ Bn, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    s = layer.scaling["default"]
    # s·|b_i|·|a_i| is the direction's magnitude: the weight's 4 largest σ in score order (the
    # default, top_sigma), 1 (unit) or the direction's own σ_i (sigma)
    expected = {"top_sigma": S[:4].float(), "unit": torch.ones(4), "sigma": S[idx].float()}[magnitude]
    torch.testing.assert_close(s * B.norm(dim=0) * A.norm(dim=1), expected, rtol=1e-5, atol=1e-6)


def test_statistics_of_another_model_are_refused(tmp_path):
    _, result, _, _ = init_llama()
    result.statistics.save(tmp_path / "s.safetensors")
    stats = fisherlora.FisherStatistics.load(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="collected on another model"):
        fisherlora.initialize_fisher_lora(tiny_llama(torch.float32, seed=9), None, None, CFG, statistics=stats,
                                          progress=False)


def test_statistics_of_the_same_backbone_with_another_head_are_refused_naming_it(tmp_path):
    """Issue 30 §2: statistics of a classifier whose head was drawn with seed 1, reused on the same
    backbone with a head drawn with seed 2 (not a target): G depends on everything downstream of a
    layer, so they are refused, naming the head's tensor; on the model they came from they are reused."""
    from tests.models import classifier_batches, tiny_classifier

    cfg = dataclasses.replace(CFG, stats_dtype="float64")
    first = fisherlora.initialize_fisher_lora(tiny_classifier(head_seed=1), None, classifier_batches(), cfg,
                                              progress=False)
    first.statistics.save(tmp_path / "s.safetensors")
    stats = fisherlora.FisherStatistics.load(tmp_path / "s.safetensors")
    other = tiny_classifier(head_seed=2)
    snap = model_snapshot(other)
    with pytest.raises(ValueError, match="collected on another model") as err:
        fisherlora.initialize_fisher_lora(other, None, None, cfg, statistics=stats, progress=False)
    assert "1 tensor(s) ['score.weight']" in str(err.value), str(err.value)
    assert_restored(other, snap)
    again = fisherlora.initialize_fisher_lora(tiny_classifier(head_seed=1), None, None, cfg, statistics=stats,
                                              progress=False)
    assert again.selections.keys() == first.selections.keys()
    for name, sel in first.selections.items():
        assert torch.equal(sel.indices, again.selections[name].indices), name


def test_statistics_written_before_the_whole_model_was_recorded_are_refused_clearly(tmp_path):
    """A file that records only the target weights (fisherlora before issue 30) still loads, and its
    reuse is refused saying why and what to do."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model, result, _, _ = init_llama()
    result.statistics.save(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["fisherlora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["info"]["model_digest"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"fisherlora": json.dumps(meta)})
    stats = fisherlora.FisherStatistics.load(tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="record only the target weights") as err:
        fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, None, CFG, statistics=stats,
                                          progress=False)
    assert "collect them again" in str(err.value)


def test_a_model_already_wrapped_by_peft_is_a_clear_error():
    _, result, _, _ = init_llama()
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        fisherlora.initialize_fisher_lora(result.model.get_base_model(), None, batches(), CFG, progress=False)


def test_a_model_holding_peft_adapters_outside_the_targets_is_refused_unchanged():
    """Issue 30 §5: a model whose q_proj holds the user's adapter 'other', passed as
    ``wrapper.base_model.model`` with v_proj as targets: refused by kind (any module holding PEFT
    tuner layers), naming the module and the adapter; the user's adapter stays active, the model
    and its outputs exactly as they were."""
    import peft

    wrapper = peft.get_peft_model(tiny_llama(torch.float32), LoraConfig(r=2, target_modules=["q_proj"],
                                                                        init_lora_weights=False),
                                  adapter_name="other")
    inner = wrapper.base_model.model
    ids = probe()
    before = logits(wrapper, ids)
    snap = model_snapshot(inner)
    with pytest.raises(ValueError, match="already carries PEFT adapters") as err:
        fisherlora.initialize_fisher_lora(inner, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]), batches(),
                                          CFG, progress=False)
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and "'other'" in str(err.value), str(err.value)
    assert_restored(inner, snap)
    assert wrapper.active_adapters == ["other"] and list(wrapper.peft_config) == ["other"]
    assert torch.equal(logits(wrapper, ids), before)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_adapter_does_not_depend_on_the_callers_rng_in_train_mode(checkpointing):
    """Issue 30 §4: a model in train() mode with attention dropout 0.3 (and with transformers'
    gradient checkpointing, which needs training mode): two global RNG states, one FisherLoraConfig,
    the same adapter bit for bit; the passes run the deterministic network (eval mode, as PEFT's
    EVA and CorDA do), and the model's training flags are as the caller set them afterwards."""
    from fisherlora.adapter import lora_layers
    from fisherlora.testing import random_llama

    adapters = []
    for global_seed in (1, 2):
        model = random_llama(seed=0)
        model.config.attention_dropout = 0.3
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        flags = {n: m.training for n, m in model.named_modules()}
        torch.manual_seed(global_seed)
        result = fisherlora.initialize_fisher_lora(model, None, batches(), CFG, progress=False)
        assert {n: m.training for n, m in result.model.get_base_model().named_modules() if n in flags} == flags
        adapters.append({n: (lay.lora_A["default"].weight.clone(), lay.lora_B["default"].weight.clone())
                         for n, lay in lora_layers(result.model)})
    for name, (A, B) in adapters[0].items():
        assert torch.equal(A, adapters[1][name][0]) and torch.equal(B, adapters[1][name][1]), name


def test_gpt2_conv1d_initialises():
    model = tiny_gpt2(torch.float32)
    ids = probe(97)
    before = logits(model, ids)
    W = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (d_in, d_out)
    lc = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    cfg = FisherLoraConfig(backend="torch")
    result = fisherlora.initialize_fisher_lora(model, lc, batches(97), cfg, progress=False)
    assert_logits_close(before, logits(result.model, ids), "GPT-2 after init")
    sel = result.selections["transformer.h.0.attn.c_attn"]
    assert sel.shape == (W.shape[1], W.shape[0])
    S = torch.linalg.svdvals(W.T.double())
    torch.testing.assert_close(sel.sigma, S, rtol=1e-5, atol=1e-6)


def test_rank_pattern_and_rslora_follow_peft():
    lc = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                    rank_pattern={"down_proj": 2})
    model, result, ids, before = init_llama(lora_config=lc)
    assert_logits_close(before, logits(result.model, ids), "rank_pattern + rsLoRA")
    assert result.selections["model.layers.0.mlp.down_proj"].rank == 2
    assert result.selections["model.layers.0.self_attn.q_proj"].rank == 4


@pytest.mark.parametrize(
    "cfg, lc, match",
    [
        (FisherLoraConfig(rank=40, backend="torch"), None, r"rank 40 exceeds min\(d_out, d_in\)"),
        (CFG, LoraConfig(r=2, target_modules=["nope_proj"]), "matches no module"),
    ],
    ids=["rank too large", "no target"],
)
def test_bad_configuration_is_a_clear_error_before_any_pass(cfg, lc, match):
    def never():
        raise AssertionError("a calibration batch was read")
        yield

    with pytest.raises(ValueError, match=match):
        fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), lc, never(), cfg, progress=False)


def test_empty_data_is_a_clear_error_after_the_hooks_and_restores_the_model():
    model = tiny_llama(torch.float32)
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match="calibration data is empty"):
        fisherlora.initialize_fisher_lora(model, None, [], CFG, progress=False)
    assert_restored(model, snap)


# ----------------------------------------------------------------------------- memory modes and layer groups
@pytest.fixture(scope="module")
def full():
    return run_mode("full")


@pytest.mark.parametrize("mode, groups", [("packed", 1), ("projected", 1), ("full", 3), ("projected", 2)])
def test_modes_and_layer_groups_agree_with_full(full, mode, groups):
    other = run_mode(mode, groups)
    assert other.extra["memory_mode"] == mode and other.extra["layer_groups"] == groups
    assert set(other.selections) == set(full.selections)
    for name, sel in full.selections.items():
        o = other.selections[name]
        rel = ((o.energy - sel.energy).abs().max() / sel.energy.abs().max()).item()
        assert rel <= 1e-4, f"{mode}/{groups}: energies of {name} differ by {rel:.2e} (relative)"
        assert o.indices.tolist() == sel.indices.tolist(), f"{mode}/{groups}: {name} chose other directions"
    if mode == "packed":
        d = full.statistics.shapes["model.layers.0.mlp.down_proj"][1]
        assert other.statistics.A["model.layers.0.mlp.down_proj"].shape == (d * (d + 1) // 2,)
    if mode == "projected":
        assert all(a.dim() == 1 for a in other.statistics.A.values())  # A and G never formed


def test_layer_groups_need_reiterable_data():
    model = tiny_llama(torch.float32, layers=3)
    cfg = FisherLoraConfig(rank=2, backend="torch", layer_groups=2)
    with pytest.raises(ValueError, match="re-iterable"):
        fisherlora.initialize_fisher_lora(model, None, iter(mode_batches()), cfg, progress=False)


    class Stale:  # an iterable whose __iter__ hands out one stored iterator: exhausted after a pass
        def __init__(self):
            self.it = iter(mode_batches())

        def __iter__(self):
            return self.it

    snap = model_snapshot(model)
    with pytest.raises(ValueError, match="layer group 2 of 2 got no calibration batch.*a list or a DataLoader"):
        fisherlora.initialize_fisher_lora(model, None, Stale(), cfg, progress=False)
    assert_restored(model, snap)


@pytest.mark.parametrize("mode", ["packed", "projected"])
def test_every_cpu_backend_agrees_in_every_mode(full, mode):
    from fisherlora.ops import available_backends

    # interpreted Triton is covered op by op in tests/test_ops_triton.py
    compiled = [b for b in available_backends("cpu") if b not in ("torch", "triton")]
    if not compiled:
        pytest.skip("no compiled CPU backend built")
    for backend in compiled:
        other = run_mode(mode, backend=backend)
        for name, sel in full.selections.items():
            assert other.selections[name].indices.tolist() == sel.indices.tolist(), f"{backend}/{mode}: {name}"


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_the_residual_is_exact_to_the_models_own_precision(dtype, tol):
    """W_res + s·B A equals W to the weight dtype's precision, with B and A as the adapter holds them."""
    from fisherlora.adapter import lora_layers

    model = tiny_llama(dtype)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    result = fisherlora.initialize_fisher_lora(model, None, batches(), CFG, progress=False)
    for name, layer in lora_layers(result.model):
        base = layer.get_base_layer()
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        assert base.weight.dtype == dtype
        rebuilt = base.weight.double() + layer.scaling["default"] * (B.double() @ A.double())
        W = originals[name].double()
        err = float(((rebuilt - W).abs().max() / W.abs().max()).detach())
        assert err <= tol, f"{name}: |W_res + s·BA - W| / |W| = {err:.1e} > {tol:.0e}"
