"""The decompositions spread over the ranks of a process group (docs/DESIGN.md §7): each layer
given to one rank by the cost of its SVD, computed there once, and its results broadcast so that
every rank holds bit-identical bases, factors and selections.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fisherlora import sharded
from fisherlora.decompose import LayerInit, LayerSelection, compute_initialization
from fisherlora.distributed import BUCKET_BYTES, Dist, together
from fisherlora.layers import layer_shape, ranks_and_scalings, weight_view, weight_views
from fisherlora.svd import iter_thin_svd

__all__ = ["assign_by_cost", "svd_cost", "broadcast_from_owners", "owned_weights", "spread_svd",
           "spread_initialization"]


def assign_by_cost(costs: dict[str, float], world: int) -> dict[str, int]:
    """Layer name -> the rank that decomposes it: longest-processing-time first (the costliest
    layer to the least loaded rank; ties to the lower rank, layers in the given order), so the
    ranks' total costs are balanced. The cost of a ``(d_out, d_in)`` layer is about ``m·k²``
    (``m``, ``k`` its long and short sides: the Gram matrix and ``U = W V``)."""
    load = [0.0] * world
    owner = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable: ties keep their order
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return {n: owner[n] for n in costs}


def svd_cost(shape: tuple[int, int]) -> float:
    """About the flops of one thin SVD of a ``(d_out, d_in)`` weight: ``m·k²``."""
    m, k = max(shape), min(shape)
    return float(m) * k * k


def broadcast_from_owners(ctx: Dist, owner: dict[str, int], local: dict[str, list[torch.Tensor]],
                          spec: dict[str, list[tuple[tuple[int, ...], torch.dtype]]]
                          ) -> dict[str, list[torch.Tensor]]:
    """Every rank gets every layer's tensors, each computed once, by its owner.

    Args:
        owner: layer name -> the rank holding its tensors. local: this rank's own layers ->
            their tensors. spec: layer name -> the ``(shape, dtype)`` of each of its tensors
            (known to every rank beforehand, so no sizes travel).

    Returns:
        layer name -> tensors (on :attr:`Dist.device`), bit-identical on every rank: one
        ``broadcast`` per owner, dtype and bucket of :data:`BUCKET_BYTES`.
    """
    out: dict[str, list[torch.Tensor]] = {}
    for src in range(ctx.world):
        slots = [(n, i, shape, dtype) for n in spec if owner[n] == src for i, (shape, dtype) in enumerate(spec[n])]
        for dtype in dict.fromkeys(s[3] for s in slots):
            mine = [s for s in slots if s[3] == dtype]
            while mine:
                bucket, size = [], 0
                while mine and (not bucket or size + _numel(mine[0][2]) * dtype.itemsize <= BUCKET_BYTES):
                    bucket.append(mine.pop(0))
                    size += _numel(bucket[-1][2]) * dtype.itemsize
                total = sum(_numel(s[2]) for s in bucket)
                if ctx.rank == src:
                    flat = torch.cat([local[n][i].detach().to(ctx.device, dtype).reshape(-1) for n, i, _, _ in bucket])
                    ctx.bytes_broadcast += flat.numel() * flat.element_size()
                else:
                    flat = torch.empty(total, dtype=dtype, device=ctx.device)
                dist.broadcast(flat, group=ctx.group, group_src=src)
                ctx.collectives += 1
                at = 0
                for n, i, shape, _ in bucket:
                    k = _numel(shape)
                    out.setdefault(n, [None] * len(spec[n]))[i] = flat[at:at + k].reshape(shape)
                    at += k
    return out


def owned_weights(ctx: Dist, modules: dict, owner: dict[str, int], what: str):
    """This rank's layers with their whole weights, in rounds: yields ``{name: W}`` (one layer, or
    none in a round where this rank owns nothing left), each inside :func:`together`.

    Unsharded layers are read locally (:func:`fisherlora.layers.weight_view`, one at a time, as
    the caller uses them) and come in one round. When any layer is sharded (FSDP2,
    :mod:`fisherlora.sharded`), reading a weight is a collective that every rank joins: round
    ``t`` gathers the ``t``-th layer of each rank in turn, each rank keeps its own and drops the
    others', so a rank holds one gathered layer (plus the one passing through) at a time while
    all ranks decompose in parallel. A rank that fails in its round makes every rank fail at the
    end of that round (no rank is left waiting in the next gather)."""
    mine = [n for n in modules if owner[n] == ctx.rank]
    if not any(sharded.is_sharded(m) for m in modules.values()):
        with together(ctx, what):
            yield weight_views({n: modules[n] for n in mine})
        return
    queues = [[n for n in modules if owner[n] == r] for r in range(ctx.world)]
    for t in range(max(len(q) for q in queues)):
        kept = {}
        for q in queues:  # every rank gathers every layer of the round, in the same order
            if t < len(q):
                W = weight_view(modules[q[t]])
                if owner[q[t]] == ctx.rank:
                    kept[q[t]] = W
                del W
        with together(ctx, what):
            yield kept
        kept.clear()  # the caller's reference to this round's dict must not keep its weight alive


def spread_svd(ctx: Dist, modules: dict, *, out_dtype: torch.dtype = torch.float32,
               seconds: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`fisherlora.svd.iter_thin_svd` of the weights of ``modules`` (the same on every rank)
    spread over the ranks by :func:`assign_by_cost`: each SVD runs once, on its owner (its weight
    read through :func:`owned_weights`), and every rank gets every ``(U, S, Vh)`` (the projected
    mode needs all bases on every rank, for its hooks)."""
    shapes = {n: layer_shape(m) for n, m in modules.items()}
    owner = assign_by_cost({n: svd_cost(s) for n, s in shapes.items()}, ctx.world)
    local = {}
    for weights in owned_weights(ctx, modules, owner, "the singular value decompositions"):
        for name, usv in iter_thin_svd(weights, out_dtype=out_dtype, seconds=seconds):
            local[name] = list(usv)
    spec = {n: [((d_out, min(d_out, d_in)), out_dtype), ((min(d_out, d_in),), torch.float32),
                ((min(d_out, d_in), d_in), out_dtype)] for n, (d_out, d_in) in shapes.items()}
    got = broadcast_from_owners(ctx, owner, local, spec)
    return {n: tuple(t.to(_device_of(m)) for t in got[n]) for n, m in modules.items()}


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def spread_initialization(ctx: Dist, modules: dict, stats, lora_config, config, *, bases: dict | None = None,
                          progress: bool = True, svd_seconds: dict | None = None, warn: bool = True):
    """:func:`fisherlora.decompose.compute_initialization` spread over the ranks: each layer is
    decomposed (SVD, energy, selection, factors) once, by the rank :func:`assign_by_cost` gives
    it (its weight read through :func:`owned_weights`), and its factors and selection are
    broadcast, so every rank holds bit-identical adapters. ``stats`` (and ``bases``) must be the
    same on every rank. Returns what ``compute_initialization`` returns, in the order of ``modules``."""
    shapes = {n: layer_shape(m) for n, m in modules.items()}
    owner = assign_by_cost({n: svd_cost(s) for n, s in shapes.items()}, ctx.world)
    plan = ranks_and_scalings(lora_config, list(modules))
    local = {}
    for weights in owned_weights(ctx, modules, owner, "the decomposition"):
        if weights:
            part = {n: modules[n] for n in weights}
            inits, sels = compute_initialization(part, stats, lora_config, config, progress=progress,
                                                 bases={n: bases[n] for n in part} if bases is not None else None,
                                                 svd_seconds=svd_seconds, weights=weights, warn=warn)
            local.update({n: [inits[n].B, inits[n].A, sels[n].indices, sels[n].sigma, sels[n].energy,
                              sels[n].score, sels[n].magnitudes] for n in part})
    f32, f64 = torch.float32, torch.float64
    spec = {}
    for n, (d_out, d_in) in shapes.items():
        r, k = plan[n][0], min(d_out, d_in)
        spec[n] = [((d_out, r), f32), ((r, d_in), f32), ((r,), torch.int64), ((k,), f64), ((k,), f64),
                   ((k,), f64), ((r,), f64)]
    got = broadcast_from_owners(ctx, owner, local, spec)
    inits, selections = {}, {}
    for n, module in modules.items():
        B, A, idx, sigma, energy, score, mags = got[n]
        device = _device_of(module)
        inits[n] = LayerInit(B.to(device), A.to(device), plan[n][1])
        selections[n] = LayerSelection(n, shapes[n], plan[n][0], idx.cpu(), sigma.cpu(), energy.cpu(), score.cpu(),
                                       mags.cpu())
    return inits, selections


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
