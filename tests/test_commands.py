"""The subcommands on a tiny local model (fast): `convert` and `merge` after a stand-in for training."""

import json

import pytest
import torch
from peft import PeftModel

import fisherlora
from fisherlora import cli
from tests.models import assert_logits_close, logits, probe, save_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def init_cmd(tmp_path, model, data_rows, *extra, name="data.jsonl"):
    data = tmp_path / name
    data.write_text("\n".join(json.dumps(r) for r in data_rows))
    return ["init", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
            "--num-samples", "4", "--max-length", "32", "--rank", "2", "--backend", "torch", "--quiet", *extra]


PAIRS = [{"question": f"what is {i} + {i}?", "answer": f"{2 * i}"} for i in range(4)]


def test_convert_and_merge_commands_give_the_trained_model(tmp_path, tiny_model, capsys):
    assert cli.main(init_cmd(tmp_path, tiny_model, PAIRS)) == 0
    out = tmp_path / "out"
    model = fisherlora.load(base(tiny_model), out, is_trainable=True)
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    want = logits(model, probe())
    model.save_pretrained(tmp_path / "trained")
    capsys.readouterr()
    # the recorded base is the folder's name only: without --model it is not found here, one line
    assert cli.main(["convert", str(out), str(tmp_path / "trained"), "-o", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'model'" in err[0] and "does not exist" in err[0], err
    rc = cli.main(["convert", f"{out}/", f"{tmp_path / 'trained'}/", "-o", str(tmp_path / "plain"),
                   "--model", str(tiny_model)])
    said = capsys.readouterr().out
    assert rc == 0 and "rank 4 (twice the trained rank" in said, said
    assert_logits_close(want, logits(PeftModel.from_pretrained(base(tiny_model), str(tmp_path / "plain")), probe()),
                        "fisherlora convert, loaded with PEFT on a fresh base")
    assert cli.main(["merge", str(out), "--adapter", str(tmp_path / "trained"), "-o", str(tmp_path / "merged"),
                     "--model", str(tiny_model)]) == 0
    assert_logits_close(want, logits(base(tmp_path / "merged"), probe()), "fisherlora merge")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_convert_needs_no_tokenizer(tmp_path, tiny_model, capsys):
    """Issue 30 §6: ``convert --model <a folder with weights and no tokenizer>`` exited 2 with a
    tokenizer backend error; a conversion reads only the weights."""
    import shutil

    assert cli.main(init_cmd(tmp_path, tiny_model, PAIRS)) == 0
    weights = tmp_path / "weights-only"
    weights.mkdir()
    for f in tiny_model.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, weights / f.name)
    model = fisherlora.load(base(weights), tmp_path / "out", is_trainable=True)
    model.save_pretrained(tmp_path / "trained")
    capsys.readouterr()
    rc = cli.main(["convert", str(tmp_path / "out"), str(tmp_path / "trained"), "-o", str(tmp_path / "plain"),
                   "--model", str(weights)])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "plain" / "adapter_config.json").is_file()


def test_help_names_the_workflow():
    text = cli.build_parser().format_help()
    assert 'load_model_and_tokenizer("smollm2-135m")' in text and "is_trainable=True" in text
    assert "fisherlora convert" in text and "fisherlora merge" in text
    conv = cli.build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    assert "rank 2r" in conv and "[B | −B₀]" in conv


def test_plan_shares_init_defaults_and_prints_the_init_flags_of_its_choice(capsys):
    from fisherlora.flags import PLAN_FIELDS

    init = cli.build_parser().parse_args(["init"])
    plan = cli.build_parser().parse_args(["plan"])
    assert {f: getattr(plan, f) for f in PLAN_FIELDS} == {f: getattr(init, f) for f in PLAN_FIELDS}
    assert cli.main(["plan", "--model", "llama-3-8b", "--free-gb", "24", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "with 24 GB free: projected, 8 layer group(s)" in out  # float32 bases, as init holds them
    assert ("the same plan with fisherlora init: fisherlora init --model MODEL_DIR --memory-mode projected "
            "--layer-groups 8 --dtype bfloat16 --rank 8\n") in out
    assert "(MODEL_DIR: the folder of your llama-3-8b model; 'llama-3-8b' is a config without weights" in out


def test_plans_printed_init_command_keeps_a_model_that_init_can_load(capsys, tmp_path):
    """A folder with weights or the embedded model is kept (shell-quoted); a config file, or a folder
    holding only one, is not a model init could load."""
    import shutil

    from fisherlora.models import CONFIGS_DIR

    folder = tmp_path / "my model"  # a space, quoted in the printed command
    folder.mkdir()
    shutil.copy(CONFIGS_DIR / "llama-3.2-1b.json", folder / "config.json")
    config_only = tmp_path / "config-only"
    shutil.copytree(folder, config_only)
    (folder / "model.safetensors").write_bytes(b"")
    for model, word in ((str(folder), f"'{folder}'"), ("smollm2-135m", "smollm2-135m"),
                        (str(folder / "config.json"), "MODEL_DIR"), (str(config_only), "MODEL_DIR")):
        assert cli.main(["plan", "--model", model, "--free-gb", "24"]) == 0
        out = capsys.readouterr().out
        assert f"fisherlora init --model {word} --memory-mode" in out, out[-1500:]


def test_every_fixed_choice_flag_lists_its_choices_and_magnitude_explains_its_values():
    init = cli.build_parser()._subparsers._group_actions[0].choices["init"]
    actions = {a.dest: a for a in init._actions}
    for name in ("stats_dtype", "bases_dtype", "backend", "magnitude", "memory_mode", "fisher_type", "score"):
        assert actions[name].choices, name
    text = " ".join(init.format_help().split())
    for words in ("'sigma' (its own σ_i", "'top_sigma' (the r largest σ", "'energy' (the 'sigma' adapter's norm"):
        assert words in text, words
