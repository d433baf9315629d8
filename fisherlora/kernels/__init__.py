"""Triton backend of the curvature ops (``fisherlora.kernels``; docs/DESIGN.md §3).

One module per op, each holding its ``@triton.jit`` kernels, host launcher and a docstring with
shapes, dtypes and formula:

- :mod:`.syrk`: ``acc += scale · x_mᵀ x_m`` (upper-triangle tiles, dense or packed ``acc``)
- :mod:`.fisher_energy`: ``diag(Qᵀ M Q)`` streamed over tiles of ``M``'s upper triangle
- :mod:`.projected_sq`: ``acc += Σ_t (Qᵀ x_t)²`` tiled over tokens
- :mod:`.gradient`: ``acc += scale · g_mᵀ a_m`` (the weight gradient; transposed for ``Conv1D``)

This module is the backend seen by :mod:`fisherlora.ops.dispatch`: :func:`supports` and the
four op functions (positional arguments already validated by :mod:`fisherlora.ops`). Each op is
a ``torch.library.custom_op`` (namespace ``fisherlora``, names prefixed ``triton_``) with a fake
implementation, so it can be traced by ``torch.compile``.

Runs on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (set before this module is imported),
for tests. Importing it imports Triton but never queries CUDA.

float64 tensors (allowed by :mod:`fisherlora.ops` for references) are handed to the float64
reference: the kernels accumulate in float32 by contract, and a silent downcast would lose the
precision a float64 caller asked for.

Where the op modules live (docs/DESIGN.md §5): an installed wheel has them here, beside this
file (``setup.py`` copies them in). In a source tree (an editable install, or the repository on
``sys.path``) they are the repository's top-level ``kernels/``, which this package adds to its
``__path__``. That folder has no ``__init__.py`` on purpose: it is then no package of its own, so a
plain ``import kernels`` from the repository root never finds our code (it finds Hugging Face's
``kernels`` when that is installed), and ``_common`` refuses to load under any other name.
"""

from __future__ import annotations

import os as _os

import torch

from fisherlora.ops import reference as _reference

if not _os.path.isfile(_os.path.join(__path__[0], "_common.py")):  # a source tree: the repository's kernels/
    __path__.append(_os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__path__[0]))), "kernels"))

from . import _common  # noqa: E402
from . import fisher_energy as _energy_mod  # noqa: E402
from . import gradient as _gradient_mod  # noqa: E402
from . import projected_sq as _projected_mod  # noqa: E402
from . import syrk as _syrk_mod  # noqa: E402

__all__ = ["supports", "syrk_accumulate_", "fisher_energy", "projected_sq_accumulate_", "gradient_accumulate_",
           "INTERPRET"]

INTERPRET = _common.INTERPRET


def supports(device_type: str) -> bool:
    """CUDA always; CPU only when Triton runs interpreted (``TRITON_INTERPRET=1`` at import)."""
    if device_type == "cuda":
        return True
    return device_type == "cpu" and INTERPRET


def _impl(module, op: str, *tensors: torch.Tensor | None):
    """``module.op``, or the float64 reference when any tensor is float64 (Triton's float64 is not
    what the kernels are built for; the reference is exact there)."""
    f64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return getattr(_reference if f64 else module, op)


@torch.library.custom_op("fisherlora::triton_syrk_accumulate_", mutates_args=("acc",))
def _syrk_op(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> None:
    _impl(_syrk_mod, "syrk_accumulate_", acc, x)(acc, x, mask, scale)


@_syrk_op.register_fake
def _(acc, x, mask, scale):
    return None


@torch.library.custom_op("fisherlora::triton_fisher_energy", mutates_args=())
def _energy_op(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return _impl(_energy_mod, "fisher_energy", M, Q)(M, Q)


@_energy_op.register_fake
def _(M, Q):
    dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    return M.new_empty((Q.shape[1],), dtype=dtype)


@torch.library.custom_op("fisherlora::triton_projected_sq_accumulate_", mutates_args=("acc",))
def _projected_op(acc: torch.Tensor, x: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor | None) -> None:
    _impl(_projected_mod, "projected_sq_accumulate_", acc, x, Q)(acc, x, Q, mask)


@_projected_op.register_fake
def _(acc, x, Q, mask):
    return None


@torch.library.custom_op("fisherlora::triton_gradient_accumulate_", mutates_args=("acc",))
def _gradient_op(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 transpose: bool) -> None:
    _impl(_gradient_mod, "gradient_accumulate_", acc, g, a)(acc, g, a, mask, scale, transpose)


@_gradient_op.register_fake
def _(acc, g, a, mask, scale, transpose):
    return None


def syrk_accumulate_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """``acc += scale · x_mᵀ x_m`` (upper triangle); see :mod:`.syrk`."""
    _syrk_op(acc, x, mask, float(scale))
    return acc


def fisher_energy(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ M Q)``; see :mod:`.fisher_energy`."""
    return _energy_op(M, Q)


def projected_sq_accumulate_(acc: torch.Tensor, x: torch.Tensor, Q: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += Σ_t (Qᵀ x_t)²`` over unmasked rows; see :mod:`.projected_sq`."""
    _projected_op(acc, x, Q, mask)
    return acc


def gradient_accumulate_(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, transpose: bool) -> torch.Tensor:
    """``acc += scale · g_mᵀ a_m`` (``a_mᵀ g_m`` with ``transpose``); see :mod:`.gradient`."""
    _gradient_op(acc, g, a, mask, float(scale), bool(transpose))
    return acc
