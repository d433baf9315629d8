"""What each LoRA initialiser costs: wall time per phase, peak memory and calibration tokens.

Same model, same calibration batches, same rank and target modules for every method, in one
run (issue 6). Methods (``--methods`` takes a comma list of these names; ``fisherlora`` selects
every fisherlora variant):

- ``floor``: a plain forward and backward pass over the calibration data with no hooks (the
  weights frozen, the gradient reaching every layer through the embedding output, as fisherlora
  does) plus PEFT PiSSA's full SVD of every target weight. No Fisher-guided method can be faster.
- ``fisherlora[<backend>]`` (and ``fisherlora[<backend>,<memory_mode>]`` when
  ``FisherLoraConfig`` has a ``memory_mode`` field): every backend
  ``fisherlora.ops.available_backends(device)`` reports. Further ``field=value`` items set
  ``FisherLoraConfig`` fields of that run, e.g. ``fisherlora[ext,projected,magnitude=unit]``.
  The gradient starts (``fisherlora[<backend>,full,init=gradient]``, ``...,init=natural_gradient]``,
  issue 31) are listed for every backend, to be measured beside PEFT's ``lora_ga``: they add the
  weight gradient to the hooks and decompose the (whitened) gradient instead of the weight.
- ``naive``: the naive baseline of ``bench/naive.py`` (statistics and selection only).
- PEFT's own initialisers through PEFT's public API: ``lora`` (default, Kaiming A and B = 0),
  ``gaussian``, ``pissa`` (full SVD), ``pissa_niter_4``, ``olora``, ``corda`` (IPM),
  ``eva``, ``lora_ga``.
- ``milora``: MiLoRA (Wang et al. 2024), PiSSA's formula applied to the r SMALLEST singular
  triplets (``B = U_min √(σ_min/s)``, ``A = √(σ_min/s) V_minᵀ``, ``W_res = W − s·B A``); not in PEFT.

Memory: on a CPU each method runs in a fresh subprocess (so one method's RSS peak does not hide
another's) and the peak is the kernel's RSS high-water mark reset after the model and data are
loaded (``bench.common.memory_mark``); on a GPU, the allocator's peak beyond what was allocated
before the method. Both are reported as MiB above that base.

Run: ``python -m bench.init_methods`` (CPU defaults: embedded SmolLM2-135M-Instruct, 32 GSM8K
pairs x 256 tokens, batch 4, r = 16, all seven projections). Writes ``init_methods.{md,json,png}``
under ``--out`` (default ``bench/out/``). On a GPU: ``--device cuda --model /path/to/model
--num-samples 128 --max-length 512 --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_DATA_FREE = {"lora": True, "gaussian": "gaussian", "pissa": "pissa", "pissa_niter_4": "pissa_niter_4",
                  "olora": "olora"}
STATIC_METHODS = ["floor", "naive", "lora", "gaussian", "pissa", "pissa_niter_4", "olora", "milora",
                  "corda", "eva", "lora_ga"]
NOTES = {
    "floor": "fwd+bwd without hooks + PEFT PiSSA full SVD",
    "naive": "bench/naive.py: statistics + selection only (no adapter written)",
    "corda": "IPM; PEFT's hook takes batch size 1: one unpadded sequence per forward",
    "eva": "PEFT defaults (rho=2, tau=0.99): loops over the data until converged; ranks redistributed",
    "lora_ga": "PEFT LoraGAConfig defaults; weight gradients of the mean loss per batch",
    "milora": "PiSSA's formula on the r smallest singular triplets",
    "pissa_niter_4": "randomised SVD, 4 subspace iterations",
}


#: ``FisherLoraConfig.init`` values of the gradient starts (listed per backend, in the full mode)
GRADIENT_STARTS = ("gradient", "natural_gradient")


# ----------------------------------------------------------------------------- method registry
def memory_modes() -> list[str]:
    """The memory modes statistics can be held in (``auto`` only picks one of them)."""
    from fisherlora.config import MemoryMode

    return [m.value for m in MemoryMode.held()]


def fisherlora_variants(device: str) -> list[str]:
    """``fisherlora[backend]`` or ``fisherlora[backend,mode]`` for everything available here."""
    from fisherlora.ops import available_backends

    out = []
    for backend in available_backends(device):
        for mode in memory_modes():
            out.append(f"fisherlora[{backend},{mode}]")
        out += [f"fisherlora[{backend},full,init={init}]" for init in GRADIENT_STARTS]
    return out


def all_methods(device: str) -> list[str]:
    return ["floor", *fisherlora_variants(device), *STATIC_METHODS[1:]]


def select_methods(spec: str | None, device: str) -> list[str]:
    """Expand a ``--methods`` comma list (``fisherlora`` = every variant); unknown names raise."""
    everything = all_methods(device)
    if not spec:
        return everything
    chosen = []
    for name in (s.strip() for s in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", spec) if s.strip()):
        if name.startswith("fisherlora[") and "=" in name:  # a variant with FisherLoraConfig fields
            backend, mode, options = _parse_variant(name)
            plain = f"fisherlora[{backend},{mode}]" if mode else f"fisherlora[{backend}]"
            if plain in everything and _valid_options(name, options):
                chosen += [name] if name not in chosen else []
                continue
        matches = [m for m in everything
                   if m == name or (name == "fisherlora" and m.startswith("fisherlora["))]
        if not matches:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(everything)} "
                             "(or 'fisherlora')")
        chosen += [m for m in matches if m not in chosen]
    if not chosen:
        raise SystemExit(f"--methods {spec!r} names no method; choose from {', '.join(everything)} (or 'fisherlora')")
    return chosen


def lora_config(rank: int, alpha: float, init=True, **kw):
    from peft import LoraConfig

    kw.setdefault("target_modules", list(PROJECTIONS))
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", init_lora_weights=init, **kw)


#: ``FisherLoraConfig`` fields a variant's ``field=value`` may not set: the bracket's backend and
#: mode, and the ``--rank``/``--alpha`` every method of a run shares
_SET_ELSEWHERE = {"backend": "the bracket's first item", "memory_mode": "the bracket's second item",
                  "rank": "--rank", "alpha": "--alpha"}


def _parse_variant(name: str) -> tuple[str, str | None, dict[str, str]]:
    """``fisherlora[backend,mode,field=value,...]`` -> ``(backend, mode or None, {field: value})``.

    Raises:
        SystemExit: no backend, more than a backend and a mode before the fields, or a field set
            elsewhere (:data:`_SET_ELSEWHERE`).
    """
    inner = [item.strip() for item in name[len("fisherlora["):-1].split(",")]
    plain = [item for item in inner if "=" not in item]
    options = {k.strip(): _literal(v.strip()) for k, v in (item.split("=", 1) for item in inner if "=" in item)}
    if not 1 <= len(plain) <= 2 or inner[:len(plain)] != plain:
        raise SystemExit(f"method {name!r}: write fisherlora[<backend>], fisherlora[<backend>,<memory mode>], then "
                         "any field=value items, e.g. fisherlora[ext,projected,magnitude=unit]")
    clash = sorted(set(options) & set(_SET_ELSEWHERE))
    if clash:
        raise SystemExit(f"method {name!r}: {', '.join(clash)} cannot be a field=value item; set it with "
                         + ", ".join(_SET_ELSEWHERE[k] for k in clash))
    return plain[0], (plain[1] if len(plain) > 1 else None), options


def _literal(text: str):
    """A ``field=value`` value: a Python literal (``8``, ``1e-3``, ``True``) or else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _valid_options(name: str, options: dict[str, str]) -> bool:
    """Whether ``options`` are fields of :class:`fisherlora.FisherLoraConfig` with valid values;
    an invalid one exits with the config's own message before any method runs."""
    import fisherlora

    try:
        fisherlora.FisherLoraConfig(**options)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"method {name!r}: {exc}") from None
    return True


def _tensor_mb(obj) -> float:
    """MiB held by the tensors in a dataclass / dict / tensor (statistics memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() / 2**20
    if isinstance(obj, dict):
        return sum(_tensor_mb(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_mb(v) for v in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_mb(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0.0


class _Timer:
    """Wall time per phase, and the process's CPU time (all threads) per phase: on a shared CPU
    machine the CPU time is the steadier measure of the work done."""

    def __init__(self, device: torch.device):
        self.device, self.phases, self.cpu = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        common.synchronize(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        common.synchronize(self.device)
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0
        self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - c0


def floor_pass(model, batches, trainable=()) -> int:
    """Forward + backward of the sum-reduced label loss, no hooks, frozen weights: the gradient
    reaches every layer through the input embeddings (which require grad), as in fisherlora.
    ``trainable``: parameters left trainable, whose gradients autograd then accumulates in
    ``.grad`` (``bench/gradient_pass.py``). Every parameter's flag is restored."""
    from fisherlora.calibration import position_ids_from_mask, token_loss_sum

    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    embed = model.get_input_embeddings()
    device = next(model.parameters()).device
    tokens = 0
    try:
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            emb = embed(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False).logits
            loss, _ = token_loss_sum(logits, batch["labels"].to(device))
            loss.backward()
            tokens += int(mask.sum())
            del logits, loss, emb
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    return tokens


def milora_write(peft_model) -> None:
    """Overwrite every LoRA layer of ``peft_model`` with MiLoRA's factors (minor singular triplets)
    and its base weight with the residual, so the outputs are unchanged."""
    svd_write(peft_model, "bottom", "sigma")


def svd_write(peft_model, pick: str, magnitude: str) -> None:
    """Write PiSSA-form factors of the ``pick`` ("top"/"bottom") r singular triplets of every
    adapted weight, with magnitude ``"sigma"`` (own σ) or ``"unit"``, and the residual base weight
    ``W − s·BA`` (outputs unchanged)."""
    from fisherlora.adapter import lora_layers
    from fisherlora.decompose import lora_factors, residual_weight
    from fisherlora.layers import weight_view, write_weight

    with torch.no_grad():
        for _, module in lora_layers(peft_model):
            base = module.get_base_layer()
            W = weight_view(base)
            r, s = module.r["default"], module.scaling["default"]
            U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
            sl = slice(None, r) if pick == "top" else slice(-r, None)
            m = S[sl] if magnitude == "sigma" else torch.ones_like(S[sl])
            B, A = lora_factors(U[:, sl], Vh[sl], m, s)
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
            write_weight(base, residual_weight(W, B, A, s))


class _CountingLoader:
    """Iterable over ``batches`` that counts the batches and tokens handed out (EVA's passes)."""

    def __init__(self, batches):
        self.batches, self.served, self.tokens = batches, 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.served += 1
            self.tokens += int(b["attention_mask"].sum())
            yield b


def initialize(method: str, model, batches, *, rank: int = 16, alpha: float = 16.0, device=None,
               timer: _Timer | None = None, fisher_options: dict | None = None, lora_kwargs: dict | None = None):
    """Initialise ``model`` with ``method`` (a name of :func:`all_methods` or ``fisherlora``).

    Args:
        model: a causal LM, wrapped in place by PEFT. batches: padded calibration batches.
        fisher_options: extra :class:`fisherlora.FisherLoraConfig` fields (score, magnitude, ...).
        lora_kwargs: extra ``peft.LoraConfig`` fields (``target_modules``, ``task_type``,
            ``modules_to_save``) for a model that is not a Llama-style causal LM.

    Returns:
        ``(peft_model or None, info)``; ``info`` holds ``tokens``, ``passes``, and where they
        apply ``statistics_mb`` and ``notes``. Phase times accumulate in ``timer.phases``.
    """
    import peft

    lk = lora_kwargs or {}
    device = device or next(model.parameters()).device
    timer = timer or _Timer(torch.device(device))
    tokens = common.batch_tokens(batches)
    info = {"tokens": 0, "passes": 0.0, "notes": NOTES.get(method, "")}
    if method == "fisherlora" or method.startswith("fisherlora["):
        import fisherlora

        backend, mode, options = _parse_variant(method) if method != "fisherlora" else ("auto", None, {})
        opts = dict(rank=rank, alpha=alpha, backend=backend, **options, **(fisher_options or {}))
        if mode is not None:
            opts["memory_mode"] = mode
        with timer("total_call"):
            res = fisherlora.initialize_fisher_lora(model, lora_config(rank, alpha, **lk), batches,
                                                    fisherlora.FisherLoraConfig(**opts), progress=False)
        for k, v in res.timings.items():
            timer.phases[k] = v
        cal = res.statistics.info.get("calibration", {})
        info.update(tokens=cal.get("tokens", tokens), passes=1.0, statistics_mb=_tensor_mb(res.statistics))
        return res.model, info
    if method == "floor":
        with timer("pass"):
            info["tokens"] = floor_pass(model, batches)
        with timer("svd"):
            pm = peft.get_peft_model(model, lora_config(rank, alpha, "pissa", **lk))
        info["passes"] = 1.0
        return pm, info
    if method == "naive":
        from bench.naive import naive_select, naive_statistics
        from fisherlora.layers import find_target_modules

        modules = find_target_modules(model, lora_config(rank, alpha, **lk))
        with timer("collect"):
            stats = naive_statistics(model, modules, batches)
        with timer("select"):
            naive_select(model, modules, stats, rank)
        info.update(tokens=tokens, passes=1.0,
                    statistics_mb=sum(_tensor_mb([s["A"], s["G"]]) for s in stats.values()))
        model.requires_grad_(False)
        return None, info
    if method in PEFT_DATA_FREE:
        with timer("wrap"):
            pm = peft.get_peft_model(model, lora_config(rank, alpha, PEFT_DATA_FREE[method], **lk))
        return pm, info
    if method == "milora":
        with timer("wrap"):
            pm = peft.get_peft_model(model, lora_config(rank, alpha, True, **lk))
        with timer("svd"):
            milora_write(pm)
        return pm, info
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg = lora_config(rank, alpha, "corda", corda_config=CordaConfig(corda_method="ipm"), **lk)
        seqs = common.unpadded_sequences(batches)

        def run_model():
            with timer("covariance (fwd, bs=1)"):
                for ids in seqs:
                    model(input_ids=ids.to(device), use_cache=False)

        t0 = time.perf_counter()
        preprocess_corda(model, cfg, run_model=run_model)
        timer.phases["eigens"] = time.perf_counter() - t0 - timer.phases["covariance (fwd, bs=1)"]
        with timer("wrap"):
            pm = peft.get_peft_model(model, cfg)
        info.update(tokens=sum(s.shape[1] for s in seqs), passes=1.0)
        return pm, info
    if method == "eva":
        from peft.tuners.lora.config import EvaConfig
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        # a label per sequence (classification) is no token mask: EVA then takes every non-padding token
        token_labels = all(b["labels"].shape == b["input_ids"].shape for b in batches if "labels" in b)
        with timer("wrap"):
            pm = peft.get_peft_model(model, lora_config(rank, alpha, "eva", eva_config=EvaConfig(
                use_label_mask=token_labels), **lk))
        loader = _CountingLoader([{k: v.to(device) for k, v in b.items()} for b in batches])
        with timer("svd passes"):
            initialize_lora_eva_weights(pm, loader, show_progress_bar=False)
        info.update(tokens=loader.tokens, passes=loader.served / len(batches),
                    tokens_per_pass=tokens)
        info["notes"] += f"; {loader.served} forwards of {len(batches)} batches"
        return pm, info
    if method == "lora_ga":
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        cfg = lora_config(rank, alpha, "lora_ga", lora_ga_config=LoraGAConfig(), **lk)

        def train_step():
            for b in batches:
                out = model(**{k: v.to(device) for k, v in b.items()}, use_cache=False)
                out.loss.backward()

        with timer("gradients"):
            preprocess_loraga(model, cfg, train_step)
        with timer("wrap (grad SVD)"):
            pm = peft.get_peft_model(model, cfg)
        info.update(tokens=tokens, passes=1.0)
        return pm, info
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------- one method, measured
def load_setup(args):
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        setup = common.tiny_setup(max(args.num_samples, 1), args.max_length, args.batch_size)
    elif args.config:  # random weights of an architecture, built on the device (issue 17)
        setup = common.config_setup(args.config, args.num_samples, args.max_length, args.batch_size,
                                    device=args.device, dtype=dtype)
    else:
        setup = common.embedded_setup(args.num_samples, args.max_length, args.batch_size, model=args.model,
                                      device=args.device, dtype=dtype)
    if getattr(args, "load_in_4bit", False):  # every method on the same NF4 base (bench/quantised.py)
        from bench.quantised import quantise_model

        setup = (quantise_model(setup[0], args.device, dtype), *setup[1:])
    return setup


def measure(method: str, args, setup=None) -> dict:
    """Load (or take) the setup, then run ``method`` once between memory marks."""
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, _tok, batches = setup if setup is not None else load_setup(args)
    setup_s = time.perf_counter() - t0
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    timer = _Timer(device)
    before = None
    if getattr(args, "load_in_4bit", False):  # the step-0 output change, outside the measured span
        from bench.quantised import logits, output_change

        before = logits(model, batches[0])
    base = common.memory_mark(device)
    t0, c0 = time.perf_counter(), time.process_time()
    _pm, info = initialize(method, model, batches, rank=args.rank, alpha=args.alpha, device=device,
                           timer=timer)
    common.synchronize(device)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = common.memory_peak(device)
    phases = {k: v for k, v in timer.phases.items() if k != "total_call"}
    if before is not None and _pm is not None:
        info["step0_output_change"] = output_change(before, logits(_pm, batches[0]))
        info["notes"] = "; ".join(filter(None, [info.get("notes"), f"step-0 output change "
                                                                    f"{info['step0_output_change']:.3g}"]))
    return {"method": method, "total_s": total, "cpu_s": cpu, "phases_s": phases, "setup_s": setup_s,
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "peak_mb": peak, "base_mb": base,
            "peak_above_base_mb": None if peak is None or base is None else peak - base,
            "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "rss_high_water_mark",
            **info}


def run_isolated(method: str, args) -> dict:
    """``measure`` in a fresh Python process (its own RSS high-water mark)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.init_methods", "--worker", method, "--worker-out", str(out),
               *forwarded_args(args)]
        root = Path(__file__).resolve().parents[1]
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"method": method, "error": (proc.stderr or proc.stdout)[-3000:]}
        return json.loads(out.read_text())


def forwarded_args(args) -> list[str]:
    out = ["--model", args.model, "--num-samples", str(args.num_samples),
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--device", args.device, "--dtype", args.dtype]
    return (out + (["--tiny"] if args.tiny else []) + (["--config", args.config] if args.config else [])
            + (["--load-in-4bit"] if args.load_in_4bit else []))


# ----------------------------------------------------------------------------- reporting
def add_ratios(results: list[dict]) -> dict:
    """Ratios to the floor's total (wall and CPU) time and to the naive baseline's statistics
    memory; the target check for fisherlora's fastest variant (issue 6)."""
    ok = [r for r in results if "error" not in r]
    floor = next((r for r in ok if r["method"] == "floor"), None)
    naive = next((r for r in ok if r["method"] == "naive"), None)
    for r in ok:
        r["x_floor"] = r["total_s"] / floor["total_s"] if floor else None
        r["x_floor_cpu"] = r["cpu_s"] / floor["cpu_s"] if floor and r.get("cpu_s") and floor.get("cpu_s") else None
        if naive and r.get("statistics_mb") is not None:
            r["stats_vs_naive"] = r["statistics_mb"] / naive["statistics_mb"]
        if naive and r.get("peak_above_base_mb") is not None and naive.get("peak_above_base_mb"):
            r["peak_vs_naive"] = r["peak_above_base_mb"] / naive["peak_above_base_mb"]
    fl = [r for r in ok if r["method"].startswith("fisherlora")]
    verdict = {}
    if fl and floor:
        best = min(fl, key=lambda r: r["total_s"])
        verdict.update(fastest_fisherlora=best["method"], time_x_floor=best["x_floor"],
                       time_target_met=best["x_floor"] <= 1.25)
        if all(r.get("x_floor_cpu") for r in fl):
            best = min(fl, key=lambda r: r["cpu_s"])
            verdict.update(fastest_fisherlora_cpu=best["method"], cpu_x_floor=best["x_floor_cpu"],
                           cpu_target_met=best["x_floor_cpu"] <= 1.25)
    if fl and naive:
        smallest = min(fl, key=lambda r: r["statistics_mb"])
        verdict.update(smallest_statistics_fisherlora=smallest["method"],
                       statistics_vs_naive=smallest["stats_vs_naive"],
                       memory_target_met=smallest["stats_vs_naive"] <= 1 / 8)
        if all(r.get("peak_vs_naive") is not None for r in fl):
            lean = min(fl, key=lambda r: r["peak_vs_naive"])
            verdict.update(smallest_peak_fisherlora=lean["method"], peak_vs_naive=lean["peak_vs_naive"])
    return verdict


def _f(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)


def markdown(results: list[dict], verdict: dict, meta: dict) -> str:
    lines = [f"Settings: {meta['settings']}", "",
             "| method | phases, wall (s) | total wall (s) | × floor (wall) | total CPU (s) | × floor (CPU) | "
             "load avg | peak mem above setup (MiB) | statistics (MiB) | × naive stats | calibration tokens | "
             "passes | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            last = r["error"].strip().splitlines()[-1][:120]
            lines.append(f"| {r['method']} | failed: {last} | | | | | | | | | | | |")
            continue
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
        lines.append(
            f"| {r['method']} | {phases} | {r['total_s']:.2f} | {_f(r.get('x_floor'), '{:.2f}')} | "
            f"{_f(r.get('cpu_s'), '{:.2f}')} | {_f(r.get('x_floor_cpu'), '{:.2f}')} | "
            f"{_f(r.get('load_avg'), '{:.1f}')} | "
            f"{_f(r.get('peak_above_base_mb'), '{:.0f}')} | {_f(r.get('statistics_mb'), '{:.0f}')} | "
            f"{_f(r.get('stats_vs_naive'), '{:.3f}')} | {r['tokens']} | {_f(r.get('passes'), '{:.1f}')} | "
            f"{r.get('notes', '')} |")
    if verdict:
        lines += ["", "Targets (fisherlora's best configuration on these settings):"]
        if "time_x_floor" in verdict:
            met = "met" if verdict["time_target_met"] else "NOT met"
            lines.append(f"- total init ≤ 1.25× floor, wall time: {verdict['fastest_fisherlora']} at "
                         f"{verdict['time_x_floor']:.2f}× — {met}")
        if "cpu_x_floor" in verdict:
            met = "met" if verdict["cpu_target_met"] else "NOT met"
            lines.append(f"- total init ≤ 1.25× floor, CPU time: {verdict['fastest_fisherlora_cpu']} at "
                         f"{verdict['cpu_x_floor']:.2f}× — {met}")
        if "statistics_vs_naive" in verdict:
            lines.append("- statistics memory ≤ 1/8 of naive: "
                         f"{verdict['smallest_statistics_fisherlora']} at "
                         f"{verdict['statistics_vs_naive']:.3f}× — "
                         f"{'met' if verdict['memory_target_met'] else 'NOT met'} (the statistics tensors held "
                         "after collection)")
        if "peak_vs_naive" in verdict:
            lines.append(f"- whole-init peak memory above setup: {verdict['smallest_peak_fisherlora']} at "
                         f"{verdict['peak_vs_naive']:.3f}× the naive baseline's (includes SVD bases, "
                         "activations, autograd buffers)")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    names = [r["method"] for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ok) + 1.5), sharey=True)
    phases = []
    for r in ok:
        phases += [p for p in r["phases_s"] if p not in phases]
    left = [0.0] * len(ok)
    cmap = plt.get_cmap("tab20")
    for i, p in enumerate(phases):
        vals = [r["phases_s"].get(p, 0.0) for r in ok]
        ax1.barh(names, vals, left=left, label=p, color=cmap(i % 20))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax1.set_xlabel("wall time (s), by phase")
    ax1.legend(fontsize=6, loc="lower right")
    ax1.invert_yaxis()
    ax2.barh(names, [r.get("peak_above_base_mb") or 0 for r in ok], color="tab:gray")
    ax2.set_xlabel("peak memory above setup (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=None, help="comma list (default: all); 'fisherlora' = every variant")
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (embedded) or a local model folder")
    common.add_size_flags(p, "alpha", **common.CPU_SIZES)
    p.add_argument("--config", default=None,
                   help="instead of --model: random weights of this architecture (llama-3.2-1b, or a config.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="bench/out", help="output folder (git-ignored by default)")
    p.add_argument("--in-process", action="store_true",
                   help="run every method in this process (a fresh model each); memory peaks then overlap")
    p.add_argument("--render", action="store_true", help="only re-render <out>/init_methods.{md,png} from its json")
    p.add_argument("--merge", action="store_true",
                   help="keep the figures in <out>/init_methods.json of methods not run now (same settings)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="every method on the same bitsandbytes NF4 base (docs/DESIGN.md §8); records the step-0 "
                        "output change")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # random 2-layer Llama: smoke tests
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        torch.manual_seed(0)
        result = measure(args.worker, args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    out = Path(args.out)
    if args.render:  # re-render the tables and plot of an earlier run
        old = json.loads((out / "init_methods.json").read_text())
        print(write_outputs(out, old["results"], old["meta"]))
        return 0
    methods = select_methods(args.methods, args.device)
    out.mkdir(parents=True, exist_ok=True)
    isolated = not args.in_process and args.device == "cpu"
    model_name = "tiny random Llama" if args.tiny else f"random {args.config}" if args.config else args.model
    settings = (f"model={model_name}, {args.num_samples} GSM8K pairs x "
                f"{args.max_length} tokens, batch {args.batch_size}, r={args.rank}, alpha={args.alpha}, "
                f"{', '.join(PROJECTIONS)}, device={args.device}, dtype={args.dtype}, "
                f"{'NF4 4-bit base, ' if args.load_in_4bit else ''}"
                f"torch threads={torch.get_num_threads()}, "
                f"{'one subprocess per method' if isolated else 'in-process'}")
    meta = {"settings": settings, "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:],
            "torch": torch.__version__}
    results = []
    previous = out / "init_methods.json"
    if args.merge and previous.exists():  # keep earlier figures of the methods not run now
        old = json.loads(previous.read_text())
        if old["meta"]["settings"] != settings:
            raise SystemExit(f"--merge: {previous} was measured with other settings: {old['meta']['settings']}")
        results = [r for r in old["results"] if r["method"] not in methods]
        meta["merged_from"] = old["meta"].get("date")
    order = {m: i for i, m in enumerate(all_methods(args.device))}
    for m in methods:
        t0 = time.perf_counter()
        if isolated:
            r = run_isolated(m, args)
        else:
            torch.manual_seed(0)
            try:
                r = measure(m, args)
            except Exception as exc:  # one failing method must not lose the others' figures
                r = {"method": m, "error": f"{type(exc).__name__}: {exc}"}
        r["measured"] = time.strftime("%Y-%m-%d %H:%M")
        results.append(r)
        results.sort(key=lambda r: order.get(r["method"], len(order)))
        status = "FAILED " + r["error"].strip().splitlines()[-1] if "error" in r else f"{r['total_s']:.2f} s"
        print(f"{m:28s} {status}   ({time.perf_counter() - t0:.0f} s with setup)", flush=True)
        md = write_outputs(out, results, meta)  # after every method: a long run keeps what it measured
    print(md)
    return 0 if all("error" not in r for r in results) else 1


def write_outputs(out: Path, results: list[dict], meta: dict) -> str:
    verdict = add_ratios(results)
    md = markdown(results, verdict, meta)
    (out / "init_methods.md").write_text(md)
    (out / "init_methods.json").write_text(json.dumps({"meta": meta, "verdict": verdict, "results": results},
                                                      indent=1))
    plot(results, out / "init_methods.png")
    return md


if __name__ == "__main__":
    raise SystemExit(main())
