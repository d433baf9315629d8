"""``fisherlora plan``: every memory mode's planned peak for a model built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

from fisherlora.flags import config_from_args

__all__ = ["run"]


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from fisherlora.models import meta_model_from_config
    from fisherlora.outdir import check_output_file
    from fisherlora.plan import GB, choose_mode, format_plan, plan_memory
    from fisherlora.quant import settings_from_flags

    cfg = config_from_args(args)
    if args.json and args.json != "-":
        check_output_file(args.json)
    model = meta_model_from_config(args.model)
    dtype = getattr(torch, args.dtype)
    plans = plan_memory(model, cfg.to_lora_config(), batch_size=cfg.batch_size, max_length=cfg.max_length,
                        dtype=dtype, stats_bytes=4 if cfg.stats_dtype == "float32" else 8,
                        bases_bytes=dtype.itemsize if cfg.bases_dtype == "model" else 4,
                        fisher_type=cfg.fisher_type.value, mc_samples=cfg.mc_samples,
                        quantisation=settings_from_flags(args), gradient=cfg.init.needs_gradient)
    if args.json:
        text = json.dumps({"model": str(args.model), "tokens": args.num_samples * args.max_length,
                           "plans": [p.to_dict() for p in plans]}, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.json != "-":
        table = Table(title=f"planned peak memory (GB) of {args.model}: batch {args.batch_size}×{args.max_length}, "
                            f"{args.dtype} weights, {args.num_samples} calibration sequences")
        for col in ("mode", "layer groups", "weights", "activations", "statistics", "SVD workspace", "total",
                    "peak phase"):
            table.add_column(col, justify="left" if col in ("mode", "peak phase") else "right")
        for row in format_plan(plans):
            table.add_row(*row)
        Console(width=120).print(table)
        if args.free_gb is not None:
            pick = choose_mode(plans, int(args.free_gb * GB))
            fits = pick.total <= args.free_gb * GB
            print(f"memory_mode=auto with {args.free_gb:g} GB free: {pick.label}, {pick.layer_groups} layer group(s), "
                  f"planned peak {pick.total / GB:.1f} GB" + ("" if fits else " — NOTHING FITS: this is the smallest "
                                                               "plan; lower --batch-size or --max-length"))
            words = init_flags(args, cfg, pick)
            print("the same plan with fisherlora init: " + " ".join(words))
            if MODEL_DIR in words:
                print(f"  ({MODEL_DIR}: the folder of your {args.model} model; {args.model!r} is a config without "
                      "weights, enough to plan but not to initialise)")
    return 0


#: what the printed ``init`` command says in place of a model that ``plan`` knew by its config alone
MODEL_DIR = "MODEL_DIR"


#: weight files ``from_pretrained`` reads from a model folder (sharded ones too)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")


def model_word(model) -> str:
    """``--model`` for ``init``, shell-quoted: the embedded model, a folder holding weight files
    (:data:`WEIGHT_PATTERNS`) or a ``.gguf`` file as given; anything known by its config alone (a
    bundled config's name, a ``config.json``, a folder with no weights) becomes :data:`MODEL_DIR`."""
    import shlex

    from fisherlora.models import EMBEDDED_MODEL

    path = Path(model)
    has_weights = (str(model) == EMBEDDED_MODEL or (path.suffix == ".gguf" and path.is_file())
                   or (path.is_dir() and any(next(path.glob(p), None) for p in WEIGHT_PATTERNS)))
    return shlex.quote(str(model)) if has_weights else MODEL_DIR


def init_flags(args, cfg, pick) -> list[str]:
    """The ``fisherlora init`` command line that runs the plan ``pick``: its mode and layer
    groups, the weights dtype, and every planned setting that differs from ``init``'s default."""
    import dataclasses
    import enum

    from fisherlora.config import FisherLoraConfig
    from fisherlora.flags import PLAN_FIELDS

    default = FisherLoraConfig()
    words = ["fisherlora", "init", "--model", model_word(args.model), "--memory-mode", pick.label,
             "--layer-groups", str(pick.layer_groups), "--dtype", args.dtype]
    for f in dataclasses.fields(FisherLoraConfig):
        value = getattr(cfg, f.name)
        if f.name not in PLAN_FIELDS or value == getattr(default, f.name):
            continue
        text = ",".join(value) if isinstance(value, list) else value.value if isinstance(value, enum.Enum) else value
        words += ["--" + f.name.replace("_", "-"), str(text)]
    if getattr(args, "load_in_8bit", False):  # a quantised base (docs/DESIGN.md §8)
        words.append("--load-in-8bit")
    elif getattr(args, "load_in_4bit", False):
        words += ["--load-in-4bit", "--bnb-4bit-quant-type", args.bnb_4bit_quant_type]
        words += ["--bnb-4bit-double-quant"] if args.bnb_4bit_double_quant else []
    return words

