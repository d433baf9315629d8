"""Fingerprints that recognise a target weight (docs/DESIGN.md §9): a sketch ``uₖᵀ W zₖ`` per
layer, recorded with an initialisation so that ``fisherlora.load`` refuses another base, and
matched up to float32 rounding (another dtype's rounding, a permutation or a fine-tuning step does
not match). Exact digests of whole models are :mod:`fisherlora.digest`'s."""

from __future__ import annotations

import torch
from torch import nn

from fisherlora import quant
from fisherlora.layers import weight_view

__all__ = ["weight_fingerprint", "fingerprints_match", "module_fingerprint"]


def weight_fingerprint(W: torch.Tensor, probes: int = 4) -> dict:
    """A sketch that recognises a weight: ``{"rms": ‖W‖_F/√(d_out·d_in), "sketch": [uₖᵀ W zₖ]}``.

    ``uₖ`` and ``zₖ`` are fixed unit Gaussian vectors (seeded by the shape), so any change of
    ``W`` beyond rounding (a permutation, a fine-tuning step) moves the sketch at first order,
    unlike the Frobenius norm. Computed in float64 on the CPU. Used to recognise the base model
    of a saved initialisation and the model statistics were collected on.
    """
    d_out, d_in = W.shape
    g = torch.Generator().manual_seed(1_000_003 * d_out + d_in)
    u = torch.randn(probes, d_out, generator=g, dtype=torch.float64)
    z = torch.randn(probes, d_in, generator=g, dtype=torch.float64)
    u, z = u / u.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    Wd = W.detach().to("cpu", torch.float64)
    return {"rms": float(Wd.norm()) / (d_out * d_in) ** 0.5, "sketch": ((u @ Wd) * z).sum(1).tolist()}


def fingerprints_match(a: dict, b: dict, rtol: float = 1e-3) -> bool:
    """Sketches equal up to ``rtol`` of the weight's rms entry (a sketch's typical size): float32
    rounding passes, a different dtype's rounding (bf16 vs fp32) or any real change does not;
    nor does another quantisation (the ``"quantisation"`` entries of :func:`module_fingerprint` differ)."""
    tol = rtol * max(a["rms"], 1e-30)
    return (a.get("quantisation") == b.get("quantisation") and len(a["sketch"]) == len(b["sketch"])
            and all(abs(x - y) <= tol for x, y in zip(a["sketch"], b["sketch"])))


def module_fingerprint(module: nn.Module) -> dict:
    """The fingerprint of a target layer's weight as the model holds it: :func:`weight_fingerprint`
    of :func:`fisherlora.layers.weight_view`, so a quantised layer's DEQUANTISED weight, plus its settings under
    ``"quantisation"`` (:func:`fisherlora.quant.settings`), which must match too: a residual is
    requantised the same way only under the same settings (docs/DESIGN.md §8)."""
    fp = weight_fingerprint(weight_view(module))
    if quant.is_quantised(module):
        fp["quantisation"] = quant.settings(module)
    return fp
