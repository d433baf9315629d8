"""Where the calibration's backward pass starts (docs/DESIGN.md §1 step 1, "No weight gradients"):
the hooks that make the hidden states entering the lowest hooked decoder layer, the input
embeddings' output or a model's floating-point inputs require grad, and the activation
checkpointing of a decoder layer's forward. Used by :class:`fisherlora.collect.StatisticsCollector`."""

from __future__ import annotations

import torch

__all__ = ["make_output_require_grad", "make_hidden_states_require_grad", "checkpointed", "make_inputs_require_grad"]


def make_output_require_grad(module, args, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def make_hidden_states_require_grad(module, args, kwargs):
    """Pre-hook of the lowest hooked decoder layer: its hidden states (first positional
    argument, or ``hidden_states=``) start the backward pass."""
    if not torch.is_grad_enabled():
        return None
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor) and h.is_floating_point():
        return args, {**kwargs, "hidden_states": h.detach().requires_grad_(True)}
    return make_inputs_require_grad(module, args, kwargs)


def checkpointed(forward):
    """``forward`` run under non-reentrant activation checkpointing when grad mode is on."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def make_inputs_require_grad(module, args, kwargs):
    if not torch.is_grad_enabled():
        return None

    def lift(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
            return t.detach().requires_grad_(True)
        return t

    return tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}
