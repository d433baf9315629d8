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
