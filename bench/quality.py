"""Does the fine-tuned model get better? LoRA initialisers compared on GSM8K by held-out loss after training.

Task: SmolLM2-135M-Instruct (embedded) fine-tuned with LoRA (r = 16, alpha = 16, all seven
projections) on GSM8K from the embedded data (``data/gsm8k/test.jsonl``, 1,319 pairs, no
shuffling): pairs ``[0, train_pairs)`` train, the last ``val_pairs`` of ``[0, 1000)`` are the
validation split that picks each method's learning rate, and ``[1000, 1319)`` are held out
(the first ``eval_pairs`` evaluated) and never enter a choice. Calibration: ``calib_pairs`` pairs
of the train split (seed-0 order). Pairs are ``question + "\\n" + answer + eos`` (``--chat-template``
for the chat template); the loss is on the answer tokens.

Measured (``bench/quality_loop.py``, ``bench/quality_stats.py``): held-out answer-token loss at
``eval_points`` steps (curves with seed bands), validation loss at the end (selection), and
exact match of the final number after ``####`` in a greedy generation on the first
``em_pairs`` held-out questions (reported only above its noise floor), wall time per run, the
initial adapter's size. Methods: ``bench/quality_methods.py`` (``--methods core|all|a,b,...``).

Settings (:data:`SETTINGS`; any field can be overridden by its flag; without ``--setting``,
``cpu`` on the CPU and ``standard`` with ``--device cuda``):

- ``standard``: one epoch over 900 train pairs at batch 8 (113 steps), max 256 tokens, warm-up
  10 % then cosine decay, 100 validation pairs, 319 held-out pairs, 128 calibration pairs, grid
  1e-4 .. 3.16e-3 (2 points per decade, extended at an edge), seeds 0, 1, 2, exact match on all
  319 held-out questions: minutes per run on a GPU (``--device cuda``), about 12 hours of the
  core methods on the 2-core CPU (docs/DESIGN.md §12).
- ``cpu``: the same protocol sized for about 2.5 hours of the core methods on the 2-core CPU
  (one epoch over 200 train pairs at batch 8, max 256 tokens: 25 steps; 64 validation, 96
  held-out pairs, no exact match); the estimate is in docs/DESIGN.md §12.
- ``quick``: 20 steps x batch 4 on 80 train pairs, max 112 tokens, 32 validation and 64 held-out
  pairs: minutes on a CPU.
- ``--model toy``: a random 2-layer Llama (hidden 32) with the embedded tokenizer, for the smoke
  tests of every setting (seconds).

Resumable: each finished run is appended to ``<out>/<stem>_runs.jsonl`` (or ``--runs``) and
skipped when the command runs again; ``bench/runs/`` is tracked, so a run that spans sessions
keeps its log there and commits it as it goes. Outputs ``<out>/<stem>.{md,json,png}`` with
``<stem> = quality_<setting>``.

Run: ``python -m bench.quality --setting standard`` (``--device cuda`` on a GPU), ``--quick``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from bench import quality_loop, quality_stats
from bench.quality_methods import CORE, METHODS
from fisherlora import testing

POOL_RANGE = (0, 1000)
HELD_OUT_RANGE = (1000, 1319)
SETTINGS = {
    "standard": {"train_pairs": 900, "val_pairs": 100, "eval_pairs": 319, "epochs": 1.0, "steps": None,
                 "batch_size": 8, "max_length": 256, "calib_pairs": 128, "eval_points": 4, "em_pairs": 319,
                 "max_new_tokens": 256, "warmup": 0.1, "lrs": "1e-4,3.16e-4,1e-3,3.16e-3", "seeds": "0,1,2",
                 "methods": "all"},
    "cpu": {"train_pairs": 200, "val_pairs": 64, "eval_pairs": 96, "epochs": 1.0, "steps": None,
            "batch_size": 8, "max_length": 256, "calib_pairs": 128, "eval_points": 2, "em_pairs": 0,
            "max_new_tokens": 256, "warmup": 0.1, "lrs": "1e-4,3.16e-4,1e-3,3.16e-3", "seeds": "0,1,2",
            "methods": "all"},
    "quick": {"train_pairs": 80, "val_pairs": 32, "eval_pairs": 64, "epochs": None, "steps": 20,
              "batch_size": 4, "max_length": 112, "calib_pairs": 16, "eval_points": 2, "em_pairs": 0,
              "max_new_tokens": 256, "warmup": 0.1, "lrs": "3.16e-4,1e-3,3.16e-3,1e-2", "seeds": "0,1,2",
              "methods": "core"},
}
PER_DECADE = 2


# ----------------------------------------------------------------------------- data
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str | None:
    """The number after ``####`` (GSM8K's answer format), else the last number in ``text``."""
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    return found[-1 if "####" not in text else 0].replace(",", "").rstrip(".") if found else None


def with_answer_tokens(data):
    """``data`` without the pairs that truncation left with no answer token (they carry no loss;
    a training batch of only such pairs would have a NaN mean loss)."""
    from fisherlora.data import CalibrationData

    keep = [i for i, lab in enumerate(data.labels) if any(t != -100 for t in lab)]
    return CalibrationData([data.input_ids[i] for i in keep], [data.labels[i] for i in keep])


def embedded_tokenizer():
    """The embedded SmolLM2 tokenizer alone (pad = eos), for the toy model."""
    from fisherlora.models import load_tokenizer

    return load_tokenizer()


class Gsm8kTask:
    """GSM8K answer-token loss and exact match with a causal LM (see the module docstring)."""

    name, causal_lm, metric_name, loss_name = "gsm8k", True, "exact match", "answer-token loss"
    forward_kwargs = {"use_cache": False}

    def __init__(self, args):
        from fisherlora import data as fdata

        self.args = args
        if args.model == "toy":
            tok = embedded_tokenizer()
            model = testing.random_llama(vocab=len(tok), max_positions=max(512, args.max_length + args.max_new_tokens))
        else:
            model, tok = fdata.load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype),
                                                        device=args.device)
        if not args.chat_template:
            tok.chat_template = None  # prompt + "\n" + answer + eos: the CPU budget goes to answer tokens
        self.model, self.tok = model.to(args.device), tok
        lo, hi = POOL_RANGE
        rec = {"train": fdata.load_records("gsm8k", split_range=(lo, lo + args.train_pairs), shuffle=False),
               "val": fdata.load_records("gsm8k", split_range=(hi - args.val_pairs, hi), shuffle=False),
               "held": fdata.load_records("gsm8k", split_range=HELD_OUT_RANGE, shuffle=False)}
        rec["held"] = rec["held"].select(range(min(args.eval_pairs, len(rec["held"]))))
        self.train, self.val, self.held = (with_answer_tokens(fdata.tokenize_records(rec[k], tok,
                                                                                     max_length=args.max_length))
                                           for k in ("train", "val", "held"))
        self.answers = [final_number(a) for a in rec["held"]["answer"]]
        self.questions = list(rec["held"]["question"])
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(0))
        self.calib = self.batches(self.train, order[: args.calib_pairs].tolist(), 4)
        n_em = min(args.em_pairs, len(self.questions))
        self.metric_floor = quality_stats.em_floor(n_em) if n_em else None
        self.settings_text = (
            f"{'toy random Llama' if args.model == 'toy' else args.model}, GSM8K train pairs "
            f"{lo}-{lo + args.train_pairs - 1}, validation {hi - args.val_pairs}-{hi - 1}, held-out "
            f"{HELD_OUT_RANGE[0]}-{HELD_OUT_RANGE[0] + len(rec['held']) - 1} ({len(self.train)}/{len(self.val)}/"
            f"{len(self.held)} pairs with answer tokens within {args.max_length}); "
            f"{quality_loop.total_steps(args, len(self.train))} steps x batch {args.batch_size}, max "
            f"{args.max_length} tokens ({'chat template' if args.chat_template else 'plain prompt/answer'}), "
            f"r={args.rank}, alpha={args.alpha}, all seven projections, AdamW, warm-up {args.warmup:g} then cosine, "
            f"clip 1; lr grid {args.lrs} ({PER_DECADE}/decade, extended at an edge), seeds {args.seeds}; "
            f"{args.calib_pairs} calibration pairs from the train split; held-out evaluations at "
            f"{args.eval_points} points; exact match on {args.em_pairs or 'no'} held-out questions; "
            f"device {args.device}")

    def size(self, split) -> int:
        return len(split)

    def batches(self, split, idx, batch_size: int) -> list[dict]:
        from fisherlora.data import CalibrationData

        sub = CalibrationData([split.input_ids[i] for i in idx], [split.labels[i] for i in idx])
        return list(testing.pad_batches(sub, batch_size, pad_id=self.tok.pad_token_id))

    def lora_config(self, rank, alpha, init=True, **kw):
        from bench.init_methods import lora_config

        return lora_config(rank, alpha, init, **kw)

    def lora_kwargs(self) -> dict:
        return {}

    @torch.no_grad()
    def eval_loss(self, model, split, batch_size: int = 8) -> float:
        """Mean cross-entropy per answer token over ``split``."""
        from fisherlora.calibration import token_loss_sum

        was = model.training
        model.eval()
        total, count, device = 0.0, 0, next(model.parameters()).device
        for b in self.batches(split, range(len(split)), batch_size):
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                           use_cache=False).logits
            loss, n = token_loss_sum(logits.float(), b["labels"].to(device))
            total, count = total + float(loss), count + n
        model.train(was)
        return total / max(count, 1)

    def metric(self, model) -> float | None:
        n = min(self.args.em_pairs, len(self.questions))
        if n <= 0:
            return None
        return exact_match(model, self.tok, self.questions[:n], self.answers[:n], self.args.max_new_tokens)


@torch.no_grad()
def exact_match(model, tok, questions: list[str], answers: list[str | None], max_new_tokens: int,
                batch_size: int = 16) -> float:
    """Greedy generation on ``questions``; the fraction whose final number equals ``answers``'.

    Prompts are rendered as in training and left-padded here into tensors (``testing.pad_batches``),
    so no tokenizer's ``pad`` return type is relied on."""
    from tqdm.auto import tqdm

    from fisherlora.data import CalibrationData, render_pair

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    bar = tqdm(total=len(questions), desc="exact match (greedy generation)", unit="question", leave=False)
    for start in range(0, len(questions), batch_size):
        prompts = []
        for q in questions[start:start + batch_size]:
            ids, n_prompt = render_pair(tok, q, "")
            prompts.append(ids[:n_prompt])
        (enc,) = testing.pad_batches(CalibrationData(prompts, prompts), len(prompts), pad_id=tok.pad_token_id,
                                     side="left")
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row, ref in zip(out[:, enc["input_ids"].shape[1]:], answers[start:start + batch_size], strict=True):
            correct += int(final_number(tok.decode(row, skip_special_tokens=True)) == ref)
        bar.update(len(prompts))
    bar.close()
    model.train(was)
    return correct / len(questions)


# ----------------------------------------------------------------------------- command line
def add_common_flags(p, settings: dict) -> None:
    """Flags shared by the quality tasks; every setting field defaults to None (the setting's value)."""
    p.add_argument("--setting", choices=sorted(settings), default=None,
                   help="the sizes below, as one named set; each flag below overrides one (default: "
                        f"{default_setting_text(settings)})")
    p.add_argument("--quick", action="store_true", help="same as --setting quick")

    def per_setting(field: str) -> str:
        return "; ".join(f"{name}: {values.get(field)}" for name, values in sorted(settings.items()))

    p.add_argument("--methods", default=None, help=f"'core' ({','.join(CORE)}), 'all' ({','.join(METHODS)}) "
                   f"or a comma list of those names ({per_setting('methods')})")
    p.add_argument("--reference", default="fisherlora",
                   help="the method paired differences are taken to (run too when --methods leaves it out)")
    helps = {"train_pairs": "training pairs (one epoch over them unless --steps)",
             "val_pairs": "validation pairs, carved from the training pool, that choose the lr",
             "eval_pairs": "held-out pairs whose loss is reported",
             "steps": "optimizer steps (overrides --epochs)", "batch_size": "pairs per step",
             "max_length": "tokens per pair at most", "calib_pairs": "calibration pairs, drawn from the train split",
             "eval_points": "held-out evaluations over training (the curve)",
             "em_pairs": "held-out questions for exact match by greedy generation (0: none)",
             "max_new_tokens": "generation limit for exact match", "epochs": "passes over the train split",
             "warmup": "warm-up fraction of the steps, then cosine decay"}
    for field in ("train_pairs", "val_pairs", "eval_pairs", "steps", "batch_size", "max_length", "calib_pairs",
                  "eval_points", "em_pairs", "max_new_tokens", "epochs", "warmup"):
        if not any(values[field] for values in settings.values()):
            continue  # a size the task never uses (exact match for a classifier): no flag, the setting's value
        p.add_argument("--" + field.replace("_", "-"), type=float if field in ("epochs", "warmup") else int,
                       default=None, help=f"{helps[field]} ({per_setting(field)})")
    p.add_argument("--lrs", default=None, help=f"initial learning-rate grid, log-spaced ({per_setting('lrs')})")
    p.add_argument("--max-extend", type=int, default=4, help="grid points added at most while the best is at an edge")
    p.add_argument("--seeds", default=None, help=f"comma list; the first picks the lr ({per_setting('seeds')})")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda; also picks the default --setting")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--runs", default=None,
                   help="the resumable log of finished runs (default <out>/<stem>_runs.jsonl); a tracked path "
                        "such as bench/runs/quality_cpu_runs.jsonl, committed as the run goes, carries a run of "
                        "several hours across fresh checkouts")


def default_setting(settings: dict, device: str) -> str:
    """``cpu`` where the task has that setting and the device is the CPU, else ``standard``."""
    return "cpu" if "cpu" in settings and str(device).startswith("cpu") else "standard"


def default_setting_text(settings: dict) -> str:
    return "cpu on --device cpu, standard on a GPU" if "cpu" in settings else "standard"


def check_sizes(args) -> None:
    """Every size and path of a quality run, checked before any model loads.

    Raises:
        SystemExit: one line naming the flag and what it takes.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SystemExit(message)

    for field in ("train_pairs", "val_pairs", "eval_pairs", "batch_size", "max_length", "calib_pairs", "eval_points",
                  "rank"):
        need(getattr(args, field) >= 1, f"--{field.replace('_', '-')} must be at least 1, got {getattr(args, field)}")
    need(args.steps is None or args.steps >= 1, f"--steps must be at least 1, got {args.steps}")
    need(args.epochs is None or args.epochs > 0, f"--epochs must be positive, got {args.epochs}")
    need(0 <= args.warmup < 1, f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    need(args.max_extend >= 0, f"--max-extend must be at least 0, got {args.max_extend}")
    need(args.alpha > 0, f"--alpha must be positive, got {args.alpha}")
    need(all(0 < lr < 1 for lr in args.lrs), f"--lrs must lie in (0, 1), got {args.lrs}")
    for flag, values in (("--lrs", args.lrs), ("--seeds", args.seeds)):
        need(len(set(values)) == len(values), f"{flag} repeats a value ({values}): each run would count twice")
    lo, hi = POOL_RANGE
    need(args.train_pairs + args.val_pairs <= hi - lo,
         f"--train-pairs + --val-pairs must be at most {hi - lo} (the pool before the held-out)")
    need(args.calib_pairs <= args.train_pairs,
         f"--calib-pairs ({args.calib_pairs}) must be at most --train-pairs ({args.train_pairs}): calibration is "
         "drawn from the train split")
    held = HELD_OUT_RANGE[1] - HELD_OUT_RANGE[0]
    need(args.eval_pairs <= held, f"--eval-pairs must be at most {held} (the held-out split), got {args.eval_pairs}")
    need(0 <= args.em_pairs <= args.eval_pairs,
         f"--em-pairs must lie in [0, --eval-pairs = {args.eval_pairs}], got {args.em_pairs}")
    need(args.em_pairs == 0 or args.max_new_tokens >= 1, "--max-new-tokens must be at least 1 for exact match")
    need(not str(args.device).startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device}: torch sees no CUDA device here")
    need(not Path(args.out).is_file(), f"--out {args.out} is a file; give a folder")
    need(not (args.runs and Path(args.runs).is_dir()), f"--runs {args.runs} is a folder; give the log file's path")


def finish_args(args, settings: dict):
    """Fill the setting's values, parse the lists, expand ``--methods``."""
    if args.quick and args.setting not in (None, "quick"):
        raise SystemExit(f"--quick is --setting quick; it contradicts --setting {args.setting}")
    if args.quick:
        args.setting = "quick"
    args.setting = args.setting or default_setting(settings, args.device)
    setting = settings[args.setting]
    given = {k for k in setting if getattr(args, k, None) is not None}
    if {"steps", "epochs"} <= given:
        raise SystemExit("give --steps or --epochs, not both")
    for k, v in setting.items():
        if k not in given:
            setattr(args, k, v)
    if "epochs" in given:
        args.steps = None  # the user's epochs replace the setting's fixed step count
    elif args.steps:
        args.epochs = None
    try:
        args.lrs = [float(x) for x in str(args.lrs).split(",")]
        args.seeds = [int(x) for x in str(args.seeds).split(",")]
    except ValueError as exc:
        raise SystemExit(f"--lrs takes a comma list of numbers and --seeds one of integers: {exc}") from None
    check_sizes(args)
    args.per_decade = PER_DECADE
    everything = CORE + [m for m in METHODS if m not in CORE]  # a partial background run has the core first
    names = CORE if args.methods == "core" else everything if args.methods == "all" else args.methods.split(",")
    unknown = [n for n in [*names, args.reference] if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    names = [args.reference, *(n for n in names if n != args.reference)]  # the reference runs first
    args.method_specs = {n: METHODS[n] for n in names}
    return args


def make_parser(doc: str, settings: dict, examples: str) -> argparse.ArgumentParser:
    """The parser of a quality task: its docstring's first line, the flags of ``add_common_flags`` and
    ``examples`` (lines of ``command  # what it does``) under the flags."""
    p = argparse.ArgumentParser(
        description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n{examples}A finished run is appended to the --runs log and skipped when the command "
               "is run again.")
    add_common_flags(p, settings)
    return p


def parse(argv=None):
    p = make_parser(__doc__, SETTINGS,
                    "  python -m bench.quality --quick                      # the small setting: 20 steps per run\n"
                    "  python -m bench.quality --setting cpu --methods core \\\n"
                    "      --runs bench/runs/quality_cpu_runs.jsonl --out bench/runs   # about 2.5 h, resumable\n"
                    "  python -m bench.quality --setting standard --device cuda       # the GPU-sized setting\n")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded), a local folder, or 'toy'")
    p.add_argument("--chat-template", action="store_true", help="render pairs with the chat template")
    args = finish_args(p.parse_args(argv), SETTINGS)
    args.task = "gsm8k"
    return args


def main(argv=None) -> int:
    args = parse(argv)
    stem = f"quality_{args.setting}" + ("_toy" if args.model == "toy" else "")
    store = quality_loop.open_store(args, stem)  # a broken log stops the command before the model loads
    task = Gsm8kTask(args)
    task.model.requires_grad_(False)
    quality_loop.run_benchmark(task, task.model, args, args.method_specs, args.reference, stem, store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
