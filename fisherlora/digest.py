"""Digests of what a run reads: every tensor of the model, the effective configuration and the
calibration set (docs/DESIGN.md §7). One mechanism, two uses: the ranks of a distributed run
compare them before any pass (:func:`fisherlora.distributed.agree_before_passes`), and
statistics carry the model's so that they are reused only on the model they describe.

A tensor's digest is SHA-256 over its dtype, shape and bytes, read where the tensor lies on the
host (no copy) or streamed from an accelerator in pieces of :data:`CHUNK_BYTES`: equality is
exact (one flipped bit differs), and the cost is one read of the model at hashing speed (see
bench/RESULTS.md for the measured figure on the embedded model).
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from fisherlora import quant, sharded

__all__ = ["CHUNK_BYTES", "tensor_digest", "state_digest", "model_digest", "data_digest", "config_items", "run_digest",
           "differences", "describe_differences"]

#: bytes of an accelerator tensor brought to the host at a time while it is hashed
CHUNK_BYTES = 64 << 20
#: hex characters kept of each SHA-256 (128 bits)
HEX = 32
#: threads that hash a model's tensors (at most the CPUs this process may use)
THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _update(h, t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes into the hash ``h``."""
    t = t.detach()
    h.update(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)};".encode())
    if t.numel() == 0:
        return
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    if flat.device.type == "cpu":
        h.update(flat.numpy().data)  # the tensor's own memory: no copy
        return
    for i in range(0, flat.numel(), CHUNK_BYTES):
        h.update(flat[i:i + CHUNK_BYTES].cpu().numpy().data)


def tensor_digest(t: torch.Tensor) -> str:
    """The hex SHA-256 (:data:`HEX` characters) of a tensor's dtype, shape and bytes.

    Args:
        t: any tensor, on any device, of any dtype (bfloat16 and the float8 types included).
    """
    h = hashlib.sha256()
    _update(h, t)
    return h.hexdigest()[:HEX]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """One hex digest of a state dict: every name (sorted) with its :func:`tensor_digest`
    (what identifies an initial adapter, docs/DESIGN.md §9)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(f"{name}={tensor_digest(state[name])};".encode())
    return h.hexdigest()[:HEX]


def model_digest(model: nn.Module) -> dict:
    """``{"class": <model class>, "tensors": {name: digest}}`` over every parameter and buffer of
    ``model``, by the names ``named_parameters``/``named_buffers`` give.

    A supported quantised layer's weight is digested over all the tensors that hold it (packed
    data, scales, nested scales and offset: :func:`fisherlora.quant.storage`), which are not all
    parameters. An FSDP2-sharded parameter is recorded by its global shape and dtype only: each
    rank holds another piece of one tensor, which cannot differ between ranks. The tensors are
    hashed on up to :data:`THREADS` threads (hashlib and the copies release the GIL).
    """
    quantised = {f"{n}.weight": m for n, m in model.named_modules() if quant.is_quantised(m)}

    def one(name: str, t: torch.Tensor) -> str:
        if name in quantised:
            h = hashlib.sha256()
            for part in quant.storage(quantised[name]):
                _update(h, part)
            return h.hexdigest()[:HEX]
        if sharded.is_dtensor(t):
            return f"sharded {str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}"
        if t.is_meta:
            return f"meta {str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}"
        if type(t) not in (torch.Tensor, nn.Parameter):  # another library's tensor subclass
            try:
                return tensor_digest(t)
            except (RuntimeError, TypeError, NotImplementedError, AttributeError):
                # its bytes are not a plain tensor's: known by type and shape (check_model names it)
                return f"{type(t).__name__} {str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}"
        return tensor_digest(t)

    named = [*model.named_parameters(), *model.named_buffers()]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        digests = list(pool.map(lambda item: one(*item), named))
    return {"class": type(model).__name__, "tensors": {n: d for (n, _), d in zip(named, digests)}}


def data_digest(batches: Iterable[dict]) -> dict:
    """``{"digest", "batches", "sequences"}`` of a whole calibration set, read once in order:
    every batch's keys (sorted), tensors (dtype, shape, bytes) and other values (``repr``)."""
    h = hashlib.sha256()
    n_batches = n_seqs = 0
    for batch in batches:
        n_batches += 1
        if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
            n_seqs += int(batch["input_ids"].shape[0]) if batch["input_ids"].dim() else 1
        items = sorted(batch.items()) if isinstance(batch, dict) else [("", batch)]
        for key, value in items:
            h.update(f"|{key}=".encode())
            if isinstance(value, torch.Tensor):
                _update(h, value)
            else:
                h.update(repr(_plain(value)).encode())
        h.update(b"\n")
    return {"digest": h.hexdigest()[:HEX], "batches": n_batches, "sequences": n_seqs}


def _plain(value):
    """A JSON-like value, comparable by ``==`` (sets sorted, enums as their values)."""
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    text = repr(value)  # an object's default repr holds its address, which differs on every rank
    return type(value).__qualname__ if " at 0x" in text else text


def config_items(fisher_config, lora_config) -> dict:
    """Every field of the effective configuration, by name: ``fisher.<field>`` of the
    :class:`~fisherlora.config.FisherLoraConfig`, ``lora.<field>`` of the ``LoraConfig`` as
    applied (its ``to_dict()``; ``peft_version`` and ``base_model_name_or_path`` left out:
    they do not change what is computed)."""
    out = {f"fisher.{k}": _plain(v) for k, v in fisher_config.to_dict().items()}
    skip = {"peft_version", "base_model_name_or_path", "revision"}
    out.update({f"lora.{k}": _plain(v) for k, v in lora_config.to_dict().items() if k not in skip})
    return out


def run_digest(model: nn.Module, fisher_config, lora_config, data, head=None, statistics=None) -> dict:
    """Everything a run reads: ``{"model": model_digest, "config": config_items with the head,
    "data": data_digest or None, "statistics": their digest or None}``.

    Args:
        data: the whole calibration set (None: not compared, e.g. statistics are reused).
        head: a :class:`fisherlora.heads.Head`: its kind, and a custom ``loss_fn``'s qualified name.
        statistics: reused :class:`~fisherlora.statistics.FisherStatistics` (their factors and
            counts), or None.
    """
    config = config_items(fisher_config, lora_config)
    if head is not None:
        fn = getattr(head, "loss_fn", None)
        config["head"] = head.kind + (f" ({getattr(fn, '__qualname__', type(fn).__name__)})" if fn else "")
    stats = None
    if statistics is not None:
        tensors = {**{f"A.{k}": v for k, v in statistics.A.items()}, **{f"G.{k}": v for k, v in statistics.G.items()}}
        counts = repr((sorted(statistics.a_count.items()), sorted(statistics.g_count.items()))).encode()
        stats = state_digest(tensors) + hashlib.sha256(counts).hexdigest()[:8]
    return {"model": model_digest(model), "config": config,
            "data": None if data is None else data_digest(data), "statistics": stats}


def _size(data: dict | None) -> str:
    return "no data" if data is None else f"{data['sequences']} sequences in {data['batches']} batches"


def _listed(names: list[str], n: int = 4) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return f"{names[:n]}{more}"


def differences(ref: dict, other: dict, names: tuple[str, str] = ("one", "the other")) -> list[str]:
    """What differs between two :func:`model_digest` s, in words: the class, the tensors whose
    values (or dtype or shape) differ, the tensors only one has (``names`` say which is which).
    Empty when they are equal."""
    out = []
    if ref.get("class") != other.get("class"):
        out.append(f"the model class ({ref.get('class')} vs {other.get('class')})")
    a, b = ref.get("tensors", {}), other.get("tensors", {})
    changed = [n for n in a if n in b and a[n] != b[n]]
    if changed:
        out.append(f"the values, dtype or shape of {len(changed)} tensor(s) {_listed(changed)}")
    for mine, theirs, who in ((a, b, names[0]), (b, a, names[1])):
        only = [n for n in mine if n not in theirs]
        if only:
            out.append(f"{len(only)} tensor(s) {_listed(only)} only in {who}")
    return out


def describe_differences(ref: dict, other: dict, names: tuple[str, str] = ("one", "the other")) -> list[str]:
    """What differs between two :func:`run_digest` s, in words (weights naming the tensors,
    configuration naming each field with both values, data with both sizes). Empty when equal."""
    out = []
    weights = differences(ref["model"], other["model"], names)
    if weights:
        out.append("weights: " + "; ".join(weights))
    fields = sorted(set(ref["config"]) | set(other["config"]))
    changed = [f"{k}={ref['config'].get(k)!r} vs {other['config'].get(k)!r}" for k in fields
               if ref["config"].get(k) != other["config"].get(k)]
    if changed:
        out.append("configuration: " + ", ".join(changed))
    if ref.get("statistics") != other.get("statistics"):
        out.append("reused statistics: other factors or counts")
    if ref["data"] != other["data"]:
        a, b = ref["data"], other["data"]
        out.append(f"calibration data: {_size(a)} vs {_size(b)}"
                   + (", same sizes but other contents" if a and b and _size(a) == _size(b) else ""))
    return out
