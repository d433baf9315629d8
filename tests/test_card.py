"""What travels with an output directory: no path of this machine in any file that names the model
or the data, a stable adapter_config.json with its task type, and a model card that is filled in."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import fisherlora
from fisherlora.card import portable_name
from tests.models import CFG, batches, save_tiny_model

TRAVELLING = ("adapter_config.json", "fisherlora.json", "README.md", "report.json", "report.md")


@pytest.mark.parametrize("given, expected", [
    ("smollm2-135m", "smollm2-135m"),
    ("gsm8k", "gsm8k"),
    ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),  # a hub id, kept
    ("/nowhere/models/my-llama", "my-llama"),  # an absolute path that does not exist here
    ("/nowhere/models/my-llama/", "my-llama"),  # a trailing slash
    ("./data/train.jsonl", "train.jsonl"),
    ("~/x/y/notes.txt", "notes.txt"),
    (None, None),
])
def test_portable_names_of_names_and_paths(given, expected):
    assert portable_name(given) == expected


def test_the_embedded_model_file_is_named_by_its_name():
    from fisherlora.models import embedded_model_path

    try:
        path = embedded_model_path()
    except FileNotFoundError:
        pytest.skip("the embedded model is not installed")
    assert portable_name(path) == portable_name(str(path)) == "smollm2-135m"


def machine_paths(tmp_path) -> list[str]:
    """Strings that only this machine's files would hold."""
    return [str(tmp_path), str(Path(sys.prefix)), str(Path.cwd()), "site-packages", os.path.expanduser("~")]


def test_saved_files_travel(tmp_path):
    from peft import PeftModel, PeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "models" / "my-llama")
    data = tmp_path / "data" / "train.jsonl"
    model = AutoModelForCausalLM.from_pretrained(str(folder.resolve()), dtype=torch.float32)
    assert str(tmp_path) in model.name_or_path
    result = fisherlora.initialize_fisher_lora(model, None, batches(), CFG, progress=False)
    result.extra.update(model=str(folder.resolve()) + "/", data=str(data))  # as the command records them
    assert isinstance(result.model, PeftModelForCausalLM)
    out = result.save(tmp_path / "out")
    for name in TRAVELLING:
        text = (out / name).read_text()
        for p in machine_paths(tmp_path):
            assert p not in text, f"{name} holds {p!r}"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "my-llama" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) and len(cfg["target_modules"]) == 14
    meta = json.loads((out / "fisherlora.json").read_text())
    assert (meta["base_model"], meta["data"], meta["dtype"]) == ("my-llama", "train.jsonl", "float32")
    card = (out / "README.md").read_text()
    for words in ("base_model: my-llama", "`train.jsonl`", "6 sequences", "rank allocation", "q_proj: r=4",
                  "down_proj: r=4", "is_trainable=True", "fisherlora convert", "fisherlora merge", "twice the rank",
                  "AutoModelForCausalLM.from_pretrained(\"my-llama\""):
        assert words in card, words
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32),
                                       str(out))
    assert isinstance(loaded, PeftModelForCausalLM)
    # the same adapter written twice is the same file, byte for byte
    again = fisherlora.initialize_fisher_lora(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32),
                                              None, batches(), CFG, progress=False)
    again.extra.update(model=str(folder), data=str(data))
    out2 = again.save(tmp_path / "out2")
    assert (out2 / "adapter_config.json").read_text() == (out / "adapter_config.json").read_text()


@pytest.mark.parametrize("start", ["filet", "gradient", "natural_gradient"])
def test_the_card_describes_the_start_that_made_the_adapter(start):
    """A gradient start's card says where its factors came from and drops the filet-only settings
    (score, magnitude) and figures (Fisher energy captured, PiSSA overlap), which do not apply."""
    from fisherlora.card import model_card

    report = {"config": {"init": start, "fisher_type": "empirical", "score": "fisher", "magnitude": "top_sigma",
                         "damping": 0.0, "alpha": 32, "target_modules": ["q_proj"]},
              "layers": [{"name": "model.layers.0.self_attn.q_proj", "rank": 16}], "num_layers": 1,
              "mean_energy_captured": 0.156, "mean_pissa_overlap": 1.0}
    card = model_card(report, "smollm2-135m", "gsm8k")
    filet = start == "filet"
    assert ("ranked by their Fisher energy" in card) is filet
    assert ("score `fisher`, magnitude `top_sigma`" in card) is filet
    assert ("PiSSA's top-r" in card) is filet
    assert ("Fisher energy captured" in card) is filet
    assert (f"`init={start}`" in card) is not filet
    assert ("whitened" in card) is (start == "natural_gradient")
    assert "15.6%" in card and "fisherlora.load" in card and "W + s·BA" in card
