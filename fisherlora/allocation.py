"""Fisher-guided rank allocation (``rank_allocation="global"``): a budget of ``rank × n_layers``
directions shared across the target layers by comparable Fisher energy, within per-layer rank
bounds, written as PEFT's ``rank_pattern`` and ``alpha_pattern`` (docs/DESIGN.md §10).

The flow, driven by ``initialize.py``: :func:`check` before any pass; :func:`candidates` gives the
``LoraConfig`` and config under which each layer is decomposed at its maximum rank with unit
magnitudes and scaling 1 (so its factors are the chosen singular vectors themselves);
:func:`allocate` then shares the budget and cuts every layer's candidates down to its rank.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from fisherlora.decompose import LayerInit, LayerSelection, adapter_magnitudes, lora_factors
from fisherlora.layers import ranks_and_scalings

__all__ = ["rank_bounds", "check", "candidates", "share_budget", "allocate"]

#: the default per-layer maximum, in multiples of the uniform rank (``max_rank=0``)
MAX_RANK_FACTOR = 4


def rank_bounds(shapes: dict[str, tuple[int, int]], config, rank: int) -> dict[str, tuple[int, int]]:
    """``(lo, hi)`` per layer: ``lo = min(min_rank, k)`` and ``hi = min(max_rank or 4·rank, k)``,
    with ``k = min(d_out, d_in)`` the layer's number of singular directions."""
    top = config.max_rank or MAX_RANK_FACTOR * rank
    return {n: (min(config.min_rank, min(s)), min(top, min(s))) for n, s in shapes.items()}


def check(lora_config, config, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse what global allocation cannot do, before any pass.

    Raises:
        ValueError: rsLoRA (PEFT cannot convert an adapter with ``rank_pattern`` and rsLoRA back to
            a plain LoRA), a ``LoraConfig`` that already has ``rank_pattern``/``alpha_pattern``
            (the allocation writes them), or a budget the bounds cannot meet.
    """
    if lora_config.use_rslora:
        raise ValueError("rank_allocation='global' does not support use_rslora: PEFT refuses to convert an adapter "
                         "with rank_pattern and rsLoRA back to a plain LoRA")
    if lora_config.rank_pattern or lora_config.alpha_pattern:
        raise ValueError("rank_allocation='global' writes rank_pattern and alpha_pattern itself; pass a LoraConfig "
                         "without them (or rank_allocation='uniform')")
    bounds = rank_bounds(shapes, config, lora_config.r)
    budget = lora_config.r * len(shapes)
    low, high = sum(lo for lo, _ in bounds.values()), sum(hi for _, hi in bounds.values())
    if not low <= budget <= high:
        raise ValueError(f"rank_allocation='global': the budget of {budget} directions (rank {lora_config.r} x "
                         f"{len(shapes)} layers) is outside what the per-layer bounds allow ({low}..{high}; "
                         f"min_rank={config.min_rank}, max_rank={config.max_rank or 'rank x 4'})")


def candidates(lora_config, config, shapes: dict[str, tuple[int, int]]):
    """``(lora_config, config)`` to decompose with: every layer at its maximum rank ``hi``, scaling
    1 and unit magnitudes, so that ``B = U_I`` and ``A = V_Iᵀ`` for the ``hi`` best-scored
    directions in score order."""
    bounds = rank_bounds(shapes, config, lora_config.r)
    cand = copy.deepcopy(lora_config)
    cand.rank_pattern = {n: hi for n, (_, hi) in bounds.items()}
    cand.alpha_pattern = {n: float(hi) for n, (_, hi) in bounds.items()}
    return cand, dataclasses.replace(config, magnitude="unit")


def share_budget(scores: dict[str, torch.Tensor], bounds: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """Ranks that meet ``budget`` exactly: each layer gets its ``lo`` best directions, and the rest
    of the budget goes to the largest remaining comparable scores of all layers, up to each
    layer's ``hi``. Ties go to the earlier layer (model order), then to its better-ranked
    direction, so the result is deterministic.

    Args:
        scores: layer -> ``(hi,)`` comparable scores of its candidates, in descending order.
        bounds: layer -> ``(lo, hi)``. budget: the total rank.
    """
    ranks = {n: lo for n, (lo, _) in bounds.items()}
    pool = [(-float(s[i]), li, i, n) for li, (n, s) in enumerate(scores.items())
            for i in range(bounds[n][0], bounds[n][1])]
    for _, _, _, n in sorted(pool)[:budget - sum(ranks.values())]:
        ranks[n] += 1
    return ranks


def allocate(inits: dict[str, LayerInit], selections: dict[str, LayerSelection], stats, lora_config, config):
    """Share ``lora_config.r × n_layers`` directions by comparable Fisher energy and cut each
    layer's candidates (from :func:`candidates`) to its rank.

    The comparable score of a direction is its score (``e_i``, or ``σ_i² e_i``) times the layer's
    counted input rows per calibration example (``N_A`` / sequences): ``A`` and ``G`` are
    per-row averages, so this is the curvature of the per-example loss along the unit direction,
    in the same units for every layer (docs/DESIGN.md §10).

    Returns:
        ``(lora_config, inits, selections, ranks)``: the ``LoraConfig`` with ``rank_pattern`` (every
        layer's rank) and ``alpha_pattern`` (``alpha·r_l/r``, so every layer keeps the uniform
        scaling ``s = alpha/r``, as PEFT's EVA does with ``adjust_scaling_factors``), the layers'
        :class:`LayerInit` and :class:`LayerSelection`, and layer -> rank.

    Raises:
        RuntimeError: PEFT would resolve the patterns to other ranks or scalings than allocated.
    """
    names = list(selections)
    shapes = {n: selections[n].shape for n in names}
    bounds = rank_bounds(shapes, config, lora_config.r)
    sequences = max(int(stats.info.get("calibration", {}).get("sequences", 0)), 1)
    scores = {n: selections[n].score[selections[n].indices] * (stats.a_count[stats.a_key[n]] / sequences)
              for n in names}
    ranks = share_budget(scores, bounds, lora_config.r * len(names))
    scaling = lora_config.lora_alpha / lora_config.r
    out_lc = copy.deepcopy(lora_config)
    out_lc.rank_pattern = dict(ranks)
    out_lc.alpha_pattern = {n: lora_config.lora_alpha * r / lora_config.r for n, r in ranks.items()}
    resolved = ranks_and_scalings(out_lc, names)
    wrong = [n for n in names if resolved[n][0] != ranks[n] or abs(resolved[n][1] - scaling) > 1e-9 * scaling]
    if wrong:
        raise RuntimeError(f"PEFT would resolve the rank pattern of {wrong[:3]} to other ranks or scalings")
    new_inits, new_sels = {}, {}
    for n in names:
        sel, r = selections[n], ranks[n]
        idx = sel.indices[:r]
        mags = adapter_magnitudes(sel.sigma, sel.energy, idx, config.magnitude)
        B, A = lora_factors(inits[n].B[:, :r], inits[n].A[:r], mags, scaling)
        new_inits[n] = LayerInit(B, A, scaling)
        new_sels[n] = dataclasses.replace(sel, rank=r, indices=idx, magnitudes=mags)
    return out_lc, new_inits, new_sels, ranks
