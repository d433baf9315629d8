"""Putting the user's model back exactly: the one mechanism every entry point uses.

:class:`ModelState` records what fisherlora may change on a model and puts it back:

- always: every parameter's ``requires_grad``, every module's ``training`` flag, every module's
  instance-level ``forward`` (the collector wraps decoder layers for checkpointing), and the
  global RNG states (CPU and, if initialised, CUDA);
- with ``structure=True``: the module tree itself (a child replaced by a wrapper such as PEFT's
  LoRA layer is put back), hooks registered since, and attributes added to the root module;
- the weights written through :meth:`ModelState.stash` (call it before overwriting a weight).

:func:`restore_on_error` is the context manager that restores everything if its block raises.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["ModelState", "restore_on_error", "keeps_global_rng"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class ModelState:
    """A record of ``model``'s flags, forwards, RNG states, module tree and hooks, taken at
    construction, with the originals of the weights stashed afterwards.

    Stashed originals are kept where they do not compete with the model: an accelerator's
    weights in host memory, host weights in a temporary file (a copy in RAM would nearly double
    a CPU run's peak, since the target layers are most of a model's weights). Call
    :meth:`close` (or use :func:`restore_on_error`) to delete that file.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        modules = list(model.modules())
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._training = [(m, m.training) for m in modules]
        self._forwards = [(m, m.__dict__.get("forward")) for m in modules]
        self._children = [(m, name, child) for m in modules for name, child in m.named_children()]
        self._hooks = [(m, {h: set(getattr(m, h)) for h in _HOOK_DICTS}) for m in modules]
        self._attrs = set(vars(model))
        self._rng = torch.random.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._originals: list[tuple[torch.Tensor, torch.Tensor | Path]] = []
        self._spill: tempfile.TemporaryDirectory | None = None

    def stash(self, param: torch.Tensor) -> None:
        """Keep the current value of ``param`` so that :meth:`restore` can write it back."""
        if not _stash_on_disk(param):
            self._originals.append((param, param.detach().to("cpu", copy=True)))
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="fisherlora-stash-")
        path = Path(self._spill.name) / f"{len(self._originals)}.pt"
        torch.save(param.detach(), path)
        self._originals.append((param, path))

    def restore(self, *, structure: bool = False) -> None:
        """Put back the flags, forwards, RNG states and stashed weights; with ``structure`` also
        the module tree, the hooks and the root's attributes as they were at construction."""
        with torch.no_grad():
            for param, saved in self._originals:
                if isinstance(saved, Path):
                    saved = torch.load(saved, map_location=param.device, weights_only=True)
                param.copy_(saved)
        if structure:
            for parent, name, child in self._children:
                if parent._modules.get(name) is not child:
                    parent._modules[name] = child
            for m, before in self._hooks:
                for h, keys in before.items():
                    for k in set(getattr(m, h)) - keys:
                        del getattr(m, h)[k]
            for extra in set(vars(self.model)) - self._attrs:
                delattr(self.model, extra)
        for m, own in self._forwards:
            if own is None:
                m.__dict__.pop("forward", None)  # back to the class's forward
            else:
                m.forward = own
        for p, flag in self._flags:
            p.requires_grad_(flag)
        for m, flag in self._training:
            m.training = flag
        torch.random.set_rng_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)

    def close(self) -> None:
        """Delete the stashed originals."""
        self._originals.clear()
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None


@contextlib.contextmanager
def restore_on_error(model: nn.Module):
    """Yield a :class:`ModelState` of ``model``; if the block raises (any exception, Ctrl-C
    included), restore everything it recorded (``structure=True``) and re-raise."""
    state = ModelState(model)
    try:
        yield state
    except BaseException:
        state.restore(structure=True)
        raise
    finally:
        state.close()


def keeps_global_rng(fn):
    """Decorator of the public entry points: torch's global RNG states (CPU and, if initialised,
    CUDA) are the same after the call as before it, whether it returns or raises. Libraries called
    inside (PEFT initialising its LoRA layers) draw from the global RNG; a caller's seeded run must
    not depend on whether fisherlora ran."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        cpu = torch.random.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            return fn(*args, **kwargs)
        finally:
            torch.random.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    return run


def _stash_on_disk(param: torch.Tensor) -> bool:
    """Where :class:`ModelState` keeps an original: a temporary file for host weights."""
    return param.device.type == "cpu"
