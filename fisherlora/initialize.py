"""The initialisation, orchestrated: targets and ranks checked, memory mode chosen, statistics
collected per layer group, layers decomposed, the adapter written, the result assembled
(FILet, arXiv 2605.01046). Every step lives in its own module; this one only sequences them."""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

from fisherlora import allocation, digest, distributed, spread
from fisherlora.adapter import wrap_and_write
from fisherlora.calibration import EmptyCalibrationError
from fisherlora.collect import collect_statistics
from fisherlora.config import FisherLoraConfig, MemoryMode
from fisherlora.decompose import compute_initialization, rank_deficient, warn_rank_deficient
from fisherlora.fingerprint import module_fingerprint
from fisherlora.gradient_init import check_gradient_ranks
from fisherlora.heads import default_lora_config, resolve_head
from fisherlora.layers import (
    check_model,
    check_ranks,
    find_target_modules,
    layer_groups,
    layer_shape,
    ranks_and_scalings,
    unwrap_model,
    weight_views,
)
from fisherlora.memory import peak_memory_mb
from fisherlora.phases import phase
from fisherlora.plan import resolve_memory_mode
from fisherlora.quant import quantisation_summary
from fisherlora.result import FisherLoraResult
from fisherlora.snapshot import keeps_global_rng
from fisherlora.statistics import FisherStatistics
from fisherlora.svd import iter_thin_svd

__all__ = ["initialize_fisher_lora", "get_peft_model"]


def check_statistics_model(statistics: FisherStatistics, model_digest: dict, head_kind: str) -> None:
    """Refuse statistics collected on another model than the one they are reused on.

    ``G`` of a layer depends on everything downstream of it (every later layer, the head, the
    buffers), so the statistics record :func:`fisherlora.digest.model_digest` of the WHOLE model
    and its head's kind (``info["model_digest"]``, ``info["head"]``), and any difference refuses.

    Raises:
        ValueError: naming what differs (the tensors, the class, the head), or a file written
            before the whole model was recorded (it records only the target weights).
    """
    theirs = statistics.info.get("model_digest")
    if theirs is None:
        raise ValueError("these statistics record only the target weights of the model they were collected on (a "
                         "file written before fisherlora recorded the whole model): G depends on every layer after "
                         "a target and on the head, which cannot be checked; collect them again")
    found = digest.differences(theirs, model_digest, ("the statistics' model", "this model"))
    if statistics.info.get("head", head_kind) != head_kind:
        found.append(f"the head ({statistics.info['head']} vs {head_kind})")
    if found:
        raise ValueError("these statistics were collected on another model, and G depends on all of it: "
                         + "; ".join(found) + ". Collect statistics on this model")


@keeps_global_rng
def initialize_fisher_lora(model: nn.Module, lora_config=None, data=None,
                           fisher_config: FisherLoraConfig | None = None, *,
                           statistics: FisherStatistics | None = None, num_batches: int | None = None,
                           progress: bool = True, keep_statistics: bool = True,
                           loss_fn=None, process_group=None) -> FisherLoraResult:
    """Fisher-guided LoRA initialisation of ``model`` (FILet, arXiv 2605.01046; docs/DESIGN.md §1).

    Args:
        model: a ``transformers`` causal LM (or any module whose output has ``.logits``), sequence
            or image classifier, or encoder-decoder LM (:mod:`fisherlora.heads`; any other model
            with ``loss_fn``), bare or in a distributed/compiled container
            (:func:`fisherlora.layers.unwrap_model`). It is wrapped in place by PEFT, as
            ``peft.get_peft_model`` does; on error it is restored.
        lora_config: a ``peft.LoraConfig`` (r, lora_alpha, rsLoRA, target_modules, patterns);
            default ``fisher_config.to_lora_config()`` with the head's PEFT task type.
        data: calibration batches ``{"input_ids", "attention_mask", "labels"}`` (see
            :func:`fisherlora.data.calibration_batches`); re-iterable (a list, a DataLoader)
            when ``layer_groups > 1`` since each group makes its own pass. Not needed with
            ``statistics``.
        fisher_config: :class:`FisherLoraConfig` (default: all defaults), including the memory
            mode and layer groups (docs/DESIGN.md §4).
        statistics: precomputed statistics (e.g. :meth:`FisherStatistics.load`), to re-select
            with another rank without new passes (full or packed kinds).
        num_batches: for the progress bar (sequences); optional.
        keep_statistics: keep the factors in the result (to save them); ``False`` frees each
            layer group's factors as soon as it is decomposed (and ``memory_mode="auto"`` plans
            for that).
        loss_fn: ``loss_fn(outputs, batch)`` for a model without a built-in head (or to replace
            it): the SUM over examples of per-example losses as a 0-d tensor, or ``(sum, count)``;
            every batch key the model's forward accepts is passed to it (docs/DESIGN.md §10).
        process_group: inside an initialised ``torch.distributed`` (or with this group) call this on
            every rank with the same model and the SAME data: each rank runs its share of the
            sequences, the SVDs are spread over the ranks, and every rank ends with bit-identical
            adapters (docs/DESIGN.md §7). Without a group nothing of this happens. The model may
            be sharded with FSDP2 (``fully_shard``): it is initialised in place, each whole weight
            gathered one layer at a time, the residual written into each rank's shard, and the
            LoRA factors sharded like their base layers (:mod:`fisherlora.sharded`).

    Returns:
        :class:`FisherLoraResult` whose ``.model`` is the initialised ``peft.PeftModel``; right
        after initialisation its outputs equal the base model's (up to rounding; on a quantised base
        up to the requantisation error, reported in ``report()["quantisation"]``, docs/DESIGN.md §8).
        torch's global RNG is left as it was (:func:`fisherlora.snapshot.keeps_global_rng`).

    Raises:
        ValueError: bad config, empty data, a rank larger than a layer allows, targets that match
            nothing, target weights that are neither plain float parameters nor bitsandbytes
            4-/8-bit layers or FSDP2 row shards (other quantisations, meta, ZeRO-3 placeholders,
            tensor-parallel DTensors) or that share storage
            with another module (tied weights), a 4-bit layer anywhere in another layout than
            bitsandbytes quantises to, a model already holding PEFT adapters anywhere, one-shot
            data with several layer groups, ``statistics`` collected on another model (any
            parameter, buffer or head differs: :func:`check_statistics_model`), a ``loss_fn``
            whose loss has no graph; for a gradient start (``init`` other than ``filet``,
            docs/DESIGN.md §1 step 6) a layer with ``2·rank > min(d_out, d_in)`` or precomputed
            statistics without the weight gradient; with a process group, ranks that differ in
            the model, the configuration, the calibration set, reused statistics or ``loss_fn``
            (the same error on every rank, naming the ranks and what differs: docs/DESIGN.md §7).
            RankFailedError: a rank failed (on every rank, naming it).
            FloatingPointError: non-finite weights (naming the tensor) or statistics (naming the
            layer). All raised before the model is changed, or with it restored.
    """
    config = fisher_config or FisherLoraConfig()
    ctx = distributed.context(process_group)
    # the ranks agree on the model, the configuration and the whole calibration set before any pass (§7)
    with distributed.agree_before_passes(ctx, "the checks before the calibration passes") as agreed:
        model = unwrap_model(model)
        head = resolve_head(model, loss_fn, config.fisher_type.value)
        lora_config = lora_config if lora_config is not None else default_lora_config(config, head, model)
        if ctx is not None and data is not None and iter(data) is data:
            data = list(data)  # one-shot batches: read once here, for the digest and for the passes
        shared = (data, head, statistics) if ctx is not None else (None, None, None)  # compared across ranks only
        inputs = digest.run_digest(model, config, lora_config, *shared)
        agreed["digest"] = inputs
    device = next(model.parameters()).device
    modules = find_target_modules(model, lora_config)
    check_model(model, modules)  # weight kinds, shared storage, non-finite values: before any pass
    shapes = {n: layer_shape(m) for n, m in modules.items()}
    check_ranks(shapes, {n: r for n, (r, _) in ranks_and_scalings(lora_config, list(modules)).items()})
    check_gradient_ranks(shapes, {n: r for n, (r, _) in ranks_and_scalings(lora_config, list(modules)).items()},
                         config.init)
    by_energy = config.rank_allocation == "global"  # docs/DESIGN.md §10: decompose at the maximum ranks first
    if by_energy:
        allocation.check(lora_config, config, shapes)
    lc_decompose, cfg_decompose = (allocation.candidates(lora_config, config, shapes) if by_energy
                                   else (lora_config, config))
    if statistics is None and data is None:
        raise ValueError("initialize_fisher_lora needs calibration data or precomputed statistics")
    if statistics is not None and statistics.kind is MemoryMode.PROJECTED:
        raise ValueError("projected statistics cannot be reused: they hold only the energies on the bases "
                         "of one run; save full or packed statistics to re-select")
    if statistics is not None and config.init.needs_gradient and not all(n in statistics.grad for n in modules):
        raise ValueError(f"init={config.init.value!r} needs the weight gradient, and these statistics hold none for "
                         "some target layers (they were collected for init='filet'); collect them with this init")
    with phase(f"planning the memory (memory_mode={config.memory_mode.value})"):
        mode, n_groups = (resolve_memory_mode(model, lora_config, config, keep_statistics=keep_statistics)
                          if statistics is None else (statistics.kind, 1))
        if ctx is not None and statistics is None:  # one plan for all ranks: the leanest (docs/DESIGN.md §7)
            mode, n_groups = distributed.agree_on_plan(ctx, mode, n_groups)
    groups = layer_groups(modules, n_groups)
    if len(groups) > 1 and iter(data) is data:
        raise ValueError(f"layer_groups={n_groups} makes one pass over the data per group: pass re-iterable data "
                         "(a list or a DataLoader), not a one-shot iterator")
    fingerprints = {n: module_fingerprint(m) for n, m in modules.items()}
    if statistics is not None:  # statistics carry the digest of the whole model they came from
        check_statistics_model(statistics, inputs["model"], head.kind)
    timings = {"collect": 0.0, "svd": 0.0, "decompose": 0.0}
    svd_seconds: dict[str, float] = {}
    bases_dtype = torch.float32 if config.bases_dtype == "float32" else next(model.parameters()).dtype
    inits, selections, parts = {}, {}, []
    short = []  # layers with a rank-deficient A, over every group: one warning per run
    for gi, group in enumerate(groups):
        where = f"(memory_mode={mode.value}, layer group {gi + 1}/{len(groups)})"
        bases = None
        stats = statistics
        if stats is None:
            if mode is MemoryMode.PROJECTED:  # the SVD first: the hooks project on the bases
                t0 = time.perf_counter()
                with phase(f"the singular value decompositions {where}"):
                    # each weight read (a quantised one dequantised, a sharded one gathered) as its SVD reaches it
                    bases = (spread.spread_svd(ctx, group, out_dtype=bases_dtype, seconds=svd_seconds) if ctx
                             else dict(iter_thin_svd(weight_views(group), out_dtype=bases_dtype, seconds=svd_seconds)))
                timings["svd"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            desc = "calibration (fwd+bwd)" + (f" group {gi + 1}/{len(groups)}" if len(groups) > 1 else "")
            with phase(f"the calibration passes {where}"):
                try:
                    stats = collect_statistics(
                        model, group, data, config, mode=mode, num_batches=num_batches, progress=progress, desc=desc,
                        head=head, process_group=ctx,
                        bases={n: (u, vh) for n, (u, _, vh) in bases.items()} if bases else None)
                except EmptyCalibrationError:
                    if gi == 0:
                        raise
                    raise ValueError(f"layer group {gi + 1} of {len(groups)} got no calibration batch: the data gave "
                                     "its batches once only (its __iter__ returns the same exhausted iterator); each "
                                     "layer group makes its own pass, so pass a list or a DataLoader") from None
            stats.fingerprints = {n: fingerprints[n] for n in group}
            stats.info.update(model_digest=inputs["model"], head=head.kind)  # what G depends on: all of it
            timings["collect"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with phase(f"the decomposition {where}"):
            decompose = partial(spread.spread_initialization, ctx) if ctx else compute_initialization
            inits_g, sels_g = decompose(group, stats, lc_decompose, cfg_decompose, bases=bases,
                                        progress=progress, svd_seconds=svd_seconds, warn=False)
            short += rank_deficient(group, stats) if not (config.damping or config.init.needs_gradient) else []
        timings["decompose"] += time.perf_counter() - t0
        inits.update(inits_g)
        selections.update(sels_g)
        del bases
        if statistics is None:
            if not keep_statistics:
                stats.drop_tensors()
            parts.append(stats)
    warn_rank_deficient(short, len(modules))
    if statistics is None:
        statistics = FisherStatistics.merge(parts)
    if by_energy:
        lora_config, inits, selections, _ = allocation.allocate(inits, selections, statistics, lora_config, config)
    t0 = time.perf_counter()
    with phase(f"writing the adapter into the model (memory_mode={mode.value})"):
        requant = {}
        peft_model = wrap_and_write(model, lora_config, inits, errors=requant)
    timings["initialize"] = time.perf_counter() - t0
    if not timings["svd"]:  # the SVD ran inside "decompose"
        del timings["svd"]
    result = FisherLoraResult(peft_model, statistics, selections, config, fingerprints, timings,
                              peak_memory_mb(device), lora_config=lora_config, process_group=ctx)
    result.extra.update(memory_mode=mode.value, layer_groups=len(groups), svd_seconds_per_shape=svd_seconds)
    if requant:  # a quantised base: the residual was requantised, outputs at step 0 change (§8)
        result.extra["quantisation"] = quantisation_summary(modules, requant)
    return result


@keeps_global_rng
def get_peft_model(model: nn.Module, lora_config=None, data=None, fisher_config: FisherLoraConfig | None = None,
                   **kwargs):
    """Like ``peft.get_peft_model``, with the LoRA factors initialised from Fisher information.

    The data-driven counterpart of PEFT's ``init_lora_weights="pissa"``: see :func:`initialize_fisher_lora`
    for the arguments (``loss_fn=`` included, for a model without a built-in head). Returns the
    initialised ``peft.PeftModel``.
    """
    return initialize_fisher_lora(model, lora_config, data, fisher_config, **kwargs).model
