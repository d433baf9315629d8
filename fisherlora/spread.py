"""The decompositions spread over the ranks of a process group (docs/DESIGN.md §7): each layer
given to one rank by the cost of its SVD, computed there once, and its results broadcast so that
every rank holds bit-identical bases, factors and selections.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fisherlora.decompose import LayerInit, LayerSelection, compute_initialization
from fisherlora.distributed import BUCKET_BYTES, Dist, together
from fisherlora.layers import layer_shape, ranks_and_scalings
from fisherlora.svd import iter_thin_svd

__all__ = ["assign_by_cost", "svd_cost", "broadcast_from_owners", "spread_svd", "spread_initialization"]


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


def spread_svd(ctx: Dist, weights: dict[str, torch.Tensor], *, out_dtype: torch.dtype = torch.float32,
               seconds: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`fisherlora.svd.iter_thin_svd` of ``weights`` (the same on every rank) spread over
    the ranks by :func:`assign_by_cost`: each SVD runs once, on its owner, and every rank gets
    every ``(U, S, Vh)`` (the projected mode needs all bases on every rank, for its hooks)."""
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    owner = assign_by_cost({n: svd_cost(s) for n, s in shapes.items()}, ctx.world)
    local = {}
    with together(ctx, "the singular value decompositions"):
        for name, usv in iter_thin_svd({n: w for n, w in weights.items() if owner[n] == ctx.rank},
                                       out_dtype=out_dtype, seconds=seconds):
            local[name] = list(usv)
    spec = {n: [((d_out, min(d_out, d_in)), out_dtype), ((min(d_out, d_in),), torch.float32),
                ((min(d_out, d_in), d_in), out_dtype)] for n, (d_out, d_in) in shapes.items()}
    got = broadcast_from_owners(ctx, owner, local, spec)
    return {n: tuple(t.to(weights[n].device) for t in got[n]) for n in weights}


def spread_initialization(ctx: Dist, modules: dict, stats, lora_config, config, *, bases: dict | None = None,
                          progress: bool = True, svd_seconds: dict | None = None):
    """:func:`fisherlora.decompose.compute_initialization` spread over the ranks: each layer is
    decomposed (SVD, energy, selection, factors) once, by the rank :func:`assign_by_cost` gives
    it, and its factors and selection are broadcast, so every rank holds bit-identical adapters.
    ``stats`` (and ``bases``) must be the same on every rank. Returns what
    ``compute_initialization`` returns, in the order of ``modules``."""
    shapes = {n: layer_shape(m) for n, m in modules.items()}
    owner = assign_by_cost({n: svd_cost(s) for n, s in shapes.items()}, ctx.world)
    mine = {n: m for n, m in modules.items() if owner[n] == ctx.rank}
    plan = ranks_and_scalings(lora_config, list(modules))
    local = {}
    with together(ctx, "the decomposition"):
        if mine:
            inits, sels = compute_initialization(mine, stats, lora_config, config, progress=progress,
                                                 bases={n: bases[n] for n in mine} if bases is not None else None,
                                                 svd_seconds=svd_seconds)
            local = {n: [inits[n].B, inits[n].A, sels[n].indices, sels[n].sigma, sels[n].energy, sels[n].score,
                         sels[n].magnitudes] for n in mine}
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
        device = next(module.parameters()).device
        inits[n] = LayerInit(B.to(device), A.to(device), plan[n][1])
        selections[n] = LayerSelection(n, shapes[n], plan[n][0], idx.cpu(), sigma.cpu(), energy.cpu(), score.cpu(),
                                       mags.cpu())
    return inits, selections


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
