"""Memory planning: the peak memory of each mode, without loading weights (docs/DESIGN.md §4).

Every figure is in bytes. A plan is the weights plus the largest of the run's phases, whose
closed forms live in :mod:`fisherlora.footprint` (fingerprints, the projected mode's SVDs,
calibration, decomposition, write). The statistics closed forms: ``naive`` (a comparison, not a
mode) one dense float32 ``A`` and ``G`` per layer, ``Σ (d_in² + d_out²)·4``; ``full`` one ``A``
per distinct input (q/k/v and gate/up share), ``(Σ_distinct-inputs d_in² + Σ_layers d_out²)·4``;
``packed`` ``d(d+1)/2`` per factor; ``projected`` ``2k`` floats per layer. They are finalised in
place, so nothing of their size is added when a pass ends. With ``layer_groups = g`` a group's
factors are dropped after its decomposition only with ``keep_statistics=False``; otherwise they
stay to the end. The sharing of ``A`` is found by running :class:`fisherlora.StatisticsCollector`
on a meta-device copy of the model, the same mechanism that shares ``A`` at collection time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fisherlora.collect import StatisticsCollector
from fisherlora.config import FisherLoraConfig, MemoryMode
from fisherlora.footprint import Architecture, Footprint
from fisherlora.layers import check_ranks, find_target_modules, layer_groups, layer_shape, ranks_and_scalings
from fisherlora.quant import planned_weight_bytes

__all__ = ["ModePlan", "plan_memory", "choose_mode", "free_memory_bytes", "shared_activation_factors",
           "resolve_memory_mode"]

log = logging.getLogger("fisherlora")
GB = 1e9


@dataclass
class ModePlan:
    """Planned peak memory of one mode, in bytes. ``mode`` is None for the naive baseline (one
    dense ``A`` and ``G`` per layer), which is a comparison, not a mode.

    ``weights`` are the model's parameters; ``activations`` one calibration batch's (the largest
    group's pass); ``statistics`` the most factors held at once; ``svd_workspace`` one SVD's
    workspace (for ``projected`` plus a group's singular bases). These need not coexist:
    ``phases`` gives the bytes beyond the weights at the peak of each phase
    (:mod:`fisherlora.footprint`),
    and ``total`` is the weights plus the largest of them.
    """

    mode: MemoryMode | None
    layer_groups: int
    weights: int
    activations: int
    statistics: int
    svd_workspace: int
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + max(self.phases.values(), default=0)

    @property
    def peak_phase(self) -> str:
        """The phase that sets ``total``."""
        return max(self.phases, key=self.phases.get) if self.phases else ""

    @property
    def label(self) -> str:
        """``"naive"`` or the mode's value."""
        return "naive" if self.mode is None else self.mode.value

    def to_dict(self) -> dict:
        return {**asdict(self), "mode": self.label, "total": self.total, "peak_phase": self.peak_phase}


def shared_activation_factors(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Layer name -> key of its (shared) activation factor, from a 4-token meta forward.

    Falls back to one factor per layer (no sharing: an upper bound) if the model cannot run on
    the meta device.
    """
    meta = model
    if next(model.parameters()).device.type != "meta":
        try:
            with torch.device("meta"):
                meta = type(model)(model.config)
        except Exception:  # not a transformers model: no meta rebuild
            return {n: n for n in modules}
    meta_modules = {n: meta.get_submodule(n) for n in modules}
    try:
        with StatisticsCollector(meta, meta_modules, backend="torch") as col, torch.no_grad():
            meta(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
        return {n: col.a_key.get(n, n) for n in modules}
    except Exception as exc:
        log.info("fisherlora plan: meta forward failed (%s); assuming no shared activation factors", exc)
        return {n: n for n in modules}


def _uses_reference_ops(backend: str, device: torch.device | None) -> bool:
    """Whether the op calls go to the ``torch`` reference (``auto`` without a fast backend)."""
    if backend == "torch":
        return True
    if backend != "auto" or device is None or device.type == "meta":
        return False
    from fisherlora.ops import dispatch

    try:
        return dispatch.resolve("syrk_accumulate_", "auto", device)[0] == "torch"
    except RuntimeError:
        return True


def plan_memory(model: nn.Module, lora_config, *, batch_size: int = 4, max_length: int = 512,
                dtype: torch.dtype | None = None, stats_bytes: int = 4, bases_bytes: int = 4,
                group_options: tuple[int, ...] = (1, 2, 4, 8, 16), keep_statistics: bool = True,
                backend: str = "auto", fisher_type: str = "empirical", mc_samples: int = 1,
                quantisation: dict | None = None, gradient: bool = False) -> list[ModePlan]:
    """Planned peak memory of every mode (and layer-group count) for ``model``.

    Args:
        model: on any device, the meta device included (nothing is allocated).
        lora_config: a PEFT ``LoraConfig`` (its targets and ranks are resolved as PEFT would).
        batch_size, max_length: one calibration batch ``(B, T)``.
        dtype: the weights' dtype (default: the parameters' own).
        stats_bytes: bytes per statistics element (4 for float32).
        bases_bytes: bytes per element of the projected mode's singular bases.
        group_options: layer-group counts to plan for (16: two decoder layers of an 8B model per
            pass, what a 4-bit 8B base needs to fit 12 GB with float32 bases).
        keep_statistics: as :func:`fisherlora.initialize_fisher_lora`'s (its default, and the
            CLI's): every group's factors stay until the end.
        backend: the op backend; ``"torch"`` (or ``"auto"`` on a CPU without the compiled
            extension) is planned with the reference's copies.
        fisher_type, mc_samples: as :class:`~fisherlora.FisherLoraConfig`'s: the true Fisher's
            label draws hold the predictive distribution and, from two draws, a second gradient
            of the logits.
        quantisation: plan a base quantised by bitsandbytes as ``transformers`` loads it (every
            ``nn.Linear`` but the output head): :func:`fisherlora.quant.planned_weight_bytes`'s
            settings (``{"bits": 4, "blocksize": 64, "double_quant": False}`` or ``{"bits": 8}``),
            with one target dequantised at a time (docs/DESIGN.md §8).
        gradient: the initialisation gathers the weight gradient (``init`` other than ``filet``):
            ``d_out × d_in`` statistics per layer on top of ``A`` and ``G``, and no ``projected``
            rows (that mode cannot serve it).

    Returns:
        :class:`ModePlan` rows: ``naive``, then ``full``, ``packed``, ``projected`` per group count.

    Raises:
        ValueError: targets that match nothing, or a rank above ``min(d_out, d_in)`` of a layer
            (:func:`fisherlora.layers.check_ranks`, the check ``init`` makes).
    """
    modules = find_target_modules(model, lora_config)
    names = list(modules)
    shapes = {n: layer_shape(m) for n, m in modules.items()}
    ranks = {n: r for n, (r, _) in ranks_and_scalings(lora_config, names).items()}
    check_ranks(shapes, ranks)
    a_key = shared_activation_factors(model, modules)
    param = next(model.parameters())
    elem = torch.empty((), dtype=dtype).element_size() if dtype is not None else param.element_size()
    weights = sum(p.numel() * (elem if dtype is not None else p.element_size()) for p in model.parameters())
    if quantisation is not None:  # transformers quantises every Linear but the output head
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not head:
                weights += planned_weight_bytes(m.out_features, m.in_features, quantisation) - m.weight.numel() * (
                    elem if dtype is not None else m.weight.element_size())
    arch = Architecture.of(model, max(max(s) for s in shapes.values()))
    reference = _uses_reference_ops(backend, param.device)
    plans = []
    held = [m for m in MemoryMode.held() if not (gradient and m is MemoryMode.PROJECTED)]
    for mode, g in [(None, 1)] + [(m, g) for g in group_options for m in held]:
        groups = [list(x) for x in layer_groups({n: None for n in names}, g)]
        if len(groups) != g:
            continue
        footprint = Footprint(shapes, ranks, a_key, arch, mode, batch_size=batch_size, max_length=max_length,
                              elem=elem, stats_bytes=stats_bytes, bases_bytes=bases_bytes, reference=reference,
                              threads=torch.get_num_threads(), mc_samples=mc_samples if fisher_type == "true" else 0,
                              dequantised=quantisation is not None, gradient=gradient)
        phases, parts = footprint.phases(groups, keep_statistics)
        plans.append(ModePlan(mode, g, weights, phases=phases, **parts))
    return plans


def choose_mode(plans: list[ModePlan], free_bytes: int, layer_groups: int | None = None) -> ModePlan:
    """The fastest plan whose peak fits ``free_bytes``: full, then packed, then projected, each
    with as few layer groups (passes over the data) as possible; the smallest plan if none fits.
    """
    order = MemoryMode.held()
    candidates = [p for p in plans if p.mode in order and (layer_groups is None or p.layer_groups == layer_groups)]
    candidates.sort(key=lambda p: (p.layer_groups, order.index(p.mode)))
    for p in candidates:
        if p.total <= free_bytes:
            return p
    return min(candidates, key=lambda p: p.total)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's ``mem_get_info``, else the OS's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def format_plan(plans: list[ModePlan]) -> list[list[str]]:
    """Table rows (GB) for printing: the components, the total and the phase that sets it."""
    rows = []
    for p in plans:
        label = p.label if p.mode is not None else "baseline (naive)"  # a yardstick, not a --memory-mode value
        rows.append([label, str(p.layer_groups)] + [f"{v / GB:.2f}" for v in
                    (p.weights, p.activations, p.statistics, p.svd_workspace, p.total)] + [p.peak_phase])
    return rows


def resolve_memory_mode(model: nn.Module, lora_config, config: FisherLoraConfig, *,
                        keep_statistics: bool = True) -> tuple[MemoryMode, int]:
    """``(mode, layer_groups)`` to run: the configured ones, or for ``memory_mode="auto"`` the
    fastest plan (:func:`fisherlora.plan.choose_mode`) whose peak fits the device's free memory
    (the weights, already loaded, are counted as available). The choice is logged."""
    if config.memory_mode is not MemoryMode.AUTO:
        return config.memory_mode, config.layer_groups
    param = next(model.parameters())
    plans = plan_memory(model, lora_config, batch_size=config.batch_size, max_length=config.max_length,
                        stats_bytes=4 if config.stats_dtype == "float32" else 8,
                        bases_bytes=param.element_size() if config.bases_dtype == "model" else 4,
                        keep_statistics=keep_statistics, backend=config.backend,
                        fisher_type=config.fisher_type.value, mc_samples=config.mc_samples,
                        gradient=config.init.needs_gradient)
    free = free_memory_bytes(param.device) + plans[0].weights
    pick = choose_mode(plans, free, None if config.layer_groups == 1 else config.layer_groups)
    log.warning("fisherlora: memory_mode=auto chose %s with %d layer group(s): planned peak %.2f GB of %.2f GB "
                "available on %s%s", pick.label, pick.layer_groups, pick.total / GB, free / GB, param.device,
                "" if pick.total <= free else " (nothing fits: the smallest plan; lower batch_size or max_length)")
    return pick.mode, pick.layer_groups
