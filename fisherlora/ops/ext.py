"""The compiled backend (``backend="ext"``): thin wrappers over ``torch.ops.fisherlora_ext``.

The kernels live in ``csrc/`` and are built into ``fisherlora._C`` by ``setup.py``: C++ with
OpenMP for CPU tensors always, CUDA when the extension was built with a CUDA toolkit and a CUDA
build of torch. Arguments arrive already validated by :mod:`fisherlora.ops` (the kernels check
them again with ``TORCH_CHECK``, for direct ``torch.ops`` callers).

Importing this module raises ``ImportError`` naming the cause when ``fisherlora._C`` is missing
or broken; :mod:`fisherlora.ops.dispatch` turns that into one warning and a fallback. Importing
it loads the shared library but never initialises CUDA.
"""

from __future__ import annotations

import torch

try:
    from fisherlora import _C
except Exception as exc:  # not built, or built against another torch (undefined symbols, ...)
    raise ImportError(
        f"fisherlora's compiled extension fisherlora._C could not be loaded ({type(exc).__name__}: {exc}); "
        "build it with `pip install --no-build-isolation -e .` after installing torch"
    ) from exc

__all__ = ["supports", "syrk_accumulate_", "fisher_energy", "projected_sq_accumulate_", "gradient_accumulate_",
           "built_with_cuda"]

_ops = torch.ops.fisherlora_ext


def built_with_cuda() -> bool:
    """Whether the CUDA kernels were compiled into ``fisherlora._C``."""
    return bool(_C.has_cuda())


def supports(device_type: str) -> bool:
    """``"cpu"`` always; ``"cuda"`` when the CUDA part was built (no CUDA call is made)."""
    return device_type == "cpu" or (device_type == "cuda" and built_with_cuda())


def syrk_accumulate_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """``acc += scale · x_mᵀ x_m`` (upper-triangle tiles). See :func:`fisherlora.ops.syrk_accumulate_`."""
    _ops.syrk_accumulate_(acc, x, mask, float(scale))
    return acc


def fisher_energy(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ M Q)``, tile by tile. See :func:`fisherlora.ops.fisher_energy`."""
    return _ops.fisher_energy(M, Q)


def projected_sq_accumulate_(acc: torch.Tensor, x: torch.Tensor, Q: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += Σ_t (Qᵀ x_t)²`` over kept rows. See :func:`fisherlora.ops.projected_sq_accumulate_`."""
    _ops.projected_sq_accumulate_(acc, x, Q, mask)
    return acc


def _has_kernel(name: str) -> bool:
    """Whether this build of ``fisherlora._C`` registers ``fisherlora_ext::name`` (a build from
    before the op was added does not)."""
    return hasattr(_ops, name)  # the schema and its CPU kernel are registered together (csrc/bindings.cpp)


if _has_kernel("gradient_accumulate_"):
    def gradient_accumulate_(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None,
                             scale: float, transpose: bool) -> torch.Tensor:
        """``acc += scale · g_mᵀ a_m`` (``a_mᵀ g_m`` with ``transpose``), tile by tile.
        See :func:`fisherlora.ops.gradient_accumulate_`."""
        _ops.gradient_accumulate_(acc, g, a, mask, float(scale), bool(transpose))
        return acc

    @torch.library.register_fake("fisherlora_ext::gradient_accumulate_")
    def _gradient_accumulate_fake(acc, g, a, mask, scale, transpose) -> None:
        return None


@torch.library.register_fake("fisherlora_ext::fisher_energy")
def _fisher_energy_fake(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return M.new_empty((Q.shape[1],))


@torch.library.register_fake("fisherlora_ext::syrk_accumulate_")
def _syrk_accumulate_fake(acc, x, mask, scale) -> None:
    return None


@torch.library.register_fake("fisherlora_ext::projected_sq_accumulate_")
def _projected_sq_accumulate_fake(acc, x, Q, mask) -> None:
    return None
