"""The quality benchmark's driver, shared by its tasks: one training run, the resumable run store,
learning-rate selection with grid extension, seeds, and the output files.

A task (``bench/quality.py``: GSM8K with a causal LM; ``bench/quality_cls.py``: sequence
classification with MiniLM) supplies the data splits and these members: ``name``, ``causal_lm``,
``calib`` (calibration batches, from the train split only), ``train``, ``val``, ``held``,
``size(split)``, ``batches(split, indices, batch_size)``, ``eval_loss(model, split)``,
``metric(model)`` (the final held-out metric, or None), ``metric_name``, ``metric_floor``,
``loss_name``, ``forward_kwargs`` (extra arguments of a training forward),
``lora_config(rank, alpha, init, **kw)``, ``lora_kwargs()``, ``settings_text``.

Training (every method alike): AdamW (betas 0.9/0.999, no weight decay), gradient norm clipped
to 1, linear warm-up over ``warmup`` of the steps then cosine decay to 0, ``epochs`` passes over
the train split in a seed-shuffled order (or ``steps`` steps). A seed fixes that order and
default LoRA's random A. Selection: docs/DESIGN.md §12 and ``bench/quality_stats.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from bench import quality_stats as qs
from bench.quality_methods import Initialisers, Unavailable, adapter_size

#: settings that change a run's result, and so its key
KEY_FIELDS = ("task", "model", "rank", "alpha", "train_pairs", "val_pairs", "eval_pairs", "epochs", "steps",
              "batch_size", "max_length", "chat_template", "calib_pairs", "eval_points", "em_pairs",
              "max_new_tokens", "warmup", "dtype", "device")


def total_steps(args, n_train: int) -> int:
    return args.steps if args.steps else max(1, math.ceil(args.epochs * n_train / args.batch_size))


def schedule(step: int, total: int, warmup: float) -> float:
    """The lr factor at optimiser step ``step`` (0-based): linear warm-up, then cosine to 0."""
    w = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def train_run(pm, task, args, lr: float, seed: int, base_loss: float) -> dict:
    """Train ``pm`` in place; the held-out loss curve, the final validation loss and metric."""
    device = next(pm.parameters()).device
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    steps = total_steps(args, task.size(task.train))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps, args.warmup))
    n = task.size(task.train)
    need, order, g = steps * args.batch_size, [], torch.Generator().manual_seed(seed)
    while len(order) < need:  # whole epochs, each in its own shuffled order
        order += torch.randperm(n, generator=g).tolist()
    pts = max(1, min(args.eval_points, steps))
    eval_at = {round(steps * (i + 1) / pts) for i in range(pts)}
    curve, losses, t0 = [[0, base_loss]], [], time.perf_counter()
    for step in range(1, steps + 1):
        (b,) = task.batches(task.train, order[(step - 1) * args.batch_size: step * args.batch_size], args.batch_size)
        out = pm(**{k: v.to(device) for k, v in b.items()}, **task.forward_kwargs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if not math.isfinite(losses[-1]):
            curve.append([step, float("nan")])
            break
        if step in eval_at:
            curve.append([step, task.eval_loss(pm, task.held)])
    diverged = not math.isfinite(curve[-1][1])
    val = float("nan") if diverged else task.eval_loss(pm, task.val)
    metric = None if diverged else task.metric(pm)
    return {"curve": curve, "final_loss": curve[-1][1], "val_loss": val, "metric": metric,
            "train_losses": losses, "steps": steps, "train_s": time.perf_counter() - t0}


class RunStore:
    """Finished runs, one JSON line each, keyed by spec, lr, seed and settings; appended as they end."""

    def __init__(self, path: Path, settings: dict):
        """Read the log at ``path`` (absent: empty).

        A last line cut short (no newline: the process died while writing it) is dropped from the
        file with a note on stderr, so that its run is done again and later lines start clean.

        Raises:
            SystemExit: any other line that is not a run record, naming the file and line.
        """
        self.path, self.settings, self.done = path, settings, {}
        if not path.exists():
            return
        text = path.read_text()
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.done[rec["key"]] = rec
            except (ValueError, KeyError, TypeError) as exc:
                if number == len(lines) and not text.endswith("\n"):
                    path.write_text(text[: len(text) - len(line)])
                    print(f"{path}:{number}: a run record cut short (its run was killed while writing); dropped, "
                          "that run will be done again", file=sys.stderr, flush=True)
                    break
                raise SystemExit(f"{path}:{number}: not a run record ({type(exc).__name__}: {exc}); "
                                 "remove or fix that line") from None

    def key(self, spec_key: dict, lr: float, seed: int) -> str:
        blob = json.dumps({"spec": spec_key, "lr": lr, "seed": seed, **self.settings}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def get(self, key: str):
        return self.done.get(key)

    def add(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.done[rec["key"]] = rec


def settings_of(args) -> dict:
    return {k: getattr(args, k, None) for k in KEY_FIELDS}


def open_store(args, stem: str) -> RunStore:
    """The run log ``args.runs`` or ``<out>/<stem>_runs.jsonl``, read (folders made): called before
    the model loads, so that a broken log stops the command first."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if getattr(args, "runs", None) else out / f"{stem}_runs.jsonl"
    runs.parent.mkdir(parents=True, exist_ok=True)
    return RunStore(runs, settings_of(args))


def run_benchmark(task, base_model, args, methods: dict, reference: str, stem: str,
                  store: RunStore | None = None) -> dict:
    """Sweep, extend, seed and summarise every method of ``methods`` (name -> Spec); writes
    ``<out>/<stem>_runs.jsonl`` or ``args.runs`` (resumable, :func:`open_store` unless ``store`` is
    given), ``<stem>.md``, ``<stem>.json`` and ``<stem>.png``."""
    out = Path(args.out)
    store = store or open_store(args, stem)
    t_start = time.perf_counter()
    base_key = store.key({"kind": "base"}, 0.0, 0)
    if store.get(base_key) is None:
        store.add({"key": base_key, "method": "base", "final_loss": task.eval_loss(base_model, task.held),
                   "val_loss": task.eval_loss(base_model, task.val), "metric": task.metric(base_model)})
    base = store.get(base_key)
    print(f"[{stem}] base: held-out {base['final_loss']:.4f}, validation {base['val_loss']:.4f}", flush=True)
    inits = Initialisers(base_model, task, args.rank, args.alpha)
    records, errors = [], {}
    sel = args.seeds[0]

    def run(name, spec, lr, seed):
        key = store.key(spec.key(), lr, seed)
        rec = store.get(key)
        if rec is None:
            t0, c0 = time.perf_counter(), time.process_time()
            pm = inits.get(spec, seed)
            size = adapter_size(pm)
            torch.manual_seed(seed)
            res = train_run(pm, task, args, lr, seed, base["final_loss"])
            rec = {"key": key, "method": name, "spec": spec.key(), "lr": lr, "seed": seed, **res, "size": size,
                   "init_s": inits.init_seconds(spec), "wall_s": time.perf_counter() - t0,
                   "cpu_s": time.process_time() - c0, "load_avg": os.getloadavg()[0]}
            store.add(rec)
            del pm
            print(f"[{stem}] {name:18s} lr {lr:<8g} seed {seed}: validation {res['val_loss']:.4f}, held-out "
                  f"{res['final_loss']:.4f} ({rec['wall_s']:.0f} s; {time.perf_counter() - t_start:.0f} s so far)",
                  flush=True)
        records.append({**rec, "method": name})
        return rec

    for name, spec in methods.items():
        try:
            sweep = {lr: run(name, spec, lr, sel)["val_loss"] for lr in args.lrs}
            for _ in range(args.max_extend):
                nxt = qs.next_grid_point(sweep, args.per_decade)
                if nxt is None:
                    break
                sweep[nxt] = run(name, spec, nxt, sel)["val_loss"]
            best = qs.pick(sweep)
            if best is not None:
                for seed in args.seeds[1:]:
                    run(name, spec, best, seed)
        except Unavailable as exc:
            errors[name] = str(exc)
            print(f"[{stem}] {name}: not run: {exc}", flush=True)
    summary = qs.summarise(records, list(methods), reference, sel)
    for name, why in errors.items():
        summary[name]["error"] = f"not run: {why}"
    meta = {"settings": settings_of(args), "settings_text": task.settings_text, "selection_seed": sel,
            "base_loss": base["final_loss"], "base_val_loss": base["val_loss"], "base_metric": base.get("metric"),
            "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "wall_s": time.perf_counter() - t_start,
            "notes": {n: s.note for n, s in methods.items()}}
    md = qs.markdown(summary, meta, reference, task.metric_name, task.metric_floor)
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1,
                                                 default=str))
    qs.plot(summary, out / f"{stem}.png", ylabel=f"held-out {task.loss_name}", reference=reference)
    print(md, flush=True)
    return {"summary": summary, "meta": meta, "records": records}
