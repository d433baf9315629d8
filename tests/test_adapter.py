"""The adapter on the model and on disk: save → load round trips on the original base, plain PEFT
on the residual, conversion to plain LoRA, refusal of another base, rollback when writing fails."""

import copy
import json

import pytest
import torch
from peft import PeftModel

import fisherlora
from fisherlora import FisherLoraConfig
from tests.models import (
    CFG,
    assert_logits_close,
    assert_restored,
    batches,
    init_llama,
    logits,
    model_snapshot,
    tiny_llama,
)


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


@pytest.mark.parametrize("on_disk", [True, False], ids=["originals in a file", "originals in RAM"])
@pytest.mark.parametrize("where", ["inside PEFT", "writing the residuals"])
def test_failure_after_wrapping_restores_the_model(monkeypatch, tmp_path, where, on_disk):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_llama(torch.float32)
    model.gradient_checkpointing_enable()  # PEFT then adds an input-require-grads hook
    model.eval()
    snap = model_snapshot(model)
    import fisherlora.adapter as fa
    import fisherlora.snapshot as fs

    calls = []

    def broken(*a, **k):
        calls.append(1)
        if where == "inside PEFT" or len(calls) == 3:  # Ctrl-C, or out of memory, on the third layer
            raise KeyboardInterrupt(f"simulated failure {where}")
        return real(*a, **k)

    real = fa.residual_weight
    monkeypatch.setattr(fa, "lora_layers" if where == "inside PEFT" else "residual_weight", broken)
    monkeypatch.setattr(fs, "_stash_on_disk", lambda param: on_disk)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        fisherlora.initialize_fisher_lora(model, None, batches(), CFG, progress=False)
    assert_restored(model, snap)
    assert list(tmp_path.iterdir()) == [], "the stash of original weights was left behind"


def _llama():
    return tiny_llama(torch.float32)


def _gpt2():
    from tests.models import tiny_gpt2

    return tiny_gpt2(torch.float32)


@pytest.mark.parametrize("build, lora", [
    (_llama, dict(target_modules="all-linear")),
    (_llama, dict(target_modules=["q_proj", "v_proj"])),
    (_llama, dict(target_modules=["lm_head", "down_proj"])),  # the (untied) output head
    (_llama, dict(target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3.0},
                  use_rslora=True)),
    (_gpt2, dict(target_modules="all-linear")),  # Conv1D
], ids=["all-linear", "q,v", "lm_head", "patterns+rslora", "gpt2 Conv1D"])
def test_every_accepted_target_set_round_trips_save_then_load(tmp_path, build, lora):
    from peft import LoraConfig
    from safetensors.torch import load_file

    from tests.models import probe

    lc = LoraConfig(r=4, lora_alpha=8, **lora)
    model = build()
    ids = probe(vocab=model.config.vocab_size)
    result = fisherlora.initialize_fisher_lora(model, lc, batches(vocab=model.config.vocab_size), CFG, progress=False)
    after = logits(result.model, ids)
    out = result.save(tmp_path / "out")
    saved = set(load_file(out / "adapter_model.safetensors"))
    assert all(".lora_" in k for k in saved), f"the adapter holds base weights: {sorted(saved)[:3]}"
    loaded = fisherlora.load(build(), out)
    assert torch.equal(logits(loaded, ids), after), "save -> load must give the same logits"
    # a failed load leaves the base exactly as it was
    other = build()
    with torch.no_grad():
        other.get_submodule(next(iter(result.selections))).weight.mul_(1.01)  # a target's weight
    other_state = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="not the one the adapter was initialised from"):
        fisherlora.load(other, out)
    assert all(torch.equal(v, other_state[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("damage, error, match", [
    (lambda out: (out / "adapter_model.safetensors").unlink(), FileNotFoundError, "incomplete.*adapter_model"),
    (lambda out: (out / "fisherlora.json").write_text("{bad"), ValueError, "fisherlora.json.*damaged"),
    (lambda out: (out / "fisherlora.json").write_text('{"config": {}}'), ValueError, "damaged.*base_weight"),
    (lambda out: (out / "fisherlora.json").write_text('{"base_weight_fingerprints": {}}'), ValueError,
     "records no base-weight fingerprint"),
], ids=["no adapter weights", "not JSON", "no fingerprints", "empty fingerprints"])
def test_a_damaged_output_directory_is_a_clear_error_and_the_base_is_untouched(tmp_path, damage, error, match):
    _, result, _, _ = init_llama()
    out = result.save(tmp_path / "out")
    damage(out)
    base = tiny_llama(torch.float32)
    snap = model_snapshot(base)
    with pytest.raises(error, match=match):
        fisherlora.load(base, out)
    assert_restored(base, snap)
