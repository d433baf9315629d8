"""Initialisation invariants, save/load round trips, PEFT conversion, and errors that lose nothing."""

import copy
import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel

import fisherlora
from fisherlora import FisherLoraConfig
from tests.models import pad_batch, random_sequences, tiny_gpt2, tiny_llama


def batches(vocab=101, n=6, seed=1):
    seqs, labels = random_sequences(n, vocab=vocab, seed=seed)
    return [pad_batch(seqs[:3], labels[:3]), pad_batch(seqs[3:], labels[3:])]


def probe(vocab=101):
    return torch.randint(1, vocab, (2, 11), generator=torch.Generator().manual_seed(7))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_logits_close(a, b, what):
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    assert diff <= 1e-4 * scale, f"{what}: max abs diff {diff:.3e} > 1e-4 × logit scale {scale:.3e}"


CFG = FisherLoraConfig(rank=4, alpha=8, backend="torch")


def init_llama(cfg=CFG, lora_config=None, **kw):
    model = tiny_llama(torch.float32)
    ids = probe()
    before = logits(model, ids)
    result = fisherlora.initialize_fisher_lora(model, lora_config, batches(), cfg, progress=False, **kw)
    return model, result, ids, before


@pytest.mark.parametrize("magnitude", ["sigma", "top_sigma", "unit", "energy"])
def test_logits_unchanged_right_after_init(magnitude):
    cfg = FisherLoraConfig(rank=4, alpha=8, backend="torch", magnitude=magnitude)
    model, result, ids, before = init_llama(cfg)
    assert isinstance(result.model, PeftModel)
    assert_logits_close(before, logits(result.model, ids), f"after init ({magnitude})")
    # the adapter is not a no-op: disabling it changes the outputs
    with result.model.disable_adapter():
        assert (logits(result.model, ids) - before).abs().max() > 1e-3


@pytest.mark.parametrize("magnitude", ["unit", "sigma"])
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
    # s·|b_i|·|a_i| is the direction's magnitude: 1 (the default, unit) or its own σ_i
    expected = torch.ones(4) if magnitude == "unit" else S[idx].float()
    torch.testing.assert_close(s * B.norm(dim=0) * A.norm(dim=1), expected, rtol=1e-5, atol=1e-6)


def test_save_then_load_on_the_original_base_and_plain_peft_on_the_residual(tmp_path):
    model, result, ids, before = init_llama()
    after = logits(result.model, ids)
    out = result.save(tmp_path / "out", save_statistics=True, residual=True)
    for f in ("adapter_config.json", "adapter_model.safetensors", "fisherlora.json", "report.json", "report.md",
              "energy.png", "statistics.safetensors", "residual/config.json"):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == 14 and len(report["layers"]) == 14
    # fisherlora.load on a fresh copy of the ORIGINAL base
    loaded = fisherlora.load(tiny_llama(torch.float32), out)
    assert_logits_close(after, logits(loaded, ids), "load on the original base")
    # plain PEFT on the residual model
    from transformers import AutoModelForCausalLM

    residual = AutoModelForCausalLM.from_pretrained(out / "residual", dtype=torch.float32)
    plain = PeftModel.from_pretrained(residual, str(out))
    assert_logits_close(after, logits(plain, ids), "PEFT on the residual model")
    # the statistics cache re-runs selection with another rank, without data
    stats = fisherlora.FisherStatistics.load(out / "statistics.safetensors")
    again = fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, None, FisherLoraConfig(rank=2, alpha=4),
                                  statistics=stats, progress=False)
    assert all(s.rank == 2 for s in again.selections.values())
    for name, sel in again.selections.items():
        assert sel.indices.tolist() == result.selections[name].indices[:2].tolist()


def test_conversion_to_plain_lora_through_peft(tmp_path):
    """After training, PEFT's path_initial_model_for_weight_conversion gives a LoRA for the ORIGINAL base."""
    model, result, ids, before = init_llama()
    init_dir = result.save(tmp_path / "init")
    peft_model = result.model
    with torch.no_grad():  # stand-in for training: move every adapter weight
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    trained = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "trained")
    peft_model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(init_dir))
    plain = PeftModel.from_pretrained(tiny_llama(torch.float32), str(tmp_path / "plain"))
    assert_logits_close(trained, logits(plain, ids), "converted plain LoRA on the original base")
    # and fisherlora.load(base, init, adapter=trained) gives the same model
    again = fisherlora.load(tiny_llama(torch.float32), init_dir, adapter=tmp_path / "trained")
    assert_logits_close(trained, logits(again, ids), "load with a trained adapter")


@pytest.mark.parametrize("change", ["other seed", "rows reversed", "1% fine-tuning step"])
def test_load_refuses_another_base(tmp_path, change):
    _, result, _, _ = init_llama()
    out = result.save(tmp_path / "out")
    other = tiny_llama(torch.float32, seed=5 if change == "other seed" else 0)
    W = other.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        if change == "rows reversed":  # same norm, another matrix
            W.copy_(W.flip(0))
        elif change == "1% fine-tuning step":
            W.add_(0.01 * W.std() * torch.randn_like(W))
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="not the one the adapter was initialised from"):
        fisherlora.load(other, out)
    assert type(other.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_statistics_of_another_model_are_refused(tmp_path):
    _, result, _, _ = init_llama()
    result.statistics.save(tmp_path / "s.safetensors")
    stats = fisherlora.FisherStatistics.load(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="collected on another model"):
        fisherlora.initialize_fisher_lora(tiny_llama(torch.float32, seed=9), None, None, CFG, statistics=stats,
                                          progress=False)


def test_saving_freed_statistics_is_refused(tmp_path):
    model = tiny_llama(torch.float32)
    result = fisherlora.initialize_fisher_lora(model, None, batches(), CFG, progress=False, keep_statistics=False)
    with pytest.raises(ValueError, match="freed"):
        result.save(tmp_path / "out", save_statistics=True)
    assert not (tmp_path / "out").exists()


def test_a_model_already_wrapped_by_peft_is_a_clear_error():
    _, result, _, _ = init_llama()
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        fisherlora.initialize_fisher_lora(result.model.get_base_model(), None, batches(), CFG, progress=False)


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


def _hooks(model):
    return {n: (set(m._forward_hooks), set(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            set(vars(model)), _hooks(model))


def _assert_restored(model, snap):
    state, types, flags, attrs, hooks = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(vars(model)) == attrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert _hooks(model) == hooks


@pytest.mark.parametrize(
    "case, cfg, lc, data, err, match",
    [
        ("empty data", CFG, None, [], ValueError, "calibration data is empty"),
        ("rank too large", FisherLoraConfig(rank=40, backend="torch"), None, None, ValueError,
         r"rank 40 exceeds min\(d_out, d_in\)"),
        ("no target", CFG, LoraConfig(r=2, target_modules=["nope_proj"]), None, ValueError, "matches no module"),
    ],
)
def test_bad_input_is_a_clear_error_and_restores_the_model(tmp_path, case, cfg, lc, data, err, match):
    model = tiny_llama(torch.float32)
    snap = _snapshot(model)
    with pytest.raises(err, match=match):
        fisherlora.initialize_fisher_lora(model, lc, batches() if data is None else data, cfg, progress=False)
    _assert_restored(model, snap)


@pytest.mark.parametrize("on_disk", [True, False], ids=["originals in a file", "originals in RAM"])
@pytest.mark.parametrize("where", ["inside PEFT", "writing the residuals"])
def test_failure_after_wrapping_restores_the_model(monkeypatch, tmp_path, where, on_disk):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_llama(torch.float32)
    model.gradient_checkpointing_enable()  # PEFT then adds an input-require-grads hook
    model.eval()
    snap = _snapshot(model)
    import fisherlora.initialize as fi

    calls = []

    def broken(*a, **k):
        calls.append(1)
        if where == "inside PEFT" or len(calls) == 3:  # Ctrl-C, or out of memory, on the third layer
            raise KeyboardInterrupt(f"simulated failure {where}")
        return real(*a, **k)

    real = fi.residual_weight
    monkeypatch.setattr(fi, "_lora_layers" if where == "inside PEFT" else "residual_weight", broken)
    monkeypatch.setattr(fi, "_stash_on_disk", lambda param: on_disk)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        fisherlora.initialize_fisher_lora(model, None, batches(), CFG, progress=False)
    _assert_restored(model, snap)
    assert list(tmp_path.iterdir()) == [], "the stash of original weights was left behind"


def test_output_directory_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    _, result, _, _ = init_llama()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        result.save(out)
    assert (out / "keep.txt").read_text() == "mine"
    # the same directory reached through a parent that does not exist yet ("new/../out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        result.save(tmp_path / "new" / ".." / "out")
    assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()
    # a failure while writing leaves neither a partial output nor a temporary directory
    import fisherlora.report as rep

    monkeypatch.setattr(rep, "plot_energy", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    result.save(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
