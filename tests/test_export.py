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


# ----------------------------------------------------------------------------- lineage (issue 30 §3)
@pytest.fixture(scope="module")
def other_init(tmp_path_factory):
    """An initialisation B of the same shapes as the fixture's A: other data, magnitude 'unit'."""
    import dataclasses

    from tests.models import CFG

    tmp = tmp_path_factory.mktemp("other")
    result = fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, batches(seed=5),
                                               dataclasses.replace(CFG, magnitude="unit"), progress=False)
    return result.save(tmp / "init-B")


def _lineage_warnings(record):
    return [str(w.message) for w in record if "trained from" in str(w.message)]


def test_a_trained_adapter_is_refused_against_another_initialisation(trained, other_init, tmp_path):
    """An adapter trained from init A, loaded or converted against an init B of the same shapes
    (1.29 off in relative logits before): refused, naming both directories, before anything is
    written into the base; nothing is written out."""
    import warnings

    from tests.models import assert_restored, model_snapshot

    _, init_dir, trained_dir, ids, want = trained
    base = tiny_llama(torch.float32)
    snap = model_snapshot(base)
    with pytest.raises(ValueError, match="another initialisation") as err:
        fisherlora.load(base, other_init, adapter=trained_dir)
    assert str(other_init) in str(err.value) and str(trained_dir) in str(err.value), str(err.value)
    assert_restored(base, snap)
    with pytest.raises(ValueError, match="another initialisation"):
        fisherlora.convert(tiny_llama(torch.float32), other_init, trained_dir, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    with pytest.raises(ValueError, match="another initialisation"):  # an init's own card names it too
        fisherlora.load(tiny_llama(torch.float32), init_dir, adapter=other_init)
    with warnings.catch_warnings(record=True) as record:  # the adapter's own initialisation: no word
        warnings.simplefilter("always")
        assert_logits_close(want, logits(fisherlora.load(tiny_llama(torch.float32), init_dir, adapter=trained_dir),
                                         ids), "load with the adapter's own initialisation")
    assert not _lineage_warnings(record)


def test_the_lineage_travels_through_peft_and_trainer_saving(trained, other_init, tmp_path):
    """The legitimate cases: the model initialize_fisher_lora returns, trained and saved with PEFT's
    save_pretrained, and a transformers Trainer run on fisherlora.load(..., is_trainable=True)
    saved with save_model: accepted with their own initialisation, refused with another. An
    adapter whose card was lost is accepted with a warning that says the lineage is unchecked."""
    import shutil
    import warnings

    from transformers import Trainer, TrainingArguments

    from tests.models import init_llama

    _, result, _, _ = init_llama()
    init_dir = result.save(tmp_path / "init")
    with torch.no_grad():
        for p in result.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    result.model.save_pretrained(tmp_path / "direct")
    fisherlora.convert(tiny_llama(torch.float32), init_dir, tmp_path / "direct", tmp_path / "plain-direct")
    with pytest.raises(ValueError, match="another initialisation"):
        fisherlora.load(tiny_llama(torch.float32), other_init, adapter=tmp_path / "direct")

    _, fixture_init, _, _, _ = trained
    model = fisherlora.load(tiny_llama(torch.float32), fixture_init, is_trainable=True)
    first = batches()[0]  # rows of one padded batch: one length, for the default collator
    rows = [{k: v[i] for k, v in first.items()} for i in range(first["input_ids"].shape[0])]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=3,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(str(tmp_path / "trainer"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fisherlora.load(tiny_llama(torch.float32), fixture_init, adapter=tmp_path / "trainer")
    assert not _lineage_warnings(record)
    with pytest.raises(ValueError, match="another initialisation"):
        fisherlora.load(tiny_llama(torch.float32), other_init, adapter=tmp_path / "trainer")

    bare = tmp_path / "no-card"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "direct" / name, bare / name)
    with pytest.warns(UserWarning, match="cannot tell which initialisation") as record:
        fisherlora.load(tiny_llama(torch.float32), init_dir, adapter=bare)
    assert str(bare) in str(record[0].message)
