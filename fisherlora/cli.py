"""The ``fisherlora`` command."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

from fisherlora.flags import add_config_flags, config_from_args
from fisherlora.quant import add_flags as add_quantisation_flags
from fisherlora.quant import bitsandbytes_config, settings_from_flags

#: the config fields `fisherlora plan` reads
PLAN_FIELDS = ("rank", "target_modules", "num_samples", "max_length", "batch_size", "stats_dtype", "bases_dtype",
               "fisher_type", "mc_samples")

_EXAMPLES = """\
examples:
  fisherlora init                                   # embedded SmolLM2-135M on 128 GSM8K pairs, r=16
  fisherlora init --rank 8 --target-modules q_proj,v_proj --output out/qv-r8
  fisherlora init --model ./my-llama --data train.jsonl --prompt-field instruction --response-field output
  fisherlora init --data notes.txt --fisher-type true --mc-samples 2 --save-residual
  fisherlora report out/qv-r8
  fisherlora plan --model config.json --free-gb 24     # memory per mode for an 8B config, no weights

Loading the result:
  base = AutoModelForCausalLM.from_pretrained(...)          # the ORIGINAL base model
  model = fisherlora.load(base, "out/qv-r8")                # rebuilds the residual weights
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
                    help="'gsm8k' (embedded test split, default) or a local .jsonl/.json/.csv/.parquet/.txt file")
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
                     help="also write the residual base model to <output>/residual (for plain PEFT users)")
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
    add_config_flags(plan, PLAN_FIELDS, defaults={"bases_dtype": "model"}, title="what is planned (FisherLoraConfig)")
    add_quantisation_flags(plan)
    plan.add_argument("--free-gb", type=_positive_gb, default=None, metavar="GB",
                      help="free device memory in GB (1e9 bytes), a positive number: also say which mode "
                           "`auto` picks for this budget")
    plan.add_argument("--json", default=None, help="write the plan as JSON to this file ('-' for stdout)")

    rep = sub.add_parser("report", help="print the summary of an output directory", parents=[common])
    rep.add_argument("output", help="a directory written by `fisherlora init`")
    return parser


def _print_summary(report: dict, out_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    from fisherlora.report import summary_rows

    table = Table(title=f"fisherlora → {out_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_rows(report):
        table.add_row(k, v)
    Console(stderr=False).print(table)


def cmd_init(args) -> int:
    import warnings

    import torch

    # library deprecation chatter that users cannot act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    from fisherlora import data as fdata
    from fisherlora.initialize import initialize_fisher_lora
    from fisherlora.memory import peak_memory_mb
    from fisherlora.outdir import check_output_dir
    from fisherlora.phases import phase
    from fisherlora.statistics import FisherStatistics

    # everything that can be checked without the model is checked before loading it
    config = config_from_args(args)
    out_dir = check_output_dir(args.output, overwrite=args.overwrite)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: this torch has no CUDA device")
    from fisherlora.ops import available_backends

    if config.backend != "auto" and config.backend not in available_backends(device):
        raise ValueError(f"--backend {config.backend!r} is not available on {device.type} here; "
                         f"available: {available_backends(device)}")
    auto_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto_dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    bnb_config = bitsandbytes_config(args, dtype)  # a GGUF model refused here, before any work (§8)
    timings = {}
    t0 = time.perf_counter()
    stats, records, batches, n_seq = None, None, None, None
    with phase("reading the calibration data" if not args.statistics else "reading the statistics"):
        if args.statistics:
            stats = FisherStatistics.load(args.statistics, device=device)
        else:
            records = fdata.load_records(args.data, num_samples=config.num_samples, seed=config.seed,
                                         prompt_field=args.prompt_field, response_field=args.response_field,
                                         text_field=args.text_field)
    timings["data"] = time.perf_counter() - t0
    with phase("checking the targets on the model's config"):
        _check_targets_on_config(args.model, config)
    t0 = time.perf_counter()
    # --quiet also hides the bars that libraries draw with tqdm directly (GGUF de-quantisation);
    # errors still raise
    with phase(f"loading the model ({str(dtype).removeprefix('torch.')} on {device})"), \
            contextlib.redirect_stderr(io.StringIO()) if args.quiet else contextlib.nullcontext():
        model, tok = fdata.load_model_and_tokenizer(args.model, dtype=dtype, device=device,
                                                    quantization_config=bnb_config)
    timings["load model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if records is not None:
        with phase("tokenising the calibration data"):
            cal = fdata.tokenize_records(records, tok, max_length=config.max_length, prompt_field=args.prompt_field,
                                         response_field=args.response_field, text_field=args.text_field)
            # a list: each layer group makes its own pass over the same batches
            batches, n_seq = list(fdata.calibration_batches(cal, tok, config.batch_size)), len(cal)
    timings["data"] += time.perf_counter() - t0
    with phase(f"the initialisation (memory_mode={config.memory_mode.value})"):
        result = initialize_fisher_lora(model, None, batches, config, statistics=stats, num_batches=n_seq,
                                        progress=not args.quiet)
    result.timings = {**timings, **result.timings}
    result.extra.update({"model": str(args.model), "data": str(args.statistics or args.data), "device": str(device),
                    "dtype": str(dtype).removeprefix("torch.")})
    result.peak_memory_mb = peak_memory_mb(device)
    with phase(f"writing the output directory {str(out_dir)!r}"):
        result.save(out_dir, overwrite=args.overwrite, save_statistics=args.save_statistics,
                    residual=args.save_residual, tokenizer=tok)
    with phase(_SUMMARY):
        _print_summary(result.report(), out_dir)
    return 0


def _check_targets_on_config(model: str, config) -> None:
    """Refuse bad targets and ranks before the weights are loaded: the target discovery and the
    rank check that the initialisation runs, on the model built from its config on the meta device
    (:func:`fisherlora.models.meta_model_from_config`: no weights, about a second). A model whose
    config cannot be built that way is left to the load, which reports its own error.

    Raises:
        ValueError: the targets match nothing (or a non-linear layer), or a rank exceeds a layer's.
    """
    from fisherlora.layers import check_ranks, find_target_modules, layer_shape, ranks_and_scalings
    from fisherlora.models import meta_model_from_config

    try:
        meta = meta_model_from_config(model)
    except Exception:  # a missing path, a config transformers cannot build without its code: the load says
        return
    lora_config = config.to_lora_config()
    modules = find_target_modules(meta, lora_config)
    check_ranks({n: layer_shape(m) for n, m in modules.items()},
                {n: r for n, (r, _) in ranks_and_scalings(lora_config, list(modules)).items()})


def cmd_plan(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from fisherlora.models import meta_model_from_config
    from fisherlora.outdir import check_output_file
    from fisherlora.plan import GB, choose_mode, format_plan, plan_memory

    cfg = config_from_args(args)
    if args.json and args.json != "-":
        check_output_file(args.json)
    model = meta_model_from_config(args.model)
    dtype = getattr(torch, args.dtype)
    plans = plan_memory(model, cfg.to_lora_config(), batch_size=cfg.batch_size, max_length=cfg.max_length,
                        dtype=dtype, stats_bytes=4 if cfg.stats_dtype == "float32" else 8,
                        bases_bytes=dtype.itemsize if cfg.bases_dtype == "model" else 4,
                        fisher_type=cfg.fisher_type.value, mc_samples=cfg.mc_samples,
                        quantisation=settings_from_flags(args))
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
    return 0


def cmd_report(args) -> int:
    path = Path(args.output) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist: not a fisherlora output directory")
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
            raise ValueError("it is not a fisherlora report (no list of layers)")
        _print_summary(report, args.output)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{str(path)!r} cannot be read as a fisherlora report: {exc}") from None
    return 0


#: the Hugging Face libraries' own offline switches: the command reads local files only, so it sets
#: them for its run (before those libraries are imported), whatever the caller's environment says
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def _offline():
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: errors in what the user gave (exit status 2, as for a bad flag); any other failure exits with 1
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               FloatingPointError)
_SUMMARY = "printing the summary"
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
        done = command != "init" or where == _SUMMARY
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


def main(argv=None) -> int:
    """The command's entry point: sets :data:`OFFLINE_ENV` for the run (restored on return).

    Every failure is one line on stderr (:func:`error_line`) and a non-zero exit status: 2 for
    input that was refused (:data:`USER_ERRORS`), 1 for a job that failed, 130 for an interrupt;
    ``--debug`` lets the exception and its traceback through instead.
    """
    with _offline():
        parser = build_parser()
        args = parser.parse_args(argv)
        handler = {"init": cmd_init, "plan": cmd_plan, "report": cmd_report}[args.command]
        try:
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
