"""The model loaders: local folders loaded offline, without touching the caller's environment."""

import os
import socket

import pytest
import torch

from tests.models import save_tiny_model


def test_loaders_make_no_network_request_and_leave_the_environment_alone(tmp_path, monkeypatch):
    """In a process where the Hugging Face libraries are online (their offline switches off, as
    for a user who set nothing), loading the embedded data and a local model folder sends
    nothing over the network and changes no environment variable."""
    import datasets.config
    import huggingface_hub.constants

    from fisherlora.data import load_model_and_tokenizer, load_records

    folder = save_tiny_model(tmp_path / "tiny")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("no network in this test")

    for owner, name in ((socket.socket, "connect"), (socket, "create_connection"), (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)
    before = dict(os.environ)
    records = load_records("gsm8k", num_samples=3, prompt_field="question", response_field="answer")
    model, tok = load_model_and_tokenizer(folder)
    assert attempts == []
    assert dict(os.environ) == before
    assert len(records) == 3 and model.config.vocab_size == 101 and tok.pad_token == "<pad>"
    with torch.no_grad():
        assert model(**tok(["ab"], return_tensors="pt")).logits.shape == (1, 2, 101)


def test_a_missing_model_path_is_a_clear_error(tmp_path):
    from fisherlora.models import load_model_and_tokenizer

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nothing")


@pytest.mark.slow
def test_the_embedded_model_loads_as_the_float_model_it_is():
    """The GGUF file is de-quantised on load; the model must not keep the GGUF quantizer's
    markers, which made the Trainer and TRL refuse to train it ("quantized with
    QuantizationMethod.GGUF ... do not support training") and PEFT look its name up on the Hub."""
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_utils import validate_quantization_for_training

    from fisherlora.models import EMBEDDED_MODEL, embedded_model_path, load_model_and_tokenizer, loaded_from

    model, _ = load_model_and_tokenizer(EMBEDDED_MODEL)
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loaded_from(model) == EMBEDDED_MODEL and model.name_or_path == ""
    validate_quantization_for_training(get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"])))
    other, _ = load_model_and_tokenizer(embedded_model_path())
    assert loaded_from(other) == str(embedded_model_path())
