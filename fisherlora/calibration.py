"""Calibration passes: forward and backward passes of a causal LM over calibration batches, with
the summed next-token loss whose output gradients the collector's hooks read.

The loss is the SUM (not the mean) of per-token cross-entropies over label tokens, so each
output gradient is a per-token gradient and micro-batching does not change the statistics.
Under the true Fisher the labels are drawn from the model's own predictive distribution.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fisherlora.memory import release_host_memory

__all__ = ["token_loss_sum", "position_ids_from_mask", "run_calibration", "check_totals", "EmptyCalibrationError"]


class EmptyCalibrationError(ValueError):
    """The calibration data produced no batch."""


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


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, reuse_logits: bool = False
                   ) -> tuple[torch.Tensor, int]:
    """Sum (not mean) of next-token cross-entropies over label tokens, and their count.

    ``logits`` ``(B, T, V)`` (any float dtype) predict ``labels[:, 1:]`` (``(B, T)`` int64); labels
    of -100 are ignored. The loss is computed in at least float32, in row chunks, and its graph
    holds only the logits (no log-softmax copy; the backward builds the one gradient buffer chunk
    by chunk), so a calibration batch with a large vocabulary needs about half of what
    ``torch.nn.functional.cross_entropy`` needs. With ``reuse_logits=True`` the backward writes
    the gradient into the logits' own storage (one ``(B, T, V)`` buffer less; the logits are
    garbage afterwards, so only for a last backward pass; autograd raises if another node saved
    them).

    Returns:
        ``(loss, n)``: the scalar sum (float32, or float64 for float64 logits) and the number of
        label tokens ``n``.
    """
    target = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # the last position predicts nothing
    loss = _SumCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reuse_logits)
    return loss, int((target != -100).sum())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a sequence's positions do not depend on its
    padding side (left padding otherwise shifts them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def run_calibration(model: nn.Module, batches: Iterable[dict], *,
                    fisher_type: str = "empirical", mc_samples: int = 1, seed: int = 0,
                    progress: Iterator | None = None, check: bool = True) -> dict:
    """Drive forward and backward passes of a causal LM over calibration batches, inside a
    :class:`StatisticsCollector` (whose hooks do the accumulating).

    Each batch holds ``input_ids`` and ``attention_mask`` ``(B, T)``, and ``labels`` ``(B, T)``
    (-100 where no loss is taken). The loss is :func:`token_loss_sum`. Under the true Fisher,
    labels at the label positions are drawn ``mc_samples`` times from the model's own
    predictive distribution (a ``torch.Generator`` seeded with ``seed``; the global RNG is not
    touched) and each draw is back-propagated; the forward pass, and so ``A``, is shared.

    Returns:
        ``{"batches", "sequences", "max_batch_size", "max_sequence_length", "tokens",
        "label_tokens", "loss_sum"}`` totals (lengths in non-padding tokens).

    Raises:
        ValueError: empty data, or a batch without ``input_ids`` (with ``check=False`` empty data,
            or data without label tokens, is not an error: a distributed run checks the totals
            of all ranks, :func:`check_totals`).
    """
    accepts_positions = "position_ids" in _forward_params(model)
    totals = {"batches": 0, "sequences": 0, "max_batch_size": 0, "max_sequence_length": 0, "tokens": 0,
              "label_tokens": 0, "loss_sum": 0.0}
    gen = None
    for batch in batches:
        if "input_ids" not in batch:
            raise ValueError(f"a calibration batch needs 'input_ids'; got keys {sorted(batch)}")
        device = next(model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch.get("attention_mask")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        labels = batch.get("labels")
        labels = input_ids if labels is None else labels.to(device)
        labels = labels.masked_fill(attention_mask == 0, -100)  # padding never counts, whatever the labels say
        kwargs = {"attention_mask": attention_mask}
        if accepts_positions:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        with torch.enable_grad():
            logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
            draws = [labels]
            if fisher_type == "true":
                if gen is None:
                    gen = torch.Generator(device=logits.device).manual_seed(seed)
                probs = torch.softmax(logits.detach()[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)
                keep = labels[:, 1:] != -100
                draws = []
                for _ in range(mc_samples):
                    sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen)
                    draws.append(torch.cat([labels[:, :1], sampled.reshape(keep.shape).masked_fill(~keep, -100)], 1))
                del probs
            for draw, draw_labels in enumerate(draws):
                last = draw == len(draws) - 1
                loss, n_label = token_loss_sum(logits, draw_labels, reuse_logits=last)
                if last:  # the loss's graph holds the logits only until their gradient has been used
                    del logits
                loss.backward(retain_graph=not last)
        totals["batches"] += 1
        totals["sequences"] += input_ids.shape[0]
        totals["max_batch_size"] = max(totals["max_batch_size"], input_ids.shape[0])
        totals["max_sequence_length"] = max(totals["max_sequence_length"], int(attention_mask.sum(-1).max()))
        totals["tokens"] += int(attention_mask.sum())
        totals["label_tokens"] += n_label
        totals["loss_sum"] += float(loss.detach())
        if progress is not None:
            progress.update(input_ids.shape[0])
        del loss
        if device.type == "cpu":
            release_host_memory()  # this batch's activations, before the next batch fragments the heap
    return check_totals(totals) if check else totals


def check_totals(totals: dict) -> dict:
    """``totals`` of :func:`run_calibration` if they describe a usable calibration.

    Raises:
        EmptyCalibrationError: no batch. ValueError: no label token (``G`` would be zero).
    """
    if totals["batches"] == 0:
        raise EmptyCalibrationError("the calibration data is empty: no batch was produced")
    if totals["label_tokens"] == 0:
        raise ValueError(
            f"the calibration data has no label tokens ({totals['tokens']} tokens, all labelled -100 or "
            "sequences of one token): the loss, and so G, would be zero. Check that max_length does not "
            "truncate away every response, and the response field")
    return totals


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
