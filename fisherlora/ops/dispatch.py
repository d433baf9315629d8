"""Backend selection for the curvature ops. The only module that knows which backends exist.

A backend is a module exposing the op functions with the reference signatures
(``syrk_accumulate_(acc, x, mask, scale)``, ``fisher_energy(M, Q)``,
``projected_sq_accumulate_(acc, x, Q, mask)``, ``gradient_accumulate_(acc, g, a, mask, scale,
transpose)``) and ``supports(device_type) -> bool``. A backend may lack an op (one built before the
op existed, e.g. a stale ``fisherlora._C``): ``auto`` then skips it for that op, and naming it
explicitly raises a ``RuntimeError`` that says so.

- ``torch``: :mod:`fisherlora.ops.reference`, always there, any device, float64-capable.
- ``triton``: :mod:`fisherlora.kernels` (GPU; on CPU only under ``TRITON_INTERPRET=1``).
- ``ext``: :mod:`fisherlora.ops.ext`, the compiled extension ``fisherlora._C``
  (C++ on CPU always, CUDA when built with a toolkit).

Backends are imported lazily, on first use, so ``import fisherlora`` neither needs Triton or the
extension nor touches CUDA. A backend that fails to import is reported once (a warning naming the
cause) and ``backend="auto"`` falls back to the next one. Where the measured dispatch table has
rows (:mod:`fisherlora.ops.table`), ``auto`` picks per op and shape from them instead.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

import fisherlora.ops.table as table

BACKENDS = ("torch", "triton", "ext")
OPS = ("syrk_accumulate_", "fisher_energy", "projected_sq_accumulate_", "gradient_accumulate_")

#: ``backend="auto"`` tries these in order, by device type (first available wins).
AUTO_ORDER = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}

_MODULES = {
    "torch": "fisherlora.ops.reference",
    "triton": "fisherlora.kernels",
    "ext": "fisherlora.ops.ext",
}
_HOW_TO_GET = {
    "triton": "install it with `pip install triton` (on CPU, set TRITON_INTERPRET=1 for tests)",
    "ext": "rebuild with `pip install --no-build-isolation -e .` after installing torch",
}

_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


def _load(backend: str) -> ModuleType | None:
    if backend not in _loaded:
        try:
            _loaded[backend] = importlib.import_module(_MODULES[backend])
        except Exception as exc:  # ImportError, or a broken build raising something else
            _loaded[backend] = None
            _errors[backend] = f"{type(exc).__name__}: {exc}"
    return _loaded[backend]


def _supports(module: ModuleType, device_type: str) -> bool:
    if module.__name__ == _MODULES["torch"]:
        return True
    return bool(module.supports(device_type))


def _has_op(module: ModuleType, op: str | None) -> bool:
    """Whether ``module`` implements ``op`` (``None``: any op; a backend may predate an op)."""
    return op is None or callable(getattr(module, op, None))


def load_error(backend: str) -> str | None:
    """Why ``backend`` could not be imported (``None`` if it imported or was never tried)."""
    _load(backend)
    return _errors.get(backend)


def available_backends(device: torch.device | str = "cpu", op: str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (and implementing ``op`` when given), in
    ``backend="auto"`` preference order."""
    device_type = torch.device(device).type
    order = AUTO_ORDER.get(device_type, ("torch",))
    if device_type == "cpu":
        order = order + ("triton",)  # usable on CPU only through the interpreter; never auto
    found = []
    for name in order:
        module = _load(name)
        if module is not None and _supports(module, device_type) and _has_op(module, op):
            found.append(name)
    return found


def _measured_choice(op: str, device_type: str, args: tuple) -> tuple[str, callable] | None:
    """What the measured table (:mod:`fisherlora.ops.table`) picks for this call, if it has a row."""
    if not table.load().get(device_type, {}).get(op):
        return None
    available = tuple(n for n in AUTO_ORDER.get(device_type, ("torch",))
                      if _load(n) is not None and _supports(_loaded[n], device_type) and _has_op(_loaded[n], op))
    name = _choose(op, device_type, *table.shape_key(op, args), available)
    return None if name is None or name not in available else (name, getattr(_loaded[name], op))


@functools.lru_cache(maxsize=1024)
def _choose(op, device_type, d, layout, available):
    return table.choose(op, device_type, d, layout, available)


def resolve(op: str, backend: str, device: torch.device, args: tuple | None = None) -> tuple[str, callable]:
    """The ``(backend name, function)`` that runs ``op`` for tensors on ``device``.

    With ``backend="auto"`` and the call's positional ``args``, the measured table picks per shape
    where it has rows (:mod:`fisherlora.ops.table`); otherwise the first available backend of
    :data:`AUTO_ORDER`.

    Raises ``ValueError`` for an unknown op or backend name, ``RuntimeError`` when an explicitly
    requested backend is not available (naming the cause and how to get it).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    device_type = device.type
    if backend == "auto" and args is not None:
        picked = _measured_choice(op, device_type, args)
        if picked is not None:
            return picked
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            module = _load(name)
            if module is None:
                if name not in _warned and name != "torch":
                    _warned.add(name)
                    warnings.warn(
                        f"fisherlora: the {name!r} backend is unavailable ({_errors[name]}); "
                        f"falling back. To use it, {_HOW_TO_GET[name]}.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                continue
            if _supports(module, device_type) and _has_op(module, op):
                return name, getattr(module, op)
        raise RuntimeError(f"no backend supports {op} on device type {device_type!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    module = _load(backend)
    if module is None:
        raise RuntimeError(
            f"fisherlora backend {backend!r} is unavailable: {_errors[backend]}. "
            f"To use it, {_HOW_TO_GET.get(backend, '')}."
        )
    if not _supports(module, device_type):
        raise RuntimeError(f"fisherlora backend {backend!r} does not support {device_type!r} tensors")
    if not _has_op(module, op):
        raise RuntimeError(
            f"fisherlora backend {backend!r} has no {op} (it predates the op"
            f"{'; rebuild the extension' if backend == 'ext' else ''}); use backend='auto' or 'torch'"
        )
    return backend, getattr(module, op)
