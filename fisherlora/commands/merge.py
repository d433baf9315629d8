"""``fisherlora merge``: the model with a (trained) fisherlora adapter merged in, as a plain
``transformers`` folder."""

from __future__ import annotations

import argparse

from fisherlora.commands.convert import add_base_flags, load_recorded_base

__all__ = ["add_parser", "run"]


def add_parser(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="write the model with the adapter merged in (a plain transformers folder)",
                       description="Rebuild the residual base from the ORIGINAL base, apply the trained adapter "
                                   "(or the initial one) and merge it: W_res + s·BA, saved with the tokenizer.",
                       epilog="example:\n  fisherlora merge fisherlora-out --adapter trained -o merged\n"
                              "  AutoModelForCausalLM.from_pretrained(\"merged\")")
    p.add_argument("init", help="the output directory of `fisherlora init` (read only)")
    p.add_argument("--adapter", default=None, help="the trained adapter (default: the initial one, i.e. the base)")
    add_base_flags(p)
    return p


def run(args) -> int:
    from fisherlora.export import merge
    from fisherlora.phases import phase

    base, tok = load_recorded_base(args)
    with phase("merging the adapter"):
        out = merge(base, args.init, args.output, adapter_dir=args.adapter, tokenizer=tok, overwrite=args.overwrite)
    print(f"merged model written to {str(out)!r}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
