"""Command-line flags generated from :class:`~fisherlora.config.FisherLoraConfig`'s fields: one
flag per field, with the field's help text, type, choices and default, so that every command
(``fisherlora init``, ``fisherlora plan``) and every benchmark script spells and validates a
setting the same way."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
from collections.abc import Iterable

from fisherlora.config import FisherLoraConfig

__all__ = ["PLAN_FIELDS", "add_config_flags", "config_from_args", "flag_name", "parse_target_modules"]

_REGEX_CHARS = set("*+?[]()|\\^$")

#: the config fields ``fisherlora plan`` reads (with ``init``'s defaults)
PLAN_FIELDS = ("init", "rank", "target_modules", "num_samples", "max_length", "batch_size", "stats_dtype",
               "bases_dtype", "fisher_type", "mc_samples")


def flag_name(field: str) -> str:
    """The command-line flag of a ``FisherLoraConfig`` field: ``rank_allocation`` -> ``--rank-allocation``."""
    return "--" + field.replace("_", "-")


def parse_target_modules(text: str) -> str | list[str]:
    """``--target-modules`` as ``LoraConfig`` takes it: ``"all-linear"`` and anything holding a
    regex character stay one string (a regex over full names); otherwise a comma-separated list
    of module names (``"q_proj,v_proj"`` -> ``["q_proj", "v_proj"]``)."""
    if text == "all-linear" or _REGEX_CHARS & set(text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def add_config_flags(parser: argparse.ArgumentParser, fields: Iterable[str] | None = None, *,
                     defaults: dict | None = None, title: str = "method (FisherLoraConfig)") -> None:
    """Add ``--field-name`` for each ``FisherLoraConfig`` field (all, or those named in
    ``fields``) to ``parser``, in one argument group.

    Args:
        defaults: field name -> default to use instead of the config's own (a benchmark that
            runs in the projected mode by default, say).

    Raises:
        ValueError: a name in ``fields`` or ``defaults`` that is not a config field.
    """
    known = {f.name: f for f in dataclasses.fields(FisherLoraConfig)}
    wanted = list(known) if fields is None else list(fields)
    unknown = sorted(set(wanted) - set(known) | set(defaults or {}) - set(known))
    if unknown:
        raise ValueError(f"not FisherLoraConfig fields: {unknown}")
    group = parser.add_argument_group(title)
    for name in wanted:
        f = known[name]
        flag = flag_name(name)
        default = (defaults or {}).get(name, f.default)
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = parse_target_modules if name == "target_modules" else type(f.default)
        if isinstance(f.default, enum.Enum):
            kind, choices = str, [m.value for m in type(f.default)]
            default = type(f.default)(default).value
        group.add_argument(flag, type=kind, choices=choices, default=default,
                           help=f"{help_text} (default: {default})")


def config_from_args(args: argparse.Namespace, **overrides) -> FisherLoraConfig:
    """The :class:`FisherLoraConfig` of the parsed ``args`` (fields without a flag keep their
    defaults; ``overrides`` win).

    Raises:
        ValueError: an invalid value, in the command's words: the config's own validation with each
            field that came from a flag named by that flag (``--rank must be a positive integer``).
    """
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(FisherLoraConfig) if hasattr(args, f.name)}
    kwargs.update(overrides)
    try:
        return FisherLoraConfig(**kwargs)
    except ValueError as exc:
        def as_flag(m: re.Match) -> str:
            name = m.group(1)
            return flag_name(name) if hasattr(args, name) and name not in overrides else m.group(0)

        raise ValueError(re.sub(r"FisherLoraConfig\.(\w+)", as_flag, str(exc))) from None
