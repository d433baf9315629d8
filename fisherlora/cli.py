"""The ``fisherlora`` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import warnings

from fisherlora.commands import convert as convert_cmd
from fisherlora.commands import init as init_cmd
from fisherlora.commands import merge as merge_cmd
from fisherlora.commands import plan as plan_cmd
from fisherlora.commands import report as report_cmd
from fisherlora.commands.init import SUMMARY_PHASE
from fisherlora.flags import PLAN_FIELDS, add_config_flags
from fisherlora.quant import add_flags as add_quantisation_flags

_EXAMPLES = """\
examples:
  fisherlora init                                   # embedded SmolLM2-135M on 128 GSM8K pairs, r=16
  fisherlora init --rank 8 --target-modules q_proj,v_proj --output out/qv-r8
  fisherlora init --model ./my-llama --data train.jsonl --prompt-field instruction --response-field output
  fisherlora init --data notes.txt --fisher-type true --mc-samples 2 --save-residual
  fisherlora report out/qv-r8
  fisherlora plan --model config.json --free-gb 24     # memory per mode for an 8B config, no weights

Loading, training, converting the result (on the ORIGINAL base, loaded as init loaded it):
  from fisherlora.data import load_model_and_tokenizer
  base, tok = load_model_and_tokenizer("smollm2-135m")      # or ("./my-llama"), or a .gguf file
  model = fisherlora.load(base, "out/qv-r8", is_trainable=True)   # rebuilds the residual; LoRA trainable
  # train it (transformers' Trainer, TRL's SFTTrainer: examples/), model.save_pretrained("trained"), then
  fisherlora convert out/qv-r8 trained -o plain             # plain LoRA (rank 2r) for the original base
  fisherlora merge out/qv-r8 --adapter trained -o merged    # a full model with the adapter merged in
  # or, with --save-residual, plain PEFT: PeftModel.from_pretrained(<out>/residual model, "<out>")

Offline: fisherlora reads local files only and sends no network request; it sets HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE to 1 for its own run.

Errors: one line on stderr, naming the phase that failed (and, out of memory, the memory mode and
what to try), and a non-zero exit status: 2 for refused input, 1 for a failed job, 130 when
interrupted (nothing is written then). Add --debug to any command for the full traceback.
"""


def _positive_gb(text: str) -> float:
    """``--free-gb``: a finite number of GB above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a positive number of GB is needed, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisherlora",
        description="Initialise LoRA adapters from the Fisher information of your own data (FILet, "
                    "arXiv 2605.01046). Kronecker-factored statistics A = E[aaᵀ] (layer inputs) and "
                    "G = E[ggᵀ] (output gradients) rank each weight's singular directions by their "
                    "Fisher energy (uᵀGu)(vᵀAv); the top r become the LoRA factors and the rest stays "
                    "in a residual base weight, so the model's outputs are unchanged at step 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the exception with its full traceback instead of one line")

    init = sub.add_parser("init", help="compute statistics, choose directions, write a PEFT adapter", parents=[common],
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
                          description="Run the calibration passes, the decomposition and write the adapter.")
    io = init.add_argument_group("model and data")
    io.add_argument("--model", default="smollm2-135m",
                    help="local transformers folder, a .gguf file, or 'smollm2-135m' (embedded, default)")
    io.add_argument("--data", default="gsm8k",
                    help="'gsm8k' (embedded test split, default), a local .jsonl/.json/.csv/.parquet/.txt file or "
                         "a save_to_disk folder; records: the prompt/response fields below, TRL's 'messages' (chat "
                         "template, loss on assistant turns) or 'prompt'/'completion', or 'text'")
    io.add_argument("--prompt-field", default="question",
                    help="prompt column of supervised pairs (default: %(default)s)")
    io.add_argument("--response-field", default="answer",
                    help="response column; the loss is taken on these tokens only (default: %(default)s)")
    io.add_argument("--text-field", default=None, help="plain-text column (loss on every token); overrides the pair")
    io.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    io.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="model dtype (default: float32 on CPU, bfloat16 on GPU); statistics stay float32")
    add_config_flags(init)
    add_quantisation_flags(init)
    out = init.add_argument_group("output")
    out.add_argument("--output", "-o", default="fisherlora-out",
                     help="output directory, written atomically at the end; checked before any work, symbolic "
                          "links followed (default: %(default)s)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an output directory that fisherlora wrote (it holds fisherlora.json); any "
                          "other non-empty directory, or one holding the working directory, is refused")
    out.add_argument("--save-residual", action="store_true",
                     help="also write the residual base model to <output>/residual (for plain PEFT users; "
                          "not with --load-in-4bit/--load-in-8bit: fisherlora.load rebuilds that residual)")
    out.add_argument("--save-statistics", action="store_true",
                     help="also write the K-FAC factors to <output>/statistics.safetensors")
    out.add_argument("--statistics", default=None,
                     help="reuse factors from a statistics.safetensors file instead of new calibration passes")
    out.add_argument("--quiet", action="store_true", help="no progress bars")

    plan = sub.add_parser(
        "plan", parents=[common],
        help="print each memory mode's planned peak memory for a model, without loading weights",
        description="Build the model on the meta device (nothing loaded or allocated) and print, per memory "
                    "mode and layer-group count, the planned peak memory: weights, activations of one batch, "
                    "statistics and SVD workspace (GB = 1e9 bytes). These need not coexist: the total is the "
                    "weights plus the largest phase of the run, named under 'peak phase'. The 'naive' row is "
                    "the baseline of one dense A and G per layer, for comparison; it is not a mode.")
    plan.add_argument("--model", default="smollm2-135m",
                      help="a config.json, a model folder, a .gguf file, 'smollm2-135m' (default) or a bundled "
                           "architecture: llama-3-8b, llama-2-7b, llama-3.2-1b")
    plan.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                      help="weights dtype (default: %(default)s, as on a GPU; `init` uses float32 on a CPU)")
    # init's own defaults: the plan is the one `fisherlora init` runs with the same flags
    add_config_flags(plan, PLAN_FIELDS, title="what is planned (FisherLoraConfig, init's defaults)")
    add_quantisation_flags(plan)
    plan.add_argument("--free-gb", type=_positive_gb, default=None, metavar="GB",
                      help="free device memory in GB (1e9 bytes), a positive number: also say which mode "
                           "`auto` picks for this budget")
    plan.add_argument("--json", default=None, help="write the plan as JSON to this file ('-' for stdout)")

    rep = sub.add_parser("report", help="print the summary of an output directory", parents=[common])
    rep.add_argument("output", help="a directory written by `fisherlora init`")
    convert_cmd.add_parser(sub, [common])
    merge_cmd.add_parser(sub, [common])
    return parser


#: the Hugging Face libraries' own offline switches: the command reads local files only, so it sets
#: them for its run (before those libraries are imported), whatever the caller's environment says
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

#: loggers that warn only because of that switch: importing PEFT imports bitsandbytes, which (on a
#: CPU with AVX512-BF16) asks the Hub for an optional CPU 4-bit kernel through ``kernels``; offline,
#: ``kernels`` warns that it skipped a trust check and bitsandbytes that it fell back to its own
#: kernel. The command chose offline mode, so those two warnings are not the user's news.
OFFLINE_NOISE = ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops")


@contextlib.contextmanager
def _offline():
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    levels = {name: logging.getLogger(name).level for name in OFFLINE_NOISE}
    os.environ.update(OFFLINE_ENV)
    for name in OFFLINE_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _warnings_as_lines(command: str, debug: bool):
    """For the command's run only (restored on exit): each warning is ONE line on stderr,
    ``fisherlora <command>: warning: ...`` (not Python's file, line and source line), and the
    libraries' deprecation notices (``FutureWarning``, ``DeprecationWarning``: about their own
    APIs, nothing the command's user can act on) are not shown. ``--debug`` keeps Python's format."""
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)

            def one_line(message, category, filename, lineno, file=None, line=None):
                print(f"fisherlora {command}: warning: " + " ".join(str(message).split()), file=sys.stderr)

            warnings.showwarning = one_line
        yield


#: errors in what the user gave (exit status 2, as for a bad flag); any other failure exits with 1
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               FloatingPointError)
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError``, ``MemoryError``, and the ``RuntimeError``/``OSError``
    that allocators raise when memory runs out (the CPU allocator's "can't allocate memory",
    ``ENOMEM``)."""
    import torch

    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))):
        return True
    return isinstance(exc, (RuntimeError, OSError)) and any(w in str(exc).lower() for w in _OOM_WORDS)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def error_line(command: str, exc: BaseException, args) -> str:
    """The one line that stands for ``exc`` on stderr: what failed, in which phase
    (:func:`fisherlora.phases.failed_phase`) and, for out of memory, what to try."""
    from fisherlora.phases import failed_phase

    where = failed_phase(exc)
    if isinstance(exc, KeyboardInterrupt):
        done = command != "init" or where == SUMMARY_PHASE
        return (f"fisherlora {command}: interrupted" + (f" during {where}" if where else "")
                + ("" if done else "; nothing was written"))
    if isinstance(exc, USER_ERRORS) and not is_out_of_memory(exc):
        return f"fisherlora {command}: error: " + " ".join(str(exc).split())
    during = f" during {where}" if where else ""
    if is_out_of_memory(exc):
        known = not hasattr(args, "memory_mode") or (where and "memory_mode=" in where)
        mode = "" if known else f" (--memory-mode {args.memory_mode})"
        detail = _first_line(exc).rstrip(".")
        return (f"fisherlora {command}: error: out of memory{during}{mode}" + (f": {detail}" if detail else "")
                + f"; try --memory-mode projected, or more --layer-groups (now {getattr(args, 'layer_groups', 1)}),"
                  " or a smaller --batch-size or --max-length (--debug shows the traceback)")
    name, detail = type(exc).__name__.lstrip("_"), _first_line(exc)
    return (f"fisherlora {command}: error{during}: {name}" + (f": {detail}" if detail else "")
            + " (--debug shows the traceback)")


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that an unknown flag after a command is reported by that
    command's parser (its usage, not the top-level one) with the closest flag it has."""
    import difflib

    args, extra = parser.parse_known_args(argv)
    if extra:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        command = commands[args.command]
        flags = [s for a in command._actions for s in a.option_strings if s.startswith("--")]
        hints = [close[0] for word in extra if word.startswith("-")
                 for close in [difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)] if close]
        command.error(f"unrecognized arguments: {' '.join(extra)}"
                      + (f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""))
    return args


def main(argv=None) -> int:
    """The command's entry point: sets :data:`OFFLINE_ENV` for the run (restored on return).

    Every failure is one line on stderr (:func:`error_line`) and a non-zero exit status: 2 for
    input that was refused (:data:`USER_ERRORS`), 1 for a job that failed, 130 for an interrupt;
    ``--debug`` lets the exception and its traceback through instead.
    """
    with _offline():
        parser = build_parser()
        args = parse(parser, argv)
        handler = {"init": init_cmd.run, "plan": plan_cmd.run, "report": report_cmd.run, "convert": convert_cmd.run,
                   "merge": merge_cmd.run}[args.command]
        try:
            with _warnings_as_lines(args.command, args.debug):
                return handler(args)
        except (Exception, KeyboardInterrupt) as exc:
            if args.debug:
                raise
            print(error_line(args.command, exc, args), file=sys.stderr)
            if isinstance(exc, KeyboardInterrupt):
                return 130
            return 2 if isinstance(exc, USER_ERRORS) and not is_out_of_memory(exc) else 1


if __name__ == "__main__":
    sys.exit(main())
