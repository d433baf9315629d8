"""After training: save -> load (trainable) -> train -> convert -> load on a fresh base gives the
trained model; merge gives it as a plain model; the initialisation is only read; nothing partial."""

import hashlib
import json

import pytest
import torch
from peft import PeftModel, PeftModelForCausalLM

import fisherlora
from tests.models import assert_logits_close, batches, init_llama, logits, tiny_llama


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An initialisation on disk, loaded trainable on a fresh base (with a trailing slash), trained
    a few AdamW steps and saved: ``(tmp, init_dir, trained_dir, probe ids, trained logits)``."""
    tmp = tmp_path_factory.mktemp("export")
    _, result, ids, _ = init_llama()
    init_dir = result.save(tmp / "init")
    model = fisherlora.load(tiny_llama(torch.float32), f"{init_dir}/", is_trainable=True)
    assert isinstance(model, PeftModelForCausalLM)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:3]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for batch in batches() * 2:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp / "trained")
    return tmp, init_dir, tmp / "trained", ids, logits(model, ids)


def test_convert_gives_the_trained_model_on_a_fresh_base_and_leaves_the_init_alone(trained):
    tmp, init_dir, trained_dir, ids, want = trained
    before = digest(init_dir)
    assert (want - logits(fisherlora.load(tiny_llama(torch.float32), init_dir), ids)).abs().max() > 1e-3  # it trained
    out = fisherlora.convert(tiny_llama(torch.float32), f"{init_dir}/", f"{trained_dir}/", tmp / "plain")
    assert digest(init_dir) == before  # PEFT rewrote a scratch copy, not the initialisation
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == (8, 16, "CAUSAL_LM")  # rank 2r, alpha doubled
    assert "twice" in (out / "README.md").read_text()
    plain = PeftModel.from_pretrained(tiny_llama(torch.float32), str(out))
    assert isinstance(plain, PeftModelForCausalLM)
    assert_logits_close(want, logits(plain, ids), "plain LoRA on a fresh original base")
    # the converted folder is not mistaken for an initialisation, and --overwrite may replace it
    with pytest.raises(ValueError, match="not an initialisation but a plain_lora output"):
        fisherlora.load(tiny_llama(torch.float32), out)
    fisherlora.convert(tiny_llama(torch.float32), init_dir, trained_dir, out, overwrite=True)


def test_merge_gives_the_trained_model_as_a_plain_model(trained):
    from transformers import AutoModelForCausalLM

    tmp, init_dir, trained_dir, ids, want = trained
    out = fisherlora.merge(tiny_llama(torch.float32), init_dir, tmp / "merged", adapter_dir=trained_dir)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_logits_close(want, logits(merged, ids), "merged model")


def test_export_refusals_leave_nothing(trained, tmp_path):
    tmp, init_dir, trained_dir, ids, want = trained
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        fisherlora.convert(tiny_llama(torch.float32), init_dir, trained_dir, tmp_path / "taken")
    before = digest(init_dir)
    with pytest.raises(ValueError, match="is the folder .* that is read"):
        fisherlora.convert(tiny_llama(torch.float32), init_dir, trained_dir, f"{init_dir}/", overwrite=True)
    with pytest.raises(ValueError, match="is the folder .* that is read"):
        fisherlora.merge(tiny_llama(torch.float32), init_dir, init_dir, overwrite=True)
    assert digest(init_dir) == before
    other = init_llama(fisherlora.FisherLoraConfig(rank=2, alpha=4, backend="torch"))[1].save(tmp_path / "r2")
    with pytest.raises(ValueError, match="does not match this initialisation"):
        fisherlora.convert(tiny_llama(torch.float32), other, trained_dir, tmp_path / "plain")
    with pytest.raises(ValueError, match="not the one the adapter was initialised from"):
        fisherlora.merge(tiny_llama(torch.float32, seed=3), init_dir, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r2", "taken"]
