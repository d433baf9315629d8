"""Counters of what costs a data pass time besides its FLOPs, for tests and benchmarks
(docs/DESIGN.md §11): Triton compile and autotune events, and host synchronisations made by
fisherlora's own code. Nothing in the package imports this module.

- :func:`count_kernel_compiles` counts, per Triton kernel, the launches and the distinct keys
  under which Triton compiles (and, for an autotuned kernel, autotunes) it. The compile key is
  Triton's own: every ``tl.constexpr`` value, every other argument's specialisation
  (``triton._C.libtriton.native_specialize_impl``: an integer's type, whether it is 1 and whether
  it divides by 16, unless the kernel lists it in ``do_not_specialize``; a tensor's dtype and its
  16-byte alignment) and the launch options (``num_warps``, ``num_stages``). The same model runs
  under ``TRITON_INTERPRET=1``, where nothing is compiled, so the counts a GPU would see are
  testable on a CPU; on a GPU the compiles Triton really did are counted as well
  (``knobs.runtime.jit_post_compile_hook``). An autotuning event is a new value of the
  autotuner's ``key`` arguments plus the tensor dtypes (as ``triton.autotune`` keys its cache);
  under the interpreter the launchers bypass the autotuner, so it is found by the kernel it wraps.
- :func:`count_host_syncs` counts the calls that make the host wait for the device (``.item()``,
  ``.tolist()``, ``.cpu()``, ``.nonzero()``, ``bool()``/``int()``/``float()`` of a tensor,
  boolean indexing, ...) through a ``TorchFunctionMode``, attributed to the innermost source file
  of the package on the Python stack. On a CPU these calls are cheap, but each one is a stall on
  a GPU, so counting them on a CPU is what keeps them out of the hooks.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["KernelCounts", "count_kernel_compiles", "SyncCounts", "count_host_syncs", "SYNCING"]


# ------------------------------------------------------------------------- Triton compiles
@dataclass
class KernelCounts:
    """Per kernel name: ``launches``, the distinct ``compile_keys`` and ``autotune_keys`` seen,
    and ``compiled`` (compiles Triton reported; GPU only, 0 under the interpreter)."""

    launches: Counter = field(default_factory=Counter)
    compile_keys: dict = field(default_factory=lambda: defaultdict(set))
    autotune_keys: dict = field(default_factory=lambda: defaultdict(set))
    compiled: Counter = field(default_factory=Counter)

    def compiles(self, name: str) -> int:
        """How many times ``name`` is (or would be, on a GPU) compiled: distinct compile keys."""
        return len(self.compile_keys.get(name, ()))

    def autotunes(self, name: str) -> int:
        """How many times ``name``'s autotuner benchmarks its configurations: distinct keys."""
        return len(self.autotune_keys.get(name, ()))

    def summary(self) -> dict:
        """``{kernel: {"launches", "compiles", "autotunes", "compiled"}}``, JSON-ready."""
        names = sorted(set(self.launches) | set(self.compiled))
        return {n: {"launches": self.launches[n], "compiles": self.compiles(n), "autotunes": self.autotunes(n),
                    "compiled": self.compiled[n]} for n in names}


def _param_info(fn) -> list[tuple[str, bool, bool, bool]]:
    """``(name, is_constexpr, specialise, align)`` per parameter of a JIT or interpreted kernel."""
    params = getattr(fn, "params", None)
    if params is not None and params and hasattr(params[0], "is_constexpr"):  # JITFunction
        return [(p.name, p.is_constexpr, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                for p in params]
    raw = fn.fn if hasattr(fn, "fn") else fn
    kwargs = getattr(fn, "kwargs", {}) or {}
    dns = set(kwargs.get("do_not_specialize") or ())
    dns_oa = set(kwargs.get("do_not_specialize_on_alignment") or ())
    out = []
    for i, (name, p) in enumerate(inspect.signature(raw).parameters.items()):
        constexpr = "constexpr" in str(p.annotation)
        out.append((name, constexpr, i not in dns and name not in dns, i not in dns_oa and name not in dns_oa))
    return out


def _compile_key(fn, args, kwargs) -> tuple:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    key = []
    info = _param_info(fn)
    bound = dict(zip((p[0] for p in info), args))
    bound.update({k: v for k, v in kwargs.items() if k in {p[0] for p in info}})
    for name, constexpr, specialise, align in info:
        value = bound.get(name)
        if constexpr:
            key.append((name, value))
        else:
            key.append((name, native_specialize_impl(BaseBackend, value, False, specialise, align)))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in bound and k not in ("grid", "warmup")))
    return tuple(key) + options


def _kernel_name(fn) -> str:
    raw = fn.fn if hasattr(fn, "fn") else fn
    return f"{raw.__module__.rpartition('.')[2]}.{raw.__name__}"


def _autotuners() -> dict[int, object]:
    """The autotuners of the loaded op modules, by the id of the kernel each one wraps."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("fisherlora.kernels.") and mod is not None:
            for value in vars(mod).values():
                if isinstance(value, Autotuner):
                    found[id(value.fn)] = value
    return found


def _autotune_key(tuner, fn, args, kwargs) -> tuple:
    names = [p[0] for p in _param_info(fn)]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    key = [bound[k] for k in tuner.keys if k in bound]
    key += [str(v.dtype) for v in bound.values() if hasattr(v, "dtype")]
    return tuple(key)


@contextlib.contextmanager
def count_kernel_compiles(*, keys: bool = True):
    """Count every Triton kernel launch of the block (yields a :class:`KernelCounts`).

    Patches the launch method of ``triton.runtime.jit.JITFunction`` and of the interpreter's
    ``InterpretedFunction`` for the block's duration; importing Triton is the only side effect.
    With ``keys=False`` only the compiles Triton reports are counted (on a GPU; nothing is
    patched, so a timed run is not slowed by computing keys at every launch).
    """
    if not keys:
        yield from _count_real_compiles()
        return
    import triton.knobs as knobs
    from triton.runtime import interpreter, jit

    counts = KernelCounts()
    tuners = _autotuners()
    inside_tuner = []

    def wrap(cls):
        original = cls.run

        def run(self, *args, grid, warmup, **kwargs):
            name = _kernel_name(self)
            counts.launches[name] += 1
            counts.compile_keys[name].add(_compile_key(self, args, kwargs))
            tuner = tuners.get(id(self))
            if tuner is not None and not inside_tuner:  # interpreter: the launcher bypassed it
                counts.autotune_keys[name].add(_autotune_key(tuner, self, args, kwargs))
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        cls.run = run
        return original

    def tuner_run(original):
        def run(self, *args, **kwargs):
            name = _kernel_name(self.fn)
            counts.autotune_keys[name].add(_autotune_key(self, self.fn, args, kwargs))
            inside_tuner.append(1)
            try:
                return original(self, *args, **kwargs)
            finally:
                inside_tuner.pop()
        return run

    def post_compile(*, fn, **_):
        counts.compiled[_kernel_name(fn.jit_function if hasattr(fn, "jit_function") else fn)] += 1

    from triton.runtime.autotuner import Autotuner

    saved_jit = wrap(jit.JITFunction)
    saved_interp = wrap(interpreter.InterpretedFunction)
    saved_tuner = Autotuner.run
    Autotuner.run = tuner_run(saved_tuner)
    saved_hook = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = None if os.environ.get("TRITON_INTERPRET") == "1" else post_compile
    try:
        yield counts
    finally:
        jit.JITFunction.run = saved_jit
        interpreter.InterpretedFunction.run = saved_interp
        Autotuner.run = saved_tuner
        knobs.runtime.jit_post_compile_hook = saved_hook


def _count_real_compiles():
    import triton.knobs as knobs

    counts = KernelCounts()

    def post_compile(*, fn, **_):
        counts.compiled[_kernel_name(fn.jit_function if hasattr(fn, "jit_function") else fn)] += 1

    saved = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = post_compile
    try:
        yield counts
    finally:
        knobs.runtime.jit_post_compile_hook = saved


# ------------------------------------------------------------------------- host synchronisations
#: Tensor methods and torch functions that make the host wait for the device's result.
SYNCING = frozenset({
    "item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__len__",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal",
    "allclose", "repeat_interleave",
})
_PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PACKAGE_ROOT)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_OWN = (_PACKAGE_ROOT + os.sep, os.path.join(_REPO_ROOT, "kernels") + os.sep)


def _syncs(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name in SYNCING:
        return True
    if name == "to":  # a copy to the host
        target = args[1] if len(args) > 1 else (kwargs or {}).get("device")
        return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
    if name in ("__getitem__", "__setitem__") and len(args) > 1:  # boolean-mask indexing
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if name == "where" and len(args) == 1 and not kwargs:  # torch.where(cond): nonzero
        return True
    return False


@dataclass
class SyncCounts:
    """Host synchronisations seen, by ``"file:line func"`` of the innermost package frame."""

    calls: Counter = field(default_factory=Counter)

    def total(self, where: str = "") -> int:
        """Calls whose location contains ``where`` (all of them by default)."""
        return sum(n for k, n in self.calls.items() if where in k)


class _SyncMode(TorchFunctionMode):
    def __init__(self, counts: SyncCounts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _syncs(func, args, kwargs):
            frame = sys._getframe(1)  # the first caller outside torch itself made the call
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_OWN) and frame.f_code.co_filename != __file__:
                path = os.path.relpath(frame.f_code.co_filename, _REPO_ROOT)
                self.counts.calls[f"{path}:{frame.f_lineno} {getattr(func, '__name__', func)}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """Count the host-synchronising torch calls made by fisherlora's code (the package and the
    repository's ``kernels/``) in this thread during the block (yields :class:`SyncCounts`).
    Calls made by other libraries (transformers' masks, the test itself) are not counted."""
    counts = SyncCounts()
    with _SyncMode(counts):
        yield counts
