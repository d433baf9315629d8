"""PEFT integration: build the ``PeftModel``, write ``B``, ``A`` and the residual weights, save,
load onto the original base, and the report.

On disk an initialisation is a standard PEFT adapter directory plus a few files of ours::

    out/
      adapter_config.json, adapter_model.safetensors   the initial adapter (B0, A0), PEFT format
      fisherlora.json        what the residual needs: config, scalings, base-weight fingerprints
      report.json, report.md, energy.png
      statistics.safetensors (optional) the K-FAC factors, to re-run selection without new passes
      residual/              (optional) the residual base model W_res, for plain-PEFT users

The residual ``W_res = W − s·B0 A0`` is rebuilt from the ORIGINAL base and the initial adapter
by :func:`load`, so no residual model has to be written. After training, PEFT converts the
trained adapter to a plain LoRA on the original base with
``peft_model.save_pretrained(dir, path_initial_model_for_weight_conversion=out)``
(the saved config has ``init_lora_weights=True`` as that mechanism requires).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fisherlora import __version__
from fisherlora.collect import (
    FisherStatistics,
    StatisticsCollector,
    decoder_layer_index,
    find_target_modules,
    fingerprints_match,
    is_conv1d,
    run_calibration,
    weight_fingerprint,
)
from fisherlora.config import FisherLoraConfig
from fisherlora.decompose import LayerSelection, decompose_layer, iter_thin_svd, residual_weight

__all__ = [
    "FisherLoraResult",
    "collect_statistics",
    "compute_initialization",
    "initialize_fisher_lora",
    "get_peft_model",
    "load",
    "atomic_output_dir",
    "check_output_dir",
    "peak_memory_mb",
]

META_FILE = "fisherlora.json"
log = logging.getLogger("fisherlora")


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory so far in MiB: the CUDA allocator's peak on a GPU, else the process's max RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _weight(module: nn.Module) -> torch.Tensor:
    """``(d_out, d_in)`` view of a Linear/Conv1D weight."""
    return module.weight.T if is_conv1d(module) else module.weight


def _progress(total: int, desc: str, enabled: bool, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=True)


def _ranks_and_scalings(lora_config, names: list[str]) -> dict[str, tuple[int, float]]:
    """``(r, s)`` per layer as PEFT will build it (rank_pattern/alpha_pattern, rsLoRA)."""
    from peft.utils.other import get_pattern_key

    out = {}
    for name in names:
        r = lora_config.r
        alpha = lora_config.lora_alpha
        if lora_config.rank_pattern:
            r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), r)
        if lora_config.alpha_pattern:
            alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), name), alpha)
        out[name] = (r, alpha / (r**0.5 if lora_config.use_rslora else r))
    return out


def collect_statistics(model: nn.Module, modules: dict[str, nn.Module], batches, config: FisherLoraConfig, *,
                       mode: str = "full", bases: dict | None = None, num_batches: int | None = None,
                       progress: bool = True, desc: str = "calibration (fwd+bwd)") -> FisherStatistics:
    """Run the calibration passes over ``batches`` and return the statistics of ``modules``.

    Args:
        model: a causal LM (output with ``.logits``). modules: layer name -> module.
        batches: iterable of ``{"input_ids", "attention_mask", "labels"}`` dicts.
        config: fisher type, label draws, seed, statistics dtype and backend.
        mode, bases: the memory mode and, for ``"projected"``, the singular bases
            (see :class:`fisherlora.StatisticsCollector`); the projected mode, the memory-lean
            one, also recomputes the decoder layers in the backward pass (activation
            checkpointing).

    Raises:
        ValueError: empty data. RuntimeError/FloatingPointError: as
            :meth:`StatisticsCollector.statistics`. The model is restored in every case.
    """
    dtype = getattr(torch, config.stats_dtype)
    collector = StatisticsCollector(model, modules, stats_dtype=dtype, backend=config.backend, mode=mode,
                                    bases=bases, checkpoint=mode == "projected")
    with collector as col, _progress(num_batches or 0, desc, progress, "seq") as bar:
        totals = run_calibration(model, batches, fisher_type=config.fisher_type.value,
                                 mc_samples=config.mc_samples, seed=config.seed, progress=bar)
    return col.statistics(info={"calibration": totals, "fisher_type": config.fisher_type.value})


@dataclass
class LayerInit:
    """Initial LoRA factors of one layer (float32, on the weight's device); the residual is
    computed from them when it is written."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float


def _check_layers(modules: dict[str, nn.Module], plan: dict[str, tuple[int, float]]) -> None:
    for name, (r, _) in plan.items():
        d_out, d_in = _weight(modules[name]).shape
        if r > min(d_out, d_in):
            raise ValueError(f"rank {r} exceeds min(d_out, d_in) = {min(d_out, d_in)} of layer {name!r} "
                             f"({d_out}x{d_in})")


def compute_initialization(modules: dict[str, nn.Module], stats: FisherStatistics, lora_config,
                           config: FisherLoraConfig, *, bases: dict | None = None, progress: bool = True,
                           svd_seconds: dict | None = None):
    """Decompose every layer of ``modules`` (no change to the model).

    Args:
        modules: layer name -> Linear/Conv1D. stats: their statistics (any kind).
        lora_config: the PEFT ``LoraConfig`` (ranks, scalings). config: score, magnitude, damping.
        bases: precomputed ``(U, S, Vh)`` per layer (required for projected statistics: they are
            only meaningful on the bases they were accumulated on); else computed here, batched
            by shape (:func:`fisherlora.decompose.iter_thin_svd`), one chunk at a time.
        svd_seconds: if given, solver seconds per weight shape are added to it.

    Returns:
        ``(inits, selections)``: layer name -> :class:`LayerInit`, and -> :class:`LayerSelection`.

    Raises:
        ValueError: a rank larger than ``min(d_in, d_out)``, or statistics that do not match
            the layers (naming them).
    """
    plan = _ranks_and_scalings(lora_config, list(modules))
    _check_layers(modules, plan)
    for name, module in modules.items():
        if name not in stats.G:
            raise ValueError(f"the statistics hold no factors for layer {name!r}")
        if tuple(stats.shapes[name]) != tuple(_weight(module).shape):
            raise ValueError(f"the statistics of {name!r} are for shape {tuple(stats.shapes[name])}, "
                             f"the layer is {tuple(_weight(module).shape)}")
    if stats.kind == "projected" and bases is None:
        raise ValueError("projected statistics need the singular bases they were accumulated on")
    svds = bases.items() if bases is not None else iter_thin_svd(
        {n: _weight(m) for n, m in modules.items()}, seconds=svd_seconds)
    inits, selections = {}, {}
    with _progress(len(modules), "decomposition (SVD+energy)", progress, "layer") as bar:
        for name, svd in svds:
            r, s = plan[name]
            A, G = stats.factors(name)
            sel, B, A_lora = decompose_layer(
                name, _weight(modules[name]), A, G, rank=r, scaling=s, score=config.score,
                magnitude=config.magnitude, damping=config.damping, backend=config.backend,
                projected=stats.kind == "projected", svd=svd)
            inits[name] = LayerInit(B, A_lora, s)
            selections[name] = sel
            bar.update(1)
    order = list(modules)  # the SVDs ran grouped by shape; report in model order
    return {n: inits[n] for n in order}, {n: selections[n] for n in order}


def layer_groups(modules: dict[str, nn.Module], n_groups: int) -> list[dict[str, nn.Module]]:
    """Split target layers into ``n_groups`` contiguous groups of decoder layers.

    The decoder layer of a module is the first integer in its dotted name
    (:func:`fisherlora.collect.decoder_layer_index`: ``model.layers.7.mlp.up_proj`` -> 7);
    modules without one join the first group.
    """

    def index(name):
        where = decoder_layer_index(name)
        return -1 if where is None else where[1]

    indices = sorted({index(n) for n in modules})
    n_groups = max(1, min(n_groups, len(indices)))
    per = -(-len(indices) // n_groups)
    group_of = {idx: min(i // per, n_groups - 1) for i, idx in enumerate(indices)}
    groups = [dict() for _ in range(n_groups)]
    for name, module in modules.items():
        groups[group_of[index(name)]][name] = module
    return [g for g in groups if g]


@dataclass
class FisherLoraResult:
    """An initialised model and everything needed to save and report it."""

    model: object  # peft.PeftModel
    statistics: FisherStatistics
    selections: dict[str, LayerSelection]
    config: FisherLoraConfig
    fingerprints: dict[str, dict]
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    extra: dict = field(default_factory=dict)

    def report(self) -> dict:
        """JSON-ready report: config, totals, timings, memory and one entry per layer."""
        layers = [s.to_dict() for s in self.selections.values()]
        for entry in layers:
            key = self.statistics.a_key[entry["name"]]
            entry.update(a_factor=key, tokens_A=self.statistics.a_count[key],
                         tokens_G=self.statistics.g_count[entry["name"]])
        n = max(len(layers), 1)
        return {
            "fisherlora_version": __version__,
            "config": self.config.to_dict(),
            "num_layers": len(layers),
            "mean_energy_captured": sum(e["energy_captured"] for e in layers) / n,
            "mean_score_captured": sum(e["score_captured"] for e in layers) / n,
            "mean_pissa_overlap": sum(e["pissa_overlap"] for e in layers) / n,
            "calibration": self.statistics.info.get("calibration", {}),
            "timings_s": self.timings,
            "peak_memory_mb": self.peak_memory_mb,
            **self.extra,
            "layers": layers,
        }

    def save(self, out_dir, *, overwrite: bool = False, save_statistics: bool = False,
             residual: bool = False, tokenizer=None) -> Path:
        """Write the adapter directory (module docstring), atomically.

        Everything is written to a temporary sibling directory renamed at the end, so a failure
        leaves nothing behind.

        Raises:
            FileExistsError: ``out_dir`` exists and is not empty, without ``overwrite``.
        """
        from fisherlora.report import write_report

        if save_statistics and not self.statistics.G:
            raise ValueError("the statistics were freed (keep_statistics=False): nothing to save")
        t0 = time.perf_counter()
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp)
            meta = {"fisherlora_version": __version__, "config": self.config.to_dict(),
                    "base_model": getattr(self.model.get_base_model(), "name_or_path", None),
                    "layers": {n: {"a_factor": self.statistics.a_key[n]} for n in self.selections},
                    "base_weight_fingerprints": self.fingerprints}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
            if save_statistics:
                self.statistics.save(tmp / "statistics.safetensors")
            if residual:
                save_residual_model(self.model, tmp / "residual", tokenizer=tokenizer)
            self.timings["save"] = time.perf_counter() - t0
            write_report(self.report(), self.selections, tmp)
        return Path(out_dir)


def check_output_dir(out_dir, *, overwrite: bool = False) -> Path:
    """``out_dir`` as an absolute Path, if it may be written; creates nothing.

    The path is normalised first (``a/../b`` is ``b``), so the check looks at the directory that
    will really be replaced, even when ``a`` does not exist yet.

    Raises:
        FileExistsError: it exists and is non-empty and ``overwrite`` is false, it is a file, or
            its nearest existing ancestor is not a writable directory.
    """
    out = Path(os.path.abspath(out_dir))
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        what = "is a file" if not out.is_dir() else "exists and is not empty"
        raise FileExistsError(f"output {str(out)!r} {what}; choose another path or pass --overwrite")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise FileExistsError(f"cannot create output {str(out)!r}: {str(ancestor)!r} is not a writable directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir, *, overwrite: bool = False):
    """Yield a temporary directory that replaces ``out_dir`` only if the block succeeds.

    Raises:
        FileExistsError: ``out_dir`` exists and is non-empty and ``overwrite`` is false
            (checked before any work), or ``out_dir`` is a file.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _lora_layers(peft_model, adapter_name: str = "default"):
    """``(name in the base model, LoRA layer)`` for every adapted layer."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _restore_on_error(model: nn.Module):
    """Put ``model`` back exactly if the block raises: modules, flags, hooks, attributes, and the
    weights overwritten through the yielded ``stash`` (call ``stash(param)`` before writing it).

    The originals are kept until the block ends where they do not compete with the model: an
    accelerator's weights in host memory, host weights in a temporary file (a copy in RAM would
    nearly double a CPU run's peak, since the target layers are most of a model's weights)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    hooks = [(m, {h: set(getattr(m, h)) for h in _HOOK_DICTS}) for m in model.modules()]
    attrs = set(vars(model))
    originals: list[tuple[torch.Tensor, torch.Tensor | Path]] = []
    spill: list[tempfile.TemporaryDirectory] = []

    def stash(param: torch.Tensor) -> None:
        if not _stash_on_disk(param):
            originals.append((param, param.detach().to("cpu", copy=True)))
            return
        if not spill:
            spill.append(tempfile.TemporaryDirectory(prefix="fisherlora-stash-"))
        path = Path(spill[0].name) / f"{len(originals)}.pt"
        torch.save(param.detach(), path)
        originals.append((param, path))

    try:
        yield stash
    except BaseException:
        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            for param, saved in originals:
                if isinstance(saved, Path):
                    saved = torch.load(saved, map_location=param.device, weights_only=True)
                param.copy_(saved)
        for m, before in hooks:
            for h, keys in before.items():
                for k in set(getattr(m, h)) - keys:
                    del getattr(m, h)[k]

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                setattr(parent, name.rpartition(".")[2], module.get_base_layer())
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag
        for extra in set(vars(model)) - attrs:
            delattr(model, extra)
        raise
    finally:
        for d in spill:
            d.cleanup()


def _stash_on_disk(param: torch.Tensor) -> bool:
    """Where :func:`_restore_on_error` keeps an original: a temporary file for host weights."""
    return param.device.type == "cpu"


def _wrap_and_write(model: nn.Module, lora_config, inits: dict[str, LayerInit]):
    """Wrap with PEFT and write B, A and the residual weights (model restored on error)."""
    import copy

    import peft

    cfg = copy.deepcopy(lora_config)
    cfg.init_lora_weights = True  # cheap (B = 0) and what PEFT's conversion to plain LoRA expects
    with _restore_on_error(model) as stash:
        peft_model = peft.get_peft_model(model, cfg)
        layers = dict(_lora_layers(peft_model))
        missing = set(inits) - set(layers)
        if missing:
            raise RuntimeError(f"PEFT did not adapt {sorted(missing)[:5]}; fisherlora and PEFT disagree on targets")
        with torch.no_grad():
            for name, init in inits.items():
                layer = layers[name]
                if abs(layer.scaling["default"] - init.scaling) > 1e-6 * init.scaling:
                    raise RuntimeError(f"{name}: PEFT scaling {layer.scaling['default']} != expected {init.scaling}")
                layer.lora_A["default"].weight.copy_(init.A)
                layer.lora_B["default"].weight.copy_(init.B)
            for name, init in inits.items():  # residuals last; each original is stashed first
                base = layers[name].get_base_layer()
                W_res = residual_weight(_weight(base), init.B, init.A, init.scaling)
                stash(base.weight)
                base.weight.copy_(W_res.T if is_conv1d(base) else W_res)
    return peft_model


def resolve_memory_mode(model: nn.Module, lora_config, config: FisherLoraConfig) -> tuple[str, int]:
    """``(mode, layer_groups)`` to run: the configured ones, or for ``memory_mode="auto"`` the
    fastest plan (:func:`fisherlora.plan.choose_mode`) whose peak fits the device's free memory
    (the weights, already loaded, are counted as available). The choice is logged."""
    if config.memory_mode.value != "auto":
        return config.memory_mode.value, config.layer_groups
    from fisherlora.plan import GB, choose_mode, free_memory_bytes, plan_memory

    param = next(model.parameters())
    plans = plan_memory(model, lora_config, batch_size=config.batch_size, max_length=config.max_length,
                        stats_bytes=4 if config.stats_dtype == "float32" else 8,
                        bases_bytes=param.element_size() if config.bases_dtype == "model" else 4)
    free = free_memory_bytes(param.device) + plans[0].weights
    pick = choose_mode(plans, free, None if config.layer_groups == 1 else config.layer_groups)
    log.warning("fisherlora: memory_mode=auto chose %s with %d layer group(s): planned peak %.2f GB of %.2f GB "
                "available on %s%s", pick.mode, pick.layer_groups, pick.total / GB, free / GB, param.device,
                "" if pick.total <= free else " (nothing fits: the smallest plan; lower batch_size or max_length)")
    return pick.mode, pick.layer_groups


def initialize_fisher_lora(model: nn.Module, lora_config=None, data=None,
                           fisher_config: FisherLoraConfig | None = None, *,
                           statistics: FisherStatistics | None = None, num_batches: int | None = None,
                           progress: bool = True, keep_statistics: bool = True) -> FisherLoraResult:
    """Fisher-guided LoRA initialisation of ``model`` (FILet, arXiv 2605.01046; DESIGN.md §1).

    Args:
        model: a ``transformers`` causal LM (or any module whose output has ``.logits``). It is
            wrapped in place by PEFT, as ``peft.get_peft_model`` does; on error it is restored.
        lora_config: a ``peft.LoraConfig`` (r, lora_alpha, rsLoRA, target_modules, patterns);
            default ``fisher_config.to_lora_config()``.
        data: calibration batches ``{"input_ids", "attention_mask", "labels"}`` (see
            :func:`fisherlora.data.calibration_batches`); re-iterable (a list, a DataLoader)
            when ``layer_groups > 1`` since each group makes its own pass. Not needed with
            ``statistics``.
        fisher_config: :class:`FisherLoraConfig` (default: all defaults), including the memory
            mode and layer groups (DESIGN.md §4).
        statistics: precomputed statistics (e.g. :meth:`FisherStatistics.load`), to re-select
            with another rank without new passes (full or packed kinds).
        num_batches: for the progress bar (sequences); optional.
        keep_statistics: keep the factors in the result (to save them); ``False`` frees each
            layer group's factors as soon as it is decomposed.

    Returns:
        :class:`FisherLoraResult` whose ``.model`` is the initialised ``peft.PeftModel``; right
        after initialisation its outputs equal the base model's (up to rounding).

    Raises:
        ValueError: bad config, empty data, a rank larger than a layer allows, targets that match
            nothing, one-shot data with several layer groups. FloatingPointError: non-finite
            statistics (naming the layer).
    """
    config = fisher_config or FisherLoraConfig()
    lora_config = lora_config if lora_config is not None else config.to_lora_config()
    device = next(model.parameters()).device
    modules = find_target_modules(model, lora_config)
    _check_layers(modules, _ranks_and_scalings(lora_config, list(modules)))
    if statistics is None and data is None:
        raise ValueError("initialize_fisher_lora needs calibration data or precomputed statistics")
    if statistics is not None and statistics.kind == "projected":
        raise ValueError("projected statistics cannot be reused: they hold only the energies on the bases "
                         "of one run; save full or packed statistics to re-select")
    mode, n_groups = resolve_memory_mode(model, lora_config, config) if statistics is None else ("given", 1)
    groups = layer_groups(modules, n_groups)
    if len(groups) > 1 and iter(data) is data:
        raise ValueError(f"layer_groups={n_groups} makes one pass over the data per group: pass re-iterable data "
                         "(a list or a DataLoader), not a one-shot iterator")
    fingerprints = {n: weight_fingerprint(_weight(m)) for n, m in modules.items()}
    if statistics is not None:  # statistics carry the fingerprints of the model they came from
        theirs = statistics.info.get("weight_fingerprints", {})
        other = [n for n in modules if n in theirs and not fingerprints_match(theirs[n], fingerprints[n])]
        if other:
            raise ValueError(f"these statistics were collected on another model: the weights of {other[:3]} differ")
    timings = {"collect": 0.0, "svd": 0.0, "decompose": 0.0}
    svd_seconds: dict[str, float] = {}
    bases_dtype = torch.float32 if config.bases_dtype == "float32" else next(model.parameters()).dtype
    inits, selections, parts = {}, {}, []
    for gi, group in enumerate(groups):
        bases = None
        stats = statistics
        if stats is None:
            if mode == "projected":  # the SVD first: the hooks project on the bases
                t0 = time.perf_counter()
                bases = dict(iter_thin_svd({n: _weight(m) for n, m in group.items()}, out_dtype=bases_dtype,
                                           seconds=svd_seconds))
                timings["svd"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            desc = "calibration (fwd+bwd)" + (f" group {gi + 1}/{len(groups)}" if len(groups) > 1 else "")
            stats = collect_statistics(model, group, data, config, mode=mode,
                                       bases={n: (u, vh) for n, (u, _, vh) in bases.items()} if bases else None,
                                       num_batches=num_batches, progress=progress, desc=desc)
            stats.info["weight_fingerprints"] = {n: fingerprints[n] for n in group}
            timings["collect"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        inits_g, sels_g = compute_initialization(group, stats, lora_config, config, bases=bases, progress=progress,
                                                 svd_seconds=svd_seconds)
        timings["decompose"] += time.perf_counter() - t0
        inits.update(inits_g)
        selections.update(sels_g)
        del bases
        if statistics is None:
            if not keep_statistics:
                stats.drop_tensors()
            parts.append(stats)
    if statistics is None:
        statistics = FisherStatistics.merge(parts)
    t0 = time.perf_counter()
    peft_model = _wrap_and_write(model, lora_config, inits)
    timings["initialize"] = time.perf_counter() - t0
    if not timings["svd"]:  # the SVD ran inside "decompose"
        del timings["svd"]
    result = FisherLoraResult(peft_model, statistics, selections, config, fingerprints, timings,
                              peak_memory_mb(device))
    result.extra.update(memory_mode=mode, layer_groups=len(groups), svd_seconds_per_shape=svd_seconds)
    return result


def get_peft_model(model: nn.Module, lora_config=None, data=None, fisher_config: FisherLoraConfig | None = None,
                   **kwargs):
    """Like ``peft.get_peft_model``, with the LoRA factors initialised from Fisher information.

    The data-driven counterpart of PEFT's ``init_lora_weights="pissa"``: see :func:`initialize_fisher_lora`
    for the arguments. Returns the initialised ``peft.PeftModel``.
    """
    return initialize_fisher_lora(model, lora_config, data, fisher_config, **kwargs).model


def save_residual_model(peft_model, path: Path, tokenizer=None) -> None:
    """Save the residual base model (base weights ``W_res``, no LoRA) as a ``transformers`` folder.

    The model is rebuilt from its config without ``quantization_config`` (``save_pretrained``
    refuses GGUF-loaded models) and given the residual state dict.
    """
    import copy

    base = peft_model.get_base_model()
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = type(base)(config)
    clean.load_state_dict(state, assign=True, strict=False)
    clean.tie_weights()
    clean.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load(base_model: nn.Module, out_dir, *, adapter=None, is_trainable: bool = False):
    """Re-apply a saved initialisation to the ORIGINAL base model.

    The residual ``W_res = W − s·B0 A0`` is rebuilt from the initial adapter in ``out_dir``; then
    the adapter's weights are the trained ones from ``adapter`` (a PEFT adapter directory
    trained from this initialisation) if given, else the initial ones.

    Args:
        base_model: the model the initialisation was computed from, unmodified.
        out_dir: a directory written by :meth:`FisherLoraResult.save` / ``fisherlora init``.
        adapter: optional trained adapter directory (same LoRA shape).
        is_trainable: load the adapter for further training.

    Returns:
        ``peft.PeftModel`` on the residual base.

    Raises:
        FileNotFoundError: ``out_dir`` is not a fisherlora output. ValueError: the base model's
            weights do not match the recorded fingerprints (a different base), or the trained
            adapter's shapes differ. The base model is restored on error.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    out = Path(out_dir)
    meta_path = out / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{str(out)!r} holds no {META_FILE}: not a fisherlora output directory")
    meta = json.loads(meta_path.read_text())
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {str(adapter)!r} is not a PEFT adapter directory (no adapter_config.json)")
    with _restore_on_error(base_model) as stash:
        peft_model = PeftModel.from_pretrained(base_model, str(out), is_trainable=is_trainable)
        with torch.no_grad():
            layers = dict(_lora_layers(peft_model))
            for name, recorded in meta["base_weight_fingerprints"].items():
                if name not in layers:
                    raise ValueError(f"layer {name!r} of the saved initialisation is not in this model")
                have = weight_fingerprint(_weight(layers[name].get_base_layer()))
                if not fingerprints_match(recorded, have):
                    raise ValueError(f"this base model is not the one the adapter was initialised from: the weight "
                                     f"of {name!r} differs (another checkpoint, or loaded in another dtype?)")
            trained = None
            if adapter is not None:  # read and check the trained weights before any weight is written
                trained = load_peft_weights(str(adapter), device="cpu")
                expected = {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}
                wrong = [k for k, v in trained.items() if k not in expected or expected[k] != v.shape]
                if wrong or len(trained) != len(expected):
                    raise ValueError(f"the adapter {str(adapter)!r} does not match this initialisation "
                                     f"(LoRA shapes or layers differ, e.g. {wrong[:2]})")
            for layer in layers.values():
                base = layer.get_base_layer()
                delta = layer.scaling["default"] * (layer.lora_B["default"].weight.float()
                                                    @ layer.lora_A["default"].weight.float())
                W = _weight(base).float() - delta
                stash(base.weight)
                base.weight.copy_(W.T if is_conv1d(base) else W)
            if trained is not None:
                set_peft_model_state_dict(peft_model, trained)
    return peft_model
