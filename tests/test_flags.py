"""Command-line flags come from FisherLoraConfig's fields, one spelling for every command."""

import argparse
import dataclasses

import pytest

from fisherlora import FisherLoraConfig, cli
from fisherlora.flags import add_config_flags, config_from_args, parse_target_modules


def _actions(parser, name):
    return [a for a in parser._actions if a.dest == name]


def _subparser(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_init_has_a_flag_for_every_config_field_and_plan_shares_its_fields_spelling():
    init, plan = _subparser("init"), _subparser("plan")
    for f in dataclasses.fields(FisherLoraConfig):
        (action,) = _actions(init, f.name)
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert f.metadata["help"] in action.help
    for name in cli.PLAN_FIELDS:
        (a,), (b,) = _actions(init, name), _actions(plan, name)
        assert (a.option_strings, a.type, a.choices) == (b.option_strings, b.type, b.choices)


@pytest.mark.parametrize("text, parsed", [
    ("all-linear", "all-linear"), ("q_proj, v_proj", ["q_proj", "v_proj"]), (r".*\.(q|v)_proj", r".*\.(q|v)_proj")])
def test_target_modules_are_a_list_or_a_regex(text, parsed):
    assert parse_target_modules(text) == parsed


def test_values_are_validated_by_the_config_naming_the_field():
    p = argparse.ArgumentParser()
    add_config_flags(p, ["batch_size", "memory_mode"], defaults={"memory_mode": "projected"})
    args = p.parse_args([])
    assert config_from_args(args).memory_mode.value == "projected"
    with pytest.raises(ValueError, match="^--batch-size must be a positive integer, got -4$"):
        config_from_args(p.parse_args(["--batch-size", "-4"]))
    # a field set from Python (not from a flag) keeps the config's own name
    with pytest.raises(ValueError, match="^FisherLoraConfig.rank must be a positive integer"):
        config_from_args(args, rank=0)
    with pytest.raises(SystemExit):
        p.parse_args(["--memory-mode", "tiny"])
    with pytest.raises(ValueError, match="not FisherLoraConfig fields"):
        add_config_flags(argparse.ArgumentParser(), ["batch"])


def test_an_unknown_flag_gets_the_commands_usage_and_the_closest_flag(capsys):
    """``fisherlora init --rnak 8`` printed the top-level usage; it is ``init``'s, with ``--rank``."""
    with pytest.raises(SystemExit) as info:
        cli.main(["init", "--rnak", "8"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "usage: fisherlora init" in err and "unrecognized arguments: --rnak 8 (did you mean --rank?)" in err, err
    with pytest.raises(SystemExit):
        cli.main(["plan", "--free-gbs", "12"])
    assert "usage: fisherlora plan" in capsys.readouterr().err
