"""Scale-out on torch.distributed (docs/DESIGN.md §7): the process group, the split of the
calibration set by sequence index, the bucketed reduction of factor sums and counts, the
one agreement through which every rank fails together, and rank 0's writing of outputs (the
spread of the decompositions over the ranks is :mod:`fisherlora.spread`).

Without a process group (none passed, none initialised) nothing here runs: every entry point
receives ``None`` from :func:`context` and takes its single-process path.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fisherlora.calibration import NOT_COUNTED, check_totals
from fisherlora.config import MemoryMode

__all__ = ["Dist", "RankFailedError", "context", "shard_batches", "together", "agree_before_passes", "reduce_collector",
           "agree_on_plan", "on_rank0", "join_from_env", "world", "is_rank0"]

#: bytes of one bucket of a reduction or a broadcast: one collective per bucket, not per tensor
BUCKET_BYTES = 64 << 20


class RankFailedError(RuntimeError):
    """Raised on EVERY rank when one rank failed in a phase: names that rank and its error."""


@dataclass
class Dist:
    """A process group as fisherlora uses it.

    Attributes:
        group: the ``ProcessGroup`` (``dist.group.WORLD`` when none was passed).
        rank, world: this process's rank in ``group`` and the group's size.
        device: where the collectives' buffers live (``cuda`` for NCCL, else the CPU).
        bytes_reduced, bytes_broadcast: payload bytes this rank sent into collectives (for the bench).
    """

    group: object
    rank: int
    world: int
    device: torch.device
    bytes_reduced: int = 0
    bytes_broadcast: int = 0
    collectives: int = field(default=0)


def context(process_group=None) -> Dist | None:
    """The :class:`Dist` of ``process_group``, or of the default group when
    ``torch.distributed`` is initialised; ``None`` otherwise (single process: nothing changes)."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    if isinstance(process_group, Dist):
        return process_group
    backend = dist.get_backend(process_group)
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")
    return Dist(process_group, dist.get_rank(process_group), dist.get_world_size(process_group), device)


class shard_batches:  # noqa: N801 (a re-iterable view, used like a function)
    """This rank's share of the calibration batches: the sequences whose index ``j`` in the
    whole set (counted over all batches in order) has ``j % world == rank``.

    The split is by sequence, so it is the same whatever the batch size; a batch in which this
    rank owns no sequence is skipped, so a rank may see no batch at all (fewer sequences than
    ranks). With ``lockstep`` (a sharded model, whose forwards and backwards are collectives)
    such a batch is not skipped but given as its first sequence marked
    :data:`fisherlora.calibration.NOT_COUNTED`: the rank runs it and counts nothing, so every
    rank makes one pass per batch. Re-iterable when ``batches`` is (each layer group makes its
    own pass). Every tensor whose first dim is the batch size is split; anything else is passed
    on as it is.
    """

    def __init__(self, batches, ctx: Dist, lockstep: bool = False):
        self.batches, self.ctx, self.lockstep = batches, ctx, lockstep

    def __iter__(self):
        offset = 0
        rank, world = self.ctx.rank, self.ctx.world
        for batch in (self._agreed() if self.lockstep else self.batches):
            n = batch["input_ids"].shape[0] if "input_ids" in batch else 0
            rows = [i for i in range(n) if (offset + i) % world == rank]
            offset += n
            extra = {}
            if n and not rows:
                if not self.lockstep:
                    continue
                rows, extra = [0], {NOT_COUNTED: True}
            index = torch.tensor(rows, dtype=torch.long)
            yield {**{k: v.index_select(0, index.to(v.device)) if isinstance(v, torch.Tensor) and v.dim()
                      and v.shape[0] == n else v for k, v in batch.items()}, **extra}

    def _agreed(self):
        """The batches, each fetched under :func:`together`: a rank whose data fails makes every
        rank fail before the next pass, whose collectives it would otherwise leave waiting."""
        it, end = iter(self.batches), object()
        while True:
            with together(self.ctx, "the calibration data"):
                batch = next(it, end)
            if batch is end:
                return
            yield batch


@contextlib.contextmanager
def together(ctx: Dist | None, what: str):
    """Run one rank's local work so that the ranks agree afterwards on whether all of them
    succeeded: a rank that raises inside the block, and every other rank once it leaves the
    block, raise :class:`RankFailedError` naming the (lowest) failing rank and its error.

    Each rank reaches the agreement (one ``all_gather_object``) whether its block raised or not,
    so no rank is left waiting in a later collective. A rank that dies is detected by the
    process group's own timeout (``init_process_group(timeout=...)``; ``torchrun`` also stops
    the other ranks when one exits with an error). With ``ctx=None`` this does nothing.
    """
    if ctx is None:
        yield
        return
    error = None
    try:
        yield
    except RankFailedError:  # agreed already, by every rank at once: no second agreement
        raise
    except BaseException as exc:  # noqa: BLE001 (re-raised below, after the agreement)
        error = exc
    reports = [None] * ctx.world
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}", group=ctx.group)
    ctx.collectives += 1
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:
        rank, message = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise RankFailedError(f"rank {rank} of {ctx.world} failed during {what}{more}: {message}") from error


@contextlib.contextmanager
def agree_before_passes(ctx: Dist | None, what: str = "the checks before any pass"):
    """The ranks agree on what they will compute before any pass: the block computes this rank's
    :func:`fisherlora.digest.run_digest` into the yielded dict's ``"digest"``; on leaving it, one
    ``all_gather_object`` brings every rank's digest (or its error) to every rank, and every rank
    raises the same error if any rank failed or differs from rank 0. With ``ctx=None`` the block
    just runs.

    Raises:
        RankFailedError: a rank raised inside the block (named, with its error), on every rank.
        ValueError: the ranks differ, on every rank alike, naming each rank that differs from
            rank 0 and what differs: the tensors (weights, buffers, a head), each configuration
            field with both values, the calibration set (its sizes).
    """
    from fisherlora.digest import describe_differences

    box: dict = {}
    if ctx is None:
        yield box
        return
    error = None
    try:
        yield box
    except RankFailedError:
        raise
    except BaseException as exc:  # noqa: BLE001 (re-raised below, after the agreement)
        error = exc
    reports = [None] * ctx.world
    mine = (f"{type(error).__name__}: {error}", None) if error is not None else (None, box.get("digest"))
    dist.all_gather_object(reports, mine, group=ctx.group)
    ctx.collectives += 1
    failed = [(r, m) for r, (m, _) in enumerate(reports) if m is not None]
    if failed:
        rank, message = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise RankFailedError(f"rank {rank} of {ctx.world} failed during {what}{more}: {message}") from error
    ref = reports[0][1]
    found = [(r, describe_differences(ref, d, ("rank 0", f"rank {r}"))) for r, (_, d) in enumerate(reports) if r]
    found = [(r, d) for r, d in found if d]
    if found:
        lines = "; ".join(f"rank {r} differs from rank 0 in " + "; ".join(d) for r, d in found)
        raise ValueError(f"the {ctx.world} ranks would not compute the same thing, so nothing was run: {lines}. "
                         "Every rank must call with the same model (every parameter and buffer, heads included), "
                         "the same configuration and the same whole calibration set (docs/DESIGN.md §7)")


def reduce_collector(col, totals: dict, ctx: Dist) -> dict:
    """Sum the accumulators and counts of a :class:`~fisherlora.collect.StatisticsCollector` over
    the ranks, in place, before it normalises them; returns the calibration totals of all ranks.

    SUMS and counts travel separately (each rank's normalised means would be wrong to average
    when the ranks counted different numbers of tokens): dense factors as their upper triangles
    (what the accumulator guarantees; the normalisation mirrors them), packed factors as they are
    (already upper triangles), projected ones as their diagonals ``(k,)``, weight gradients whole. The tensors go in
    buckets of :data:`BUCKET_BYTES`, one ``all_reduce`` each, and all counts in one more. A rank
    that saw no batch, or no forward of some layer, contributes zeros, with the sharing of ``A``
    taken from the ranks that did.

    Raises:
        EmptyCalibrationError, ValueError: as :func:`fisherlora.calibration.check_totals`, on the
            totals of all ranks (so on every rank alike).
    """
    seen = [None] * ctx.world
    dist.all_gather_object(seen, (dict(col.a_key), totals), group=ctx.group)
    ctx.collectives += 1
    merged = {"batches": 0, "sequences": 0, "tokens": 0, "label_tokens": 0, "loss_sum": 0.0,
              "max_batch_size": 0, "max_sequence_length": 0}
    for _, t in seen:
        for k in merged:
            merged[k] = max(merged[k], t[k]) if k.startswith("max_") else merged[k] + t[k]
    check_totals(merged)
    sharing = {}
    for a_key, _ in seen:  # every rank that ran a forward found the same sharing
        for name, key in a_key.items():
            if sharing.setdefault(name, key) != key:
                raise RuntimeError(f"the ranks found different sharings of A for layer {name!r}")
    missing = [n for n in col.modules if n not in sharing]
    if missing:
        raise RuntimeError(f"no forward pass reached the target layers {missing[:5]} on any rank")
    device = next(iter(col._A.values())).device if col._A else ctx.device
    for name in col.modules:  # a rank without the forward (or gradient) of a layer adds zeros
        key = col.a_key.setdefault(name, sharing[name])
        if key not in col._A:
            col._A[key] = col._new_acc(name, col.shapes[name][1], device)
            col.a_count[key] = 0
        if name not in col._G:
            col._G[name] = col._new_acc(name, col.shapes[name][0], device)
        if col.gradient and name not in col._grad:
            col._grad[name] = torch.zeros(col.shapes[name], dtype=col.stats_dtype, device=device)
    keys = list(dict.fromkeys(col.a_key[n] for n in col.modules))
    tensors = [col._A[k] for k in keys] + [col._G[n] for n in col.modules]
    # the weight gradients (not symmetric) whole, as flat views of row blocks (in place, bucketed)
    tensors += [block for n in col.modules if n in col._grad for block in _row_blocks(col._grad[n])]
    # the hooks keep their counts on the device (docs/DESIGN.md §11): read here, once per run
    counts = torch.tensor([int(col.a_count[k]) for k in keys] + [int(col.g_count[n]) for n in col.modules],
                          dtype=torch.int64, device=ctx.device)
    _all_reduce_sums(tensors, ctx)
    dist.all_reduce(counts, group=ctx.group)
    ctx.collectives += 1
    ctx.bytes_reduced += counts.numel() * 8
    counts = counts.tolist()
    col.a_count.update(zip(keys, counts[:len(keys)]))
    col.g_count.update(zip(col.modules, counts[len(keys):]))
    return merged


def _row_blocks(acc: torch.Tensor, rows_bytes: int = 16 << 20) -> list[torch.Tensor]:
    """Flat views of a contiguous ``(d_out, d_in)`` ``acc``'s row blocks of about ``rows_bytes``
    each: reduced whole, in place, without one bucket of the whole matrix."""
    step = max(1, rows_bytes // max(1, acc.shape[1] * acc.element_size()))
    return [acc[r0:r0 + step].view(-1) for r0 in range(0, acc.shape[0], step)]


def _upper_rows(acc: torch.Tensor):
    """``(view, mask)`` pieces whose masked elements are the upper triangle of a dense ``acc``,
    panel by panel (no index tensor of ``acc``'s size)."""
    d, step = acc.shape[-1], 256
    for r0 in range(0, d, step):
        view = acc[r0:r0 + step, r0:]
        yield view, torch.ones(view.shape, dtype=torch.bool, device=acc.device).triu_()


def _pieces(acc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return list(_upper_rows(acc)) if acc.dim() == 2 else [(acc, None)]


def _all_reduce_sums(tensors: list[torch.Tensor], ctx: Dist) -> None:
    """All-reduce (sum) the upper triangles (dense) or the whole (1-D) of ``tensors`` in place,
    in buckets of :data:`BUCKET_BYTES`."""
    pieces = [p for t in tensors for p in _pieces(t)]
    bucket, size = [], 0
    for piece in pieces + [None]:
        n = 0 if piece is None else (int(piece[1].sum()) if piece[1] is not None else piece[0].numel())
        if bucket and (piece is None or (size + n) * piece[0].element_size() > BUCKET_BYTES
                       or piece[0].dtype != bucket[0][0].dtype):
            flat = torch.cat([(v.masked_select(m) if m is not None else v.reshape(-1)).to(ctx.device)
                              for v, m in bucket])
            dist.all_reduce(flat, group=ctx.group)
            ctx.collectives += 1
            ctx.bytes_reduced += flat.numel() * flat.element_size()
            at = 0
            for v, m in bucket:
                k = int(m.sum()) if m is not None else v.numel()
                part = flat[at:at + k].to(v.device)
                if m is not None:
                    v.masked_scatter_(m, part)
                else:
                    v.copy_(part.reshape(v.shape))
                at += k
            bucket, size = [], 0
        if piece is not None:
            bucket.append(piece)
            size += n


def agree_on_plan(ctx: Dist, mode, n_groups: int):
    """The memory plan every rank runs: the leanest of the ranks' own choices (``projected`` over
    ``packed`` over ``full``, then more layer groups), so that ``memory_mode="auto"`` fits the
    rank with the least free memory and all ranks make the same passes and collectives."""
    plans = [None] * ctx.world
    dist.all_gather_object(plans, (MemoryMode(mode).value, int(n_groups)), group=ctx.group)
    ctx.collectives += 1
    order = [MemoryMode.FULL.value, MemoryMode.PACKED.value, MemoryMode.PROJECTED.value]
    m, g = max(plans, key=lambda p: (order.index(p[0]) if p[0] in order else -1, p[1]))
    return MemoryMode(m), g


def on_rank0(ctx: Dist | None, what: str, fn):
    """``fn()`` on rank 0 only, the other ranks waiting; every rank then returns rank 0's result
    (a picklable value) or raises :class:`RankFailedError` if it failed. ``fn()`` itself without
    a group."""
    if ctx is None:
        return fn()
    result = None
    with together(ctx, what):
        if ctx.rank == 0:
            result = fn()
    box = [result]
    dist.broadcast_object_list(box, group=ctx.group, group_src=0)
    ctx.collectives += 1
    return box[0]


#: what ``torchrun`` and ``accelerate launch`` set for every worker (the env:// rendezvous)
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def join_from_env(device: torch.device) -> torch.device:
    """Join the process group that a launcher (``torchrun``, ``accelerate launch``) describes in
    the environment (:data:`LAUNCHER_ENV`, ``LOCAL_RANK``), once; returns the device this rank
    works on (``cuda:LOCAL_RANK`` for a CUDA ``device``, which also selects NCCL; gloo otherwise).
    Without those variables, or with a group already initialised, nothing is done and ``device``
    is returned. The group is left again at exit."""
    if dist.is_initialized() or not all(v in os.environ for v in LAUNCHER_ENV):
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return device


def world() -> int:
    """The size of the initialised default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    """True unless this process is a rank other than 0 of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
