"""Putting the user's model back exactly: its modules, ``requires_grad`` and ``training`` flags,
hooks, attributes, and the weights overwritten on the way, when a block raises."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["restore_on_error"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def restore_on_error(model: nn.Module):
    """Put ``model`` back exactly if the block raises: modules, flags, hooks, attributes, and the
    weights overwritten through the yielded ``stash`` (call ``stash(param)`` before writing it).

    The originals are kept until the block ends where they do not compete with the model: an
    accelerator's weights in host memory, host weights in a temporary file (a copy in RAM would
    nearly double a CPU run's peak, since the target layers are most of a model's weights)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    hooks = [(m, {h: set(getattr(m, h)) for h in _HOOK_DICTS}) for m in model.modules()]
    attrs = set(vars(model))
    originals: list[tuple[torch.Tensor, torch.Tensor | Path]] = []
    spill: list[tempfile.TemporaryDirectory] = []

    def stash(param: torch.Tensor) -> None:
        if not _stash_on_disk(param):
            originals.append((param, param.detach().to("cpu", copy=True)))
            return
        if not spill:
            spill.append(tempfile.TemporaryDirectory(prefix="fisherlora-stash-"))
        path = Path(spill[0].name) / f"{len(originals)}.pt"
        torch.save(param.detach(), path)
        originals.append((param, path))

    try:
        yield stash
    except BaseException:
        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            for param, saved in originals:
                if isinstance(saved, Path):
                    saved = torch.load(saved, map_location=param.device, weights_only=True)
                param.copy_(saved)
        for m, before in hooks:
            for h, keys in before.items():
                for k in set(getattr(m, h)) - keys:
                    del getattr(m, h)[k]

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                setattr(parent, name.rpartition(".")[2], module.get_base_layer())
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag
        for extra in set(vars(model)) - attrs:
            delattr(model, extra)
        raise
    finally:
        for d in spill:
            d.cleanup()


def _stash_on_disk(param: torch.Tensor) -> bool:
    """Where :func:`restore_on_error` keeps an original: a temporary file for host weights."""
    return param.device.type == "cpu"
