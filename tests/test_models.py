"""The model loaders: local folders loaded offline, without touching the caller's environment."""

import json
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


@pytest.mark.slow
def test_the_embedded_model_is_cached_and_the_cache_gives_the_same_model(tmp_path, monkeypatch):
    """The first load de-quantises the GGUF file and writes the cache (whole, or not at all where
    it cannot be written); the next one reads the cache, not the GGUF file, and gives the same model
    and tokenizer: every tensor bit for bit, the tied embedding, the config, the generation config."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_utils import validate_quantization_for_training

    from fisherlora import gguf_cache, models

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, source, *args, **kwargs):
        loads.append("gguf" if kwargs.get("gguf_file") else "folder")
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocked / "cache"))  # cannot be made: the load goes on without it
    plain, _ = models.load_model_and_tokenizer(models.EMBEDDED_MODEL, tokenizer=False)
    gguf_config = models.load_config(models.EMBEDDED_MODEL)
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(root))
    first, tok1 = models.load_model_and_tokenizer(models.EMBEDDED_MODEL)
    (folder,) = (root / "embedded").iterdir()  # one whole cache folder, no partial one beside it
    assert (folder / "fisherlora-cache.json").is_file() and (folder / "model.safetensors").is_file()
    second, tok2 = models.load_model_and_tokenizer(models.embedded_model_path())
    assert loads == ["gguf", "gguf", "folder"]
    # the config and the tokenizer alone come from the cache too, as the GGUF file gives them
    assert models.load_config(models.EMBEDDED_MODEL).to_dict() == gguf_config.to_dict()
    tok3 = models.load_tokenizer()
    assert tok3.name_or_path == tok1.name_or_path and tok3(["6 x 7 = 42"]).input_ids == tok1(["6 x 7 = 42"]).input_ids

    for model in (first, second):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.name_or_path == "" and getattr(model.config, "quantization_config", None) is None
        assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    public = [{k: v for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, torch.nn.Module)}
              for m in (plain, first, second)]  # the model's own attributes, as the GGUF load leaves them
    assert public[0].keys() == public[1].keys() == public[2].keys()
    assert models.loaded_from(first) == models.EMBEDDED_MODEL
    assert models.loaded_from(second) == str(models.embedded_model_path())
    ref = plain.state_dict()
    for model in (first, second):
        state = model.state_dict()
        assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    assert first.config.to_dict() == second.config.to_dict() == plain.config.to_dict()
    assert first.generation_config.to_dict() == second.generation_config.to_dict()
    validate_quantization_for_training(get_peft_model(second, LoraConfig(r=2, target_modules=["v_proj"])))
    texts = ["Natalia sold clips to 48 of her friends.\n#### 72<|im_end|>", " \t odd  spacing, ünïcode 😀"]
    assert tok1(texts).input_ids == tok2(texts).input_ids and tok1.pad_token == tok2.pad_token == tok1.eos_token
    assert tok1.all_special_tokens == tok2.all_special_tokens and tok1.name_or_path == tok2.name_or_path
    chat = [{"role": "user", "content": "What is 6 x 7?"}]
    assert tok1.apply_chat_template(chat, tokenize=False) == tok2.apply_chat_template(chat, tokenize=False)


def test_the_cache_is_keyed_by_file_and_dtype_and_can_be_turned_off(tmp_path, monkeypatch):
    """A cache folder belongs to one GGUF file (its size and time included), one dtype and the
    library versions; a folder whose record says otherwise is not read, a damaged one is removed
    (so that the load's own write replaces it), and so is the partial folder of a writer that was
    killed; ``FISHERLORA_CACHE=off``, or a home that cannot be found, reads and writes none."""
    from importlib.metadata import version

    from fisherlora import gguf_cache

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "c"))
    f32, ident = gguf_cache.folder_for(gguf, torch.float32)
    assert version("transformers") in ident and version("tokenizers") in ident and version("gguf") in ident
    assert f32.name.endswith("-float32") and gguf_cache.folder_for(gguf, torch.bfloat16)[0] != f32
    os.utime(gguf, ns=(0, 12345))
    assert gguf_cache.folder_for(gguf, torch.float32)[0] != f32
    f32, ident = gguf_cache.folder_for(gguf, torch.float32)
    kwargs = {"dtype": torch.float32, "local_files_only": True}
    assert gguf_cache.load(f32, ident, gguf, kwargs, True) == (None, None)  # nothing there
    assert gguf_cache.any_folder(gguf) is None
    f32.mkdir(parents=True)
    (f32 / "fisherlora-cache.json").write_text(json.dumps({"identity": ident[:-1] + ["torch.float16"]}))
    assert gguf_cache.load(f32, ident, gguf, kwargs, True) == (None, None)  # made for another dtype
    (f32 / "fisherlora-cache.json").write_text(json.dumps({"identity": ident, "config": {}}))
    assert gguf_cache.any_folder(gguf)[0] == f32  # config and tokenizer: any dtype's folder serves
    (f32 / "config.json").write_text("{not json")
    assert gguf_cache.load(f32, ident, gguf, kwargs, True) == (None, None)  # damaged: removed
    assert not f32.exists() and list(f32.parent.iterdir()) == []
    dead, alive = (f32.parent / f".{f32.name}.{pid}-1.partial" for pid in (2**22 + 1, os.getpid()))
    for folder in (dead, alive):
        folder.mkdir()
    gguf_cache.remove_abandoned(f32.parent)
    assert not dead.exists() and alive.exists()  # pids above 2**22 (the kernel's limit) never run
    for off in ("off", "0", "", "~no-such-user-here/cache"):
        monkeypatch.setenv(gguf_cache.CACHE_ENV, off)
        assert gguf_cache.cache_root() is None and gguf_cache.folder_for(gguf, torch.float32) is None
    monkeypatch.delenv(gguf_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "fisherlora"


@pytest.mark.slow
def test_a_damaged_cached_config_is_parsed_from_the_gguf_file_instead(tmp_path, monkeypatch):
    """A record whose own config is missing or unreadable: ``load_config`` parses the file."""
    from fisherlora import gguf_cache, models

    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "c"))
    folder, ident = gguf_cache.folder_for(models.embedded_model_path(), torch.float32)
    folder.mkdir(parents=True)
    for record in ({"identity": ident}, {"identity": ident, "gguf_config": {"model_type": "no-such-model"}}):
        (folder / "fisherlora-cache.json").write_text(json.dumps(record))
        assert models.load_config(models.EMBEDDED_MODEL).num_hidden_layers == 30
