"""Does the fine-tuned model get better? LoRA initialisers compared by held-out loss after training.

Setting (issue 6): SmolLM2-135M-Instruct (embedded) fine-tuned with LoRA (r = 16, alpha = 16, all
seven projections) on GSM8K from the embedded data, with a fixed split: the FIRST 1,000 pairs of
``data/gsm8k/test.jsonl`` train, the LAST 319 are held out (``load_records(split_range=...)``, no
shuffling). Every method gets the same optimiser (AdamW, betas (0.9, 0.999), no weight decay,
constant learning rate, gradient norm clipped to 1), the same steps, batch, learning-rate grid and
seeds. A seed fixes the order of the training pairs (and the random factors of default LoRA).
Data-driven initialisers calibrate on the first ``--calib-pairs`` training pairs (seed-0 order).

Measured: the mean cross-entropy on the ANSWER tokens of the held-out pairs (``--eval-pairs`` of
them, the first ones of the held-out split) at a few points during training, and optionally the
exact-match accuracy of the final number after ``####`` in a greedy generation (``--em-pairs``).
Every initialiser here leaves the model's outputs unchanged at step 0, so the step-0 loss is the
base model's, measured once.

Learning rate: the size of an adapter at initialisation interacts with the learning rate, so each
method gets the grid ``--lrs`` and is compared at its own best. Full setting: every learning rate
with every seed, best by the mean over seeds. ``--quick``: the learning rate is picked on seed 0,
then the other seeds run at it. The initial adapter's size is reported beside every result:
``‖ΔW₀‖`` (root-sum-square over layers of ``‖s·B₀A₀‖_F``) and ``Σσ`` (the sum over layers of the
singular values of ``s·B₀A₀``).

Resumable: each finished run is appended to ``<out>/quality_runs.jsonl`` (keyed by method, lr,
seed and the settings) and skipped when the command runs again. Output:
``<out>/quality.{md,json,png}`` (table, all runs, held-out loss curves with mean and band).

Run: ``python -m bench.quality --quick`` (CPU, default LoRA, PiSSA, MiLoRA and four fisherlora
variants), ``python -m bench.quality`` (every method and every score x magnitude; resumable).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import common
from bench.init_methods import initialize, lora_config
from fisherlora import testing

TRAIN_RANGE = (0, 1000)
HELD_OUT_RANGE = (1000, 1319)
FULL_METHODS = ["lora", "pissa", "milora", "eva", "corda", "lora_ga", "fisherlora"]
QUICK_METHODS = ["lora", "pissa", "milora", "fisherlora"]
ALL_VARIANTS = [f"{s}:{m}" for s in ("fisher", "fisher_sigma") for m in ("sigma", "top_sigma", "unit", "energy")]
QUICK_VARIANTS = ["fisher:sigma", "fisher_sigma:sigma", "fisher:top_sigma", "fisher:unit"]
SETTINGS_KEYS = ("model", "tiny", "rank", "alpha", "steps", "batch_size", "max_length", "chat_template",
                 "calib_pairs", "eval_pairs", "eval_at", "em_pairs", "dtype")


# ----------------------------------------------------------------------------- data
def load_data(args):
    """``(model, tokenizer, train, held_out, calibration_batches)``; tokenizer None with ``--tiny``."""
    from fisherlora import data as fdata

    if args.tiny:
        model, tok, _ = common.tiny_setup(2, args.max_length, args.batch_size)
        train = testing.tiny_data(64, args.max_length, seed=1)
        held = testing.tiny_data(args.eval_pairs, args.max_length, seed=2)
        calib = list(testing.pad_batches(testing.tiny_data(args.calib_pairs, args.max_length, seed=3), 4))
        return model, tok, train, held, calib
    model, tok = fdata.load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if not args.chat_template:
        tok.chat_template = None  # prompt + "\n" + answer + eos: the CPU budget goes to answer tokens
    train_rec = fdata.load_records("gsm8k", split_range=TRAIN_RANGE, shuffle=False)
    held_rec = fdata.load_records("gsm8k", split_range=HELD_OUT_RANGE, shuffle=False)
    held_rec = held_rec.select(range(min(args.eval_pairs, len(held_rec))))
    train = fdata.tokenize_records(train_rec, tok, max_length=args.max_length)
    held = fdata.tokenize_records(held_rec, tok, max_length=args.max_length)
    held.answers = [final_number(a) for a in held_rec["answer"]]
    held.questions = list(held_rec["question"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.calib_pairs].tolist()
    calib = fdata.CalibrationData([train.input_ids[i] for i in order], [train.labels[i] for i in order])
    return model, tok, train, held, list(fdata.calibration_batches(calib, tok, 4))


def batches_of(data, idx, tok, batch_size):
    from fisherlora.data import CalibrationData, calibration_batches

    sub = CalibrationData([data.input_ids[i] for i in idx], [data.labels[i] for i in idx])
    if tok is None:
        return list(testing.pad_batches(sub, batch_size))
    return list(calibration_batches(sub, tok, batch_size))


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str | None:
    """The number after ``####`` (GSM8K's answer format), else the last number in ``text``."""
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    return found[-1 if "####" not in text else 0].replace(",", "").rstrip(".") if found else None


# ----------------------------------------------------------------------------- measurements
@torch.no_grad()
def held_out_loss(model, held, tok, batch_size=8) -> float:
    """Mean cross-entropy per answer token over the held-out pairs."""
    from fisherlora.calibration import token_loss_sum

    was = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for b in batches_of(held, range(len(held)), tok, batch_size):
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        loss, n = token_loss_sum(logits.float(), b["labels"].to(device))
        total, count = total + float(loss), count + n
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tok, held, n: int, max_new_tokens: int = 256, batch_size: int = 16) -> float | None:
    """Greedy generation on the first ``n`` held-out questions; the fraction whose final number
    equals the reference's."""
    if tok is None or n <= 0:
        return None
    from fisherlora.data import render_pair

    model.eval()
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    correct = 0
    try:
        for start in range(0, n, batch_size):
            prompts = []
            for q in held.questions[start:start + batch_size][: n - start]:
                ids, n_prompt = render_pair(tok, q, "")
                prompts.append(ids[:n_prompt])
            enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
            out = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            for row, ref in zip(out[:, enc["input_ids"].shape[1]:], held.answers[start:], strict=False):
                correct += int(final_number(tok.decode(row, skip_special_tokens=True)) == ref)
    finally:
        tok.padding_side = side
    return correct / n


@torch.no_grad()
def adapter_size(peft_model) -> dict:
    """Initial adapter size: root-sum-square of ``‖s·BA‖_F`` and sum of its singular values."""
    from peft.tuners.lora import LoraLayer

    fro2, nuc, a2, b2 = 0.0, 0.0, 0.0, 0.0
    for m in peft_model.modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            A, B = m.lora_A["default"].weight.float(), m.lora_B["default"].weight.float()
            if A.shape[0] == 0:
                continue
            s = torch.linalg.svdvals(m.scaling["default"] * (B @ A))
            fro2 += float((s**2).sum())
            nuc += float(s.sum())
            a2 += float((A**2).sum())
            b2 += float((B**2).sum())
    return {"delta_fro": math.sqrt(fro2), "delta_sum_sigma": nuc, "A_fro": math.sqrt(a2), "B_fro": math.sqrt(b2)}


# ----------------------------------------------------------------------------- initialisers
class Initialisers:
    """Builds each method's initial PeftModel once (data-driven ones are deterministic) and hands
    out deep copies; default LoRA and Gaussian draw their random factors per seed."""

    RANDOM = ("lora", "gaussian")

    def __init__(self, base, calib, args):
        self.base, self.calib, self.args = base, calib, args
        self.cache, self.stats, self.init_s = {}, None, {}

    def get(self, method: str, seed: int):
        if method in self.RANDOM:
            torch.manual_seed(seed)
            pm, _ = initialize(method, copy.deepcopy(self.base), self.calib, rank=self.args.rank,
                               alpha=self.args.alpha)
            return pm
        if method not in self.cache:
            t0 = time.perf_counter()
            self.cache[method] = self._build(method)
            self.init_s[method] = time.perf_counter() - t0
        return copy.deepcopy(self.cache[method])

    def _build(self, method: str):
        model = copy.deepcopy(self.base)
        if method.startswith("fisherlora"):
            import fisherlora

            _, score, magnitude = method.split(":")
            cfg = fisherlora.FisherLoraConfig(rank=self.args.rank, alpha=self.args.alpha, score=score,
                                              magnitude=magnitude)
            res = fisherlora.initialize_fisher_lora(model, lora_config(self.args.rank, self.args.alpha),
                                                    None if self.stats else self.calib, cfg,
                                                    statistics=self.stats, progress=False)
            self.stats = res.statistics  # one calibration pass serves every score x magnitude
            return res.model
        torch.manual_seed(0)
        pm, _ = initialize(method, model, self.calib, rank=self.args.rank, alpha=self.args.alpha)
        return pm


# ----------------------------------------------------------------------------- one run
def train_run(pm, train, held, tok, args, lr: float, seed: int, base_loss: float) -> dict:
    device = next(pm.parameters()).device
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    need = args.steps * args.batch_size
    order = (order * (need // len(order) + 1))[:need]
    curve, losses = [[0, base_loss]], []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = order[(step - 1) * args.batch_size: step * args.batch_size]
        (b,) = batches_of(train, idx, tok, args.batch_size)
        out = pm(**{k: v.to(device) for k, v in b.items()}, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if not math.isfinite(losses[-1]):
            curve.append([step, float("nan")])
            break
        if step in args.eval_at:
            curve.append([step, held_out_loss(pm, held, tok)])
    em = exact_match(pm, tok, held, args.em_pairs) if args.em_pairs else None
    return {"curve": curve, "final_loss": curve[-1][1], "train_losses": losses, "em": em,
            "train_s": time.perf_counter() - t0}


def settings_of(args) -> dict:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items() if k in SETTINGS_KEYS}


def run_key(method: str, lr: float, seed: int, settings: dict) -> str:
    blob = json.dumps({"method": method, "lr": lr, "seed": seed, **settings}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_done(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


# ----------------------------------------------------------------------------- summary
def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(records: list[dict], methods: list[str], seeds: list[int], lrs: list[float], quick: bool,
              reference: str) -> dict:
    by = {(r["method"], r["lr"], r["seed"]): r for r in records}
    summary = {}
    for m in methods:
        sweep = {}
        for lr in lrs:
            pick_seeds = seeds[:1] if quick else seeds
            vals = [by[(m, lr, s)]["final_loss"] for s in pick_seeds if (m, lr, s) in by]
            sweep[lr] = _mean_std(vals)[0] if len(vals) == len(pick_seeds) else None
        valid = {lr: v for lr, v in sweep.items() if v is not None and math.isfinite(v)}
        if not valid:
            summary[m] = {"sweep": sweep, "best_lr": None}
            continue
        best = min(valid, key=valid.get)
        runs = [by[(m, best, s)] for s in seeds if (m, best, s) in by]
        mean, std = _mean_std([r["final_loss"] for r in runs])
        em_mean, em_std = _mean_std([r["em"] for r in runs])
        summary[m] = {"sweep": sweep, "best_lr": best, "best_at_grid_edge": best in (min(lrs), max(lrs)),
                      "final_mean": mean, "final_std": std, "n": len(runs), "em_mean": em_mean, "em_std": em_std,
                      "seeds": {r["seed"]: r["final_loss"] for r in runs},
                      "size": runs[0]["size"] if runs else None,
                      "curves": {r["seed"]: r["curve"] for r in runs}}
    ref = summary.get(reference)
    for m, s in summary.items():
        if s.get("best_lr") is None or not ref or ref.get("best_lr") is None:
            continue
        diffs = [s["seeds"][sd] - ref["seeds"][sd] for sd in s["seeds"] if sd in ref["seeds"]]
        dm, dsd = _mean_std(diffs)
        s["paired_diff"] = {"per_seed": diffs, "mean": dm, "std": dsd}
        s["resolved"] = (m != reference and dm is not None and len(diffs) > 1
                         and abs(dm) > 2 * dsd / math.sqrt(len(diffs)))
    return summary


def markdown(summary: dict, meta: dict, reference: str) -> str:
    lines = [f"Settings: {meta['settings_text']}", "",
             f"Held-out answer-token loss after training at each method's best learning rate (mean ± std over "
             f"seeds); Δ = method − {reference}, paired by seed (negative: better than {reference}).", "",
             "| method | best lr | lr sweep (final loss) | held-out loss | Δ vs ref per seed | Δ mean ± std | "
             "Δ beyond seed noise | exact match | init ‖ΔW₀‖ | init Σσ(ΔW₀) | init ‖A₀‖ |",
             "|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|"]
    ranked = sorted(summary.items(),
                    key=lambda kv: (kv[1].get("final_mean") is None, kv[1].get("final_mean") or 0))
    for m, s in ranked:
        sweep = ", ".join(f"{lr:g}: {'—' if v is None else f'{v:.4f}'}" for lr, v in s["sweep"].items())
        if s.get("best_lr") is None:
            lines.append(f"| {m} | — | {sweep} | not finished | | | | | | | |")
            continue
        edge = " (grid edge)" if s["best_at_grid_edge"] else ""
        pd = s.get("paired_diff") or {}
        per = ", ".join(f"{d:+.4f}" for d in pd.get("per_seed", [])) or "—"
        dms = "—" if pd.get("mean") is None else f"{pd['mean']:+.4f} ± {pd['std']:.4f}"
        res = "ref" if m == reference else ("yes" if s.get("resolved") else "no")
        em = "—" if s["em_mean"] is None else f"{s['em_mean']:.3f} ± {s['em_std']:.3f}"
        size = s["size"] or {}
        lines.append(f"| {m} | {s['best_lr']:g}{edge} | {sweep} | {s['final_mean']:.4f} ± {s['final_std']:.4f} "
                     f"(n={s['n']}) | {per} | {dms} | {res} | {em} | {size.get('delta_fro', 0):.2f} | "
                     f"{size.get('delta_sum_sigma', 0):.1f} | {size.get('A_fro', 0):.2f} |")
    lines += ["", f"Step-0 held-out loss (every method; outputs unchanged at init): {meta['base_loss']:.4f}.",
              "“Δ beyond seed noise”: |mean Δ| > 2·std(Δ)/√n over the paired seeds."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, s in summary.items():
        curves = list((s.get("curves") or {}).values())
        if not curves:
            continue
        steps = [p[0] for p in curves[0]]
        ys = [[c[i][1] if i < len(c) else float("nan") for c in curves] for i in range(len(steps))]
        mean = [statistics.fmean(y) for y in ys]
        lo = [min(y) for y in ys]
        hi = [max(y) for y in ys]
        (line,) = ax.plot(steps, mean, marker="o", label=f"{m} (lr {s['best_lr']:g})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out answer-token loss")
    ax.set_title("mean over seeds, band = min..max")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="default LoRA, PiSSA, MiLoRA, four fisherlora variants; lr on seed 0, then 3 seeds")
    p.add_argument("--methods", default=None, help=f"comma list from {FULL_METHODS} (and gaussian, olora, "
                   "pissa_niter_4); 'fisherlora' expands to --variants")
    p.add_argument("--variants", default=None,
                   help=f"fisherlora score:magnitude list (full default: all {len(ALL_VARIANTS)})")
    p.add_argument("--reference", default=None, help="method the paired differences are taken to "
                   "(default: the first fisherlora variant)")
    p.add_argument("--lrs", default="1e-4,5e-4,2.5e-3", help="learning-rate grid (factor 5 apart)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="training steps (full 200, quick 20)")
    p.add_argument("--batch-size", type=int, default=None, help="(full 8, quick 4)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per pair (full 512, quick 112)")
    p.add_argument("--chat-template", action="store_true",
                   help="render pairs with the chat template (more tokens)")
    p.add_argument("--calib-pairs", type=int, default=None, help="calibration pairs (full 128, quick 16)")
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs evaluated (full 319, quick 64)")
    p.add_argument("--eval-points", type=int, default=None, help="evaluations during training (full 10, quick 2)")
    p.add_argument("--em-pairs", type=int, default=None,
                   help="exact-match questions at the end (full 319, quick 0)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    full = {"steps": 200, "batch_size": 8, "max_length": 512, "calib_pairs": 128, "eval_pairs": 319,
            "eval_points": 10, "em_pairs": 319}
    quick = {"steps": 20, "batch_size": 4, "max_length": 112, "calib_pairs": 16, "eval_pairs": 64,
             "eval_points": 2, "em_pairs": 0}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    pts = max(1, min(args.eval_points, args.steps))
    args.eval_at = sorted({round(args.steps * (i + 1) / pts) for i in range(pts)})
    variants = (args.variants.split(",") if args.variants else (QUICK_VARIANTS if args.quick else ALL_VARIANTS))
    names = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else FULL_METHODS)
    args.method_list = []
    for n in names:
        args.method_list += [f"fisherlora:{v}" for v in variants] if n == "fisherlora" else [n]
    args.reference = args.reference or next((m for m in args.method_list if m.startswith("fisherlora")),
                                            args.method_list[0])
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / ("quality_runs_tiny.jsonl" if args.tiny else "quality_runs.jsonl")
    settings = settings_of(args)
    done = load_done(runs_path)
    t_start = time.perf_counter()
    model, tok, train, held, calib = load_data(args)
    model.requires_grad_(False)
    inits = Initialisers(model, calib, args)
    base_key = run_key("base", 0.0, 0, settings)
    if base_key in done:
        base_loss = done[base_key]["final_loss"]
    else:
        base_loss = held_out_loss(model, held, tok)
        base_em = exact_match(model, tok, held, args.em_pairs) if args.em_pairs else None
        rec = {"key": base_key, "method": "base", "lr": 0.0, "seed": 0, "final_loss": base_loss,
               "em": base_em, "settings": settings}
        with runs_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done[base_key] = rec
    print(f"setup + base eval {time.perf_counter() - t_start:.0f} s; step-0 held-out loss {base_loss:.4f}",
          flush=True)

    def run(method, lr, seed):
        key = run_key(method, lr, seed, settings)
        if key in done:
            return done[key]
        t0, c0 = time.perf_counter(), time.process_time()
        pm = inits.get(method, seed)
        size = adapter_size(pm)
        torch.manual_seed(seed)
        res = train_run(pm, train, held, tok, args, lr, seed, base_loss)
        rec = {"key": key, "method": method, "lr": lr, "seed": seed, **res, "size": size,
               "init_s": inits.init_s.get(method), "wall_s": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0, "load_avg": os.getloadavg()[0], "settings": settings}
        with runs_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done[key] = rec
        print(f"{method:26s} lr {lr:<8g} seed {seed}: held-out {res['final_loss']:.4f} "
              f"({rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU, "
              f"{time.perf_counter() - t_start:.0f} s so far)", flush=True)
        del pm
        return rec

    for method in args.method_list:
        for lr in args.lrs:
            for seed in (args.seeds[:1] if args.quick else args.seeds):
                run(method, lr, seed)
        if args.quick:
            sweep = {lr: done[run_key(method, lr, args.seeds[0], settings)]["final_loss"] for lr in args.lrs}
            finite = {lr: v for lr, v in sweep.items() if math.isfinite(v)}
            if finite:
                best = min(finite, key=finite.get)
                for seed in args.seeds[1:]:
                    run(method, best, seed)
    records = [r for r in done.values() if r["method"] != "base" and r.get("settings") == settings]
    summary = summarise(records, args.method_list, args.seeds, args.lrs, args.quick, args.reference)
    fmt = "chat template" if args.chat_template else "plain prompt/answer"
    pick = f"lr picked on seed {args.seeds[0]}" if args.quick else "lr by mean over seeds"
    settings_text = (f"{'tiny random Llama' if args.tiny else args.model}, GSM8K train pairs {TRAIN_RANGE[0]}-"
                     f"{TRAIN_RANGE[1] - 1}, held-out {HELD_OUT_RANGE[0]}-{HELD_OUT_RANGE[1] - 1} (first "
                     f"{args.eval_pairs} evaluated), {args.steps} steps x batch {args.batch_size}, max "
                     f"{args.max_length} tokens ({fmt}), "
                     f"r={args.rank}, alpha={args.alpha}, AdamW constant lr, clip 1, lrs {args.lrs}, seeds "
                     f"{args.seeds} ({pick}), "
                     f"{args.calib_pairs} calibration pairs, evals at steps {args.eval_at}, "
                     f"exact match on {args.em_pairs or 'no'} pairs")
    meta = {"settings": settings, "settings_text": settings_text, "base_loss": base_loss,
            "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:],
            "wall_s": time.perf_counter() - t_start, "init_s": inits.init_s}
    md = markdown(summary, meta, args.reference)
    stem = "quality_tiny" if args.tiny else "quality"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1,
                                                 default=str))
    plot(summary, out / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
