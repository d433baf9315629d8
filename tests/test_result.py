"""The result: its report and what it refuses to save."""

import pytest
import torch

import fisherlora
from tests.models import CFG, batches, tiny_llama


def test_saving_freed_statistics_is_refused(tmp_path):
    model = tiny_llama(torch.float32)
    result = fisherlora.initialize_fisher_lora(model, None, batches(), CFG, progress=False, keep_statistics=False)
    with pytest.raises(ValueError, match="freed"):
        result.save(tmp_path / "out", save_statistics=True)
    assert not (tmp_path / "out").exists()


def test_the_report_records_the_configuration_actually_applied(tmp_path):
    """Through the API with its own LoraConfig and calibration batches, the report states those,
    not FisherLoraConfig's defaults (rank 16, alpha 16, all-linear, 128 samples)."""
    import json

    from peft import LoraConfig

    from tests.models import pad_batch, random_sequences

    seqs, labels = random_sequences(16, vocab=101, seed=3, max_len=11)
    data = [pad_batch(seqs[i:i + 5], labels[i:i + 5]) for i in range(0, 16, 5)]  # batches of 5, 5, 5, 1
    lora = LoraConfig(r=4, lora_alpha=12, target_modules=["v_proj", "q_proj"])
    cfg = fisherlora.FisherLoraConfig(backend="torch", memory_mode="auto")
    result = fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), lora, data, cfg, progress=False)
    out = result.save(tmp_path / "out")
    for applied in (json.loads((out / "report.json").read_text())["config"],
                    json.loads((out / "fisherlora.json").read_text())["config"]):
        assert (applied["rank"], applied["alpha"], applied["target_modules"]) == (4, 12, ["q_proj", "v_proj"])
        assert (applied["num_samples"], applied["batch_size"]) == (16, 5)
        assert applied["max_length"] == max(len(s) for s in seqs)
        assert applied["memory_mode"] in ("full", "packed", "projected")  # what auto chose
    md = (out / "report.md").read_text()
    assert "`rank=4`" in md and "`num_samples=16`" in md and "`rank=16`" not in md
