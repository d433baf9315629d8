"""Memory planning: what each memory mode needs, without loading weights (docs/DESIGN.md §4).

Every figure is in bytes. The statistics figures are exact closed forms:

- ``naive``: one dense float32 ``A`` and ``G`` per layer: ``Σ (d_in² + d_out²)·4``;
- ``full``: dense float32, one ``A`` per distinct input (q/k/v and gate/up share):
  ``(Σ_distinct-inputs d_in² + Σ_layers d_out²)·4``;
- ``packed``: the same with ``d(d+1)/2`` per factor;
- ``projected``: ``2k`` floats per layer for the accumulators, plus the singular bases
  ``U (d_out, k)`` and ``V (d_in, k)`` of the layers in flight (one layer group) in the bases
  dtype, counted as "SVD workspace".

Every mode also holds one matrix's SVD workspace at a time, that of the largest target
(:func:`fisherlora.svd.svd_workspace_bytes`, the float64 Gram path).

With ``layer_groups = g`` only the largest group's statistics are held at once. Activations are
an estimate for one batch (weights frozen), with ``a = (10·hidden + 4·intermediate)·bytes`` the
saved tensors of one Llama-style block per token and ``vocab·bytes`` the logits (the loss,
:func:`fisherlora.calibration.token_loss_sum`, writes their gradient into them):
``B·T·(L·a + vocab·bytes)`` for ``full`` and ``packed``; ``B·T·(L·hidden·bytes + 2a +
vocab·bytes)`` for ``projected``, whose decoder layers are recomputed in the backward pass (only
their inputs are kept, plus one block and its gradients at a time). The sharing of
``A`` is found by running :class:`fisherlora.StatisticsCollector` on a meta-device copy of the
model, the same mechanism that shares ``A`` at collection time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fisherlora.collect import StatisticsCollector
from fisherlora.config import FisherLoraConfig, MemoryMode
from fisherlora.layers import check_ranks, find_target_modules, layer_groups, layer_shape, ranks_and_scalings
from fisherlora.svd import svd_workspace_bytes

__all__ = ["ModePlan", "plan_memory", "choose_mode", "free_memory_bytes",
           "shared_activation_factors", "resolve_memory_mode"]

log = logging.getLogger("fisherlora")
GB = 1e9


@dataclass
class ModePlan:
    """Planned peak memory of one mode, in bytes. ``mode`` is None for the naive baseline (one
    dense ``A`` and ``G`` per layer), which is a comparison, not a mode."""

    mode: MemoryMode | None
    layer_groups: int
    weights: int
    activations: int
    statistics: int
    svd_workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.statistics + self.svd_workspace

    @property
    def label(self) -> str:
        """``"naive"`` or the mode's value."""
        return "naive" if self.mode is None else self.mode.value

    def to_dict(self) -> dict:
        return {**asdict(self), "mode": self.label, "total": self.total}



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


def _groups_sizes(names: list[str], n_groups: int) -> list[list[str]]:
    return [list(g) for g in layer_groups({n: None for n in names}, n_groups)]


def plan_memory(model: nn.Module, lora_config, *, batch_size: int = 4, max_length: int = 512,
                dtype: torch.dtype | None = None, stats_bytes: int = 4, bases_bytes: int = 4,
                group_options: tuple[int, ...] = (1, 2, 4, 8)) -> list[ModePlan]:
    """Planned peak memory of every mode (and layer-group count) for ``model``.

    Args:
        model: on any device, the meta device included (nothing is allocated).
        lora_config: a PEFT ``LoraConfig`` (its targets and ranks are resolved as PEFT would).
        batch_size, max_length: one calibration batch ``(B, T)``.
        dtype: the weights' dtype (default: the parameters' own).
        stats_bytes: bytes per statistics element (4 for float32).
        bases_bytes: bytes per element of the projected mode's singular bases.
        group_options: layer-group counts to plan for.

    Returns:
        :class:`ModePlan` rows: ``naive``, then ``full``, ``packed``, ``projected`` per group count.

    Raises:
        ValueError: targets that match nothing, or a rank above ``min(d_out, d_in)`` of a layer
            (:func:`fisherlora.layers.check_ranks`, the check ``init`` makes).
    """
    modules = find_target_modules(model, lora_config)
    shapes = {n: layer_shape(m) for n, m in modules.items()}
    check_ranks(shapes, {n: r for n, (r, _) in ranks_and_scalings(lora_config, list(modules)).items()})
    a_key = shared_activation_factors(model, modules)
    elem = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    weights = sum(p.numel() * (elem or p.element_size()) for p in model.parameters())
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", max(d for s in shapes.values() for d in s))
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    n_layers = getattr(cfg, "num_hidden_layers", 1)
    vocab = getattr(cfg, "vocab_size", 0)
    act_bytes = elem or next(model.parameters()).element_size()
    block = (10 * hidden + 4 * inter) * act_bytes  # one block's saved tensors, per token
    activations = batch_size * max_length * (n_layers * block + vocab * act_bytes)
    checkpointed = batch_size * max_length * (n_layers * hidden * act_bytes + 2 * block + vocab * act_bytes)

    def dense(names, packed=False, share=True):
        size = (lambda d: d * (d + 1) // 2) if packed else (lambda d: d * d)
        keys = {a_key[n] if share else n: shapes[n][1] for n in names}
        return (sum(size(d) for d in keys.values()) + sum(size(shapes[n][0]) for n in names)) * stats_bytes

    def bases(names):
        return sum((d_out + d_in) * min(d_out, d_in) for d_out, d_in in (shapes[n] for n in names)) * bases_bytes

    svd_ws = max(svd_workspace_bytes(*shape) for shape in shapes.values())
    names = list(modules)
    plans = [ModePlan(None, 1, weights, activations, dense(names, share=False), svd_ws)]
    for g in group_options:
        groups = _groups_sizes(names, g)
        if len(groups) != g:
            continue
        plans.append(ModePlan(MemoryMode.FULL, g, weights, activations, max(dense(x) for x in groups), svd_ws))
        plans.append(ModePlan(MemoryMode.PACKED, g, weights, activations,
                              max(dense(x, packed=True) for x in groups), svd_ws))
        k_total = sum(min(shapes[n]) for n in names)
        plans.append(ModePlan(MemoryMode.PROJECTED, g, weights, checkpointed, 2 * k_total * stats_bytes,
                              max(bases(x) for x in groups) + svd_ws))
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
    """Table rows (GB) for printing."""
    rows = []
    for p in plans:
        rows.append([p.label, str(p.layer_groups)] + [f"{v / GB:.2f}" for v in
                    (p.weights, p.activations, p.statistics, p.svd_workspace, p.total)])
    return rows


def resolve_memory_mode(model: nn.Module, lora_config, config: FisherLoraConfig) -> tuple[MemoryMode, int]:
    """``(mode, layer_groups)`` to run: the configured ones, or for ``memory_mode="auto"`` the
    fastest plan (:func:`fisherlora.plan.choose_mode`) whose peak fits the device's free memory
    (the weights, already loaded, are counted as available). The choice is logged."""
    if config.memory_mode is not MemoryMode.AUTO:
        return config.memory_mode, config.layer_groups
    param = next(model.parameters())
    plans = plan_memory(model, lora_config, batch_size=config.batch_size, max_length=config.max_length,
                        stats_bytes=4 if config.stats_dtype == "float32" else 8,
                        bases_bytes=param.element_size() if config.bases_dtype == "model" else 4)
    free = free_memory_bytes(param.device) + plans[0].weights
    pick = choose_mode(plans, free, None if config.layer_groups == 1 else config.layer_groups)
    log.warning("fisherlora: memory_mode=auto chose %s with %d layer group(s): planned peak %.2f GB of %.2f GB "
                "available on %s%s", pick.label, pick.layer_groups, pick.total / GB, free / GB, param.device,
                "" if pick.total <= free else " (nothing fits: the smallest plan; lower batch_size or max_length)")
    return pick.mode, pick.layer_groups
