"""Target weights sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): ``DTensor``
parameters, initialised in place (docs/DESIGN.md §7).

FSDP2 keeps each parameter as a ``DTensor`` whose local tensor is this rank's rows (``Shard(0)``;
uneven shares as ``torch.chunk`` cuts them), or, with HSDP, sharded over one mesh dimension and
replicated over the other. fisherlora reads such a weight whole only for the moment it needs it:

- :func:`gather` is ``DTensor.full_tensor()``, a collective: every rank of the weight's mesh
  calls it for the same layers in the same order (one layer at a time; the callers in
  :mod:`fisherlora.layers` and :mod:`fisherlora.distributed` keep that order);
- :func:`write_` computes the residual's local shard with DTensor's own placement rules
  (``distribute_tensor(..., src_data_rank=None)``, no communication) and copies it into the
  local tensor FSDP2 keeps, so the model stays sharded as it was;
- :func:`storage` is that local tensor (what a failure puts back);
- :func:`shard_adapters` applies ``fully_shard`` to each LoRA ``lora_A``/``lora_B`` module on the
  base layer's mesh once the factors are written, so they train like the rest of the model
  (their gradients reduce-scattered); :func:`full_state_dict` gathers them back for saving.

Other placements (tensor parallel: ``Shard(1)``, ``Partial``) are refused by kind
(:func:`placement_problem`). The forward and backward passes of a sharded model are collectives
too, so every rank runs the same number of them (:func:`fisherlora.distributed.shard_batches`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["is_dtensor", "is_sharded", "model_is_sharded", "placement_problem", "local", "count_nonfinite",
           "gather", "write_", "storage", "shard_adapters", "full_state_dict", "GatherMeter", "METER"]


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (or a Parameter holding one)."""
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def is_sharded(module: nn.Module) -> bool:
    """True when the module's ``weight`` is a DTensor (an FSDP2-sharded layer)."""
    return is_dtensor(getattr(module, "weight", None))


def model_is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor: its forwards are collectives."""
    return any(is_dtensor(p) for p in model.parameters())


def placement_problem(w) -> str | None:
    """Why fisherlora cannot write the DTensor ``w`` back, or None: every placement must be
    ``Shard(0)`` (FSDP2) or ``Replicate`` (HSDP's replica dimension)."""
    from torch.distributed.tensor import Replicate, Shard

    bad = [p for p in w.placements if not (isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0))]
    if bad:
        return (f"placed {tuple(w.placements)}: fisherlora writes back FSDP2's row shards "
                "(Shard(0), with Replicate for HSDP), not tensor-parallel placements (Shard(1), Partial, "
                "strided shards); initialise the model before parallelize_module and apply it afterwards")
    return None


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (this rank's shard), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


class GatherMeter:
    """Bytes of whole weights gathered by :func:`gather` and still alive on this rank, and their
    peak: the measure that a sharded model is never gathered whole (tests, ``bench/distributed.py``)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.gathers = 0

    def reset(self) -> None:
        self.peak, self.gathers = self.live, 0

    def _add(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.live += n
        self.gathers += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._drop, n)

    def _drop(self, n: int) -> None:
        self.live -= n


#: this process's meter
METER = GatherMeter()


def count_nonfinite(t) -> int:
    """NaN and inf entries of the DTensor ``t`` over all its shards: a DTensor reduction, so a
    collective that every rank of its mesh calls, and every rank gets the same count."""
    with torch.no_grad():
        return int(torch.isfinite(t).logical_not().sum().full_tensor())


def gather(module: nn.Module) -> torch.Tensor:
    """The whole ``(out, in)`` weight of a sharded layer as a plain tensor (its dtype, its
    device): a collective over the weight's mesh, so every rank calls it for the same layer."""
    with torch.no_grad():
        full = module.weight.full_tensor()
    METER._add(full)
    return full


def write_(module: nn.Module, W: torch.Tensor) -> None:
    """Copy this rank's shard of the whole ``(out, in)`` matrix ``W`` (the same on every rank) into
    the layer's local tensor, in its dtype; no communication."""
    from torch.distributed.tensor import distribute_tensor

    w = module.weight
    with torch.no_grad():
        part = distribute_tensor(W.detach().to(device=w.device, dtype=w.dtype), w.device_mesh, w.placements,
                                 src_data_rank=None)
        w.to_local().copy_(part.to_local())


def storage(module: nn.Module) -> list[torch.Tensor]:
    """The tensors :func:`write_` overwrites: the weight's local shard."""
    return [module.weight.to_local()]


def shard_adapters(peft_model: nn.Module) -> int:
    """``fully_shard`` each LoRA ``lora_A``/``lora_B`` module whose base layer is sharded, on the base
    weight's mesh, once its factors are written: FSDP2 then gathers them for each forward and
    reduce-scatters their gradients like any other parameter. Returns how many were sharded."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.fsdp import fully_shard

    count = 0
    for layer in peft_model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        if not is_sharded(base):
            continue
        mesh = base.weight.device_mesh
        for holder in (layer.lora_A, layer.lora_B):
            for sub in holder.values():
                if not is_dtensor(sub.weight):
                    fully_shard(sub, mesh=mesh)
                    count += 1
    return count


def full_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered whole (a collective: every rank calls it with the
    same keys in the same order); plain tensors pass as they are."""
    return {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in state.items()}
