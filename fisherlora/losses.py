"""The token-level summed loss whose output gradients the K-FAC hooks read: the SUM (not the
mean) of per-token cross-entropies, in row chunks and with a lean graph, and the position ids
that count real tokens only (docs/DESIGN.md §1 step 1)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["token_loss_sum", "position_ids_from_mask"]


class _SumCrossEntropy(torch.autograd.Function):
    """``Σ_n [logsumexp(x_n) − x_n[t_n]]`` over rows with ``t_n != -100``, in row chunks.

    Equal to ``cross_entropy(x, t, reduction="sum", ignore_index=-100)`` but it saves only the
    logits themselves (no log-softmax copy) and the per-row log-sum-exp, and builds the gradient
    ``softmax(x_n) − onehot(t_n)`` chunk by chunk into one buffer: about half of the memory of
    ``cross_entropy``'s graph for a large vocabulary, which is most of a calibration batch's
    activations in the memory-lean modes.
    """

    CHUNK_ELEMENTS = 1 << 22  # about 16 MiB of float32 temporaries per chunk

    @staticmethod
    def forward(ctx, logits, target, reuse_logits=False):
        work = torch.promote_types(logits.dtype, torch.float32)
        valid = target != -100
        safe = target.clamp_min(0)
        rows = max(1, _SumCrossEntropy.CHUNK_ELEMENTS // max(logits.shape[-1], 1))
        lse = torch.empty(logits.shape[0], dtype=work, device=logits.device)
        total = torch.zeros((), dtype=work, device=logits.device)
        for i in range(0, logits.shape[0], rows):
            x = logits[i:i + rows].to(work)
            lse[i:i + rows] = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, safe[i:i + rows, None]).squeeze(1)
            total += torch.where(valid[i:i + rows], lse[i:i + rows] - picked, 0).sum()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.rows, ctx.reuse_logits = rows, reuse_logits
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)  # chunk i is read before it is written
        rows = ctx.rows
        for i in range(0, logits.shape[0], rows):
            p = torch.exp(logits[i:i + rows].to(lse.dtype) - lse[i:i + rows, None])
            p.scatter_add_(1, safe[i:i + rows, None], -torch.ones_like(p[:, :1]))
            p.mul_((valid[i:i + rows] * grad_total)[:, None])
            grad[i:i + rows] = p
        return grad, None, None


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, reuse_logits: bool = False,
                   shift: bool = True) -> tuple[torch.Tensor, int]:
    """Sum (not mean) of next-token cross-entropies over label tokens, and their count.

    ``logits`` ``(B, T, V)`` (any float dtype) predict ``labels[:, 1:]`` (``(B, T)`` int64); labels
    of -100 are ignored. The loss is computed in at least float32, in row chunks, and its graph
    holds only the logits (no log-softmax copy; the backward builds the one gradient buffer chunk
    by chunk), so a calibration batch with a large vocabulary needs about half of what
    ``torch.nn.functional.cross_entropy`` needs. With ``reuse_logits=True`` the backward writes
    the gradient into the logits' own storage (one ``(B, T, V)`` buffer less; the logits are
    garbage afterwards, so only for a last backward pass; autograd raises if another node saved
    them).

    ``shift=False`` pairs ``logits[:, t]`` with ``labels[:, t]`` instead (an encoder-decoder's
    decoder targets).

    Returns:
        ``(loss, n)``: the scalar sum (float32, or float64 for float64 logits) and the number of
        label tokens ``n``.
    """
    # the last position predicts nothing; shift=False: position t predicts labels[:, t] (a decoder's targets)
    target = nn.functional.pad(labels[:, 1:], (0, 1), value=-100) if shift else labels
    loss = _SumCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reuse_logits)
    return loss, int((target != -100).sum())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a sequence's positions do not depend on its
    padding side (left padding otherwise shifts them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
