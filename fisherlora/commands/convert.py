"""``fisherlora convert``: a trained adapter as a plain LoRA (rank 2r) for the ORIGINAL base, and the
loading of that base as ``fisherlora init`` recorded it (shared with ``fisherlora merge``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser", "load_recorded_base", "run"]

HELP = """\
The trained model computes W_res + s·BA, where W_res = W − s·B₀A₀ is the residual base that
fisherlora.load rebuilds. On the ORIGINAL base W that is a LoRA holding both the trained and the
initial factors, B' = [B | −B₀] and A' = [A ; A₀]: rank 2r, lora_alpha doubled so the scaling
stays (PEFT's path_initial_model_for_weight_conversion, as for PiSSA). The initialisation folder
is only read; the output is written atomically. Load the result without fisherlora:
  PeftModel.from_pretrained(base, "plain")

example:
  fisherlora convert fisherlora-out trained -o plain
"""


def add_parser(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="a trained adapter -> a plain LoRA (rank 2r) for the original base",
                       description="Convert an adapter trained from a fisherlora initialisation into a plain "
                                   "LoRA for the ORIGINAL base model.", epilog=HELP)
    p.add_argument("init", help="the output directory of `fisherlora init` (read only)")
    p.add_argument("adapter", help="the trained adapter (a PEFT folder saved with model.save_pretrained)")
    add_base_flags(p)
    return p


def add_base_flags(p) -> None:
    """``--output``, ``--overwrite``, ``--model``, ``--device`` of ``convert`` and ``merge``."""
    p.add_argument("--output", "-o", required=True, help="output directory, written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that fisherlora wrote")
    p.add_argument("--model", default=None,
                   help="the ORIGINAL base model (default: the one recorded in <init>/fisherlora.json, which is "
                        "enough for the embedded smollm2-135m; a local folder is recorded by its name only)")
    p.add_argument("--device", default="cpu", help="where the base is loaded (default: %(default)s)")


def load_recorded_base(args, tokenizer: bool = True):
    """The original base and its tokenizer (None with ``tokenizer=False``: a conversion reads only
    weights), in the dtype ``init`` used (``fisherlora.json``), after the output path and the init
    folder have been checked."""
    import torch

    from fisherlora.data import load_model_and_tokenizer
    from fisherlora.export import check_output, recorded_base
    from fisherlora.phases import phase

    check_output(args.output, args.overwrite, args.init, args.adapter)
    name, dtype = recorded_base(args.init)
    model = args.model or name
    if not model:
        raise ValueError(f"{args.init!r} records no base model: give --model")
    with phase(f"loading the base model {model!r} ({dtype})"):
        return load_model_and_tokenizer(model, dtype=getattr(torch, dtype), device=torch.device(args.device),
                                        tokenizer=tokenizer)


def run(args) -> int:
    from fisherlora.export import convert
    from fisherlora.phases import phase

    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{args.adapter!r} is not a PEFT adapter directory (no adapter_config.json)")
    base, _ = load_recorded_base(args, tokenizer=False)
    with phase("converting to a plain LoRA"):
        out = convert(base, args.init, args.adapter, args.output, overwrite=args.overwrite)
    cfg = json.loads((out / "adapter_config.json").read_text())
    print(f"plain LoRA for the original base written to {str(out)!r}: rank {cfg['r']} (twice the trained rank: "
          f"it holds [B | -B0] and [A ; A0]), lora_alpha {cfg['lora_alpha']:g}. Load it with "
          f"PeftModel.from_pretrained(base, {str(out)!r}).")
    return 0
