"""Shared pytest setup."""

import os

import pytest
import torch

# The suite is offline (docs/DESIGN.md §5): the Hugging Face libraries read these when they are
# imported, before any test module imports them. The package itself never relies on them
# (tests/test_models.py, tests/test_cli.py check it with the variables unset).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

# Triton kernels run interpreted on CPU-only machines (docs/DESIGN.md §5). The variable must be set
# before the @triton.jit functions are defined, i.e. before fisherlora.kernels is imported.
# device_count() asks NVML first, so this does not initialise CUDA.
_cuda_visible = torch.backends.cuda.is_built() and torch.cuda.device_count() > 0
if "TRITON_INTERPRET" not in os.environ and not _cuda_visible:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def llama():
    """A float64 tiny Llama (tests.models.tiny_llama)."""
    from tests.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="module")
def data():
    """Six random supervised sequences ``(seqs, labels)`` of the tiny Llama's vocabulary."""
    from tests.models import random_sequences

    return random_sequences(6, vocab=101, seed=1)
