"""Calibration passes: forward and backward passes of a model over calibration batches, with
the summed loss of its head (fisherlora/heads.py) whose output gradients the collector's hooks read.

The loss is the SUM (not the mean) of per-example (per-token) losses, so each output gradient is
a per-example gradient and micro-batching does not change the statistics. Under the true Fisher
the labels are drawn from the model's own predictive distribution.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fisherlora.heads import Head, batch_size, resolve_head
from fisherlora.losses import _SumCrossEntropy, position_ids_from_mask, token_loss_sum  # noqa: F401 (re-exported)
from fisherlora.memory import release_host_memory

__all__ = ["token_loss_sum", "position_ids_from_mask", "run_calibration", "check_totals", "EmptyCalibrationError",
           "NOT_COUNTED"]


#: the key that marks a batch run only to keep a sharded model's ranks in lock step (its value True)
NOT_COUNTED = "fisherlora_not_counted"


class EmptyCalibrationError(ValueError):
    """The calibration data produced no batch."""


def run_calibration(model: nn.Module, batches: Iterable[dict], *,
                    fisher_type: str = "empirical", mc_samples: int = 1, seed: int = 0,
                    progress: Iterator | None = None, head: Head | None = None, check: bool = True,
                    collector=None) -> dict:
    """Drive forward and backward passes of a model over calibration batches, inside a
    :class:`StatisticsCollector` (whose hooks do the accumulating).

    ``head`` (default :func:`fisherlora.heads.resolve_head` of ``model``: a causal LM unless the
    class says otherwise) says what each batch feeds the model and what the summed loss is
    (docs/DESIGN.md §10). For a causal LM each batch holds ``input_ids`` and ``attention_mask``
    ``(B, T)``, and ``labels`` ``(B, T)`` (-100 where no loss is taken); the loss is
    :func:`token_loss_sum`. Under the true Fisher, labels at the label positions are drawn
    ``mc_samples`` times from the model's own predictive distribution (a ``torch.Generator``
    seeded with ``seed``; the global RNG is not touched) and each draw is back-propagated; the
    forward pass, and so ``A``, is shared.

    A batch marked with :data:`NOT_COUNTED` (a lock-step pass of a sharded model,
    :func:`fisherlora.distributed.shard_batches`) runs its forward and as many backward passes as
    a counted batch makes, with the ``collector``'s ``counting`` off, draws no label and adds
    nothing to the totals.

    Returns:
        ``{"batches", "sequences", "max_batch_size", "max_sequence_length", "tokens",
        "label_tokens", "loss_sum"}`` totals (lengths in non-padding tokens; ``label_tokens``
        is the number of examples the loss summed: label tokens, or labelled sequences/images).

    Raises:
        ValueError: empty data, a batch without the head's input, or no example with a label
            (with ``check=False`` empty data, or data without a label, is not an error: a
            distributed run checks the totals of all ranks, :func:`check_totals`).
    """
    head = head if head is not None else resolve_head(model, fisher_type=fisher_type)
    totals = {"batches": 0, "sequences": 0, "max_batch_size": 0, "max_sequence_length": 0, "tokens": 0,
              "label_tokens": 0, "loss_sum": 0.0}
    gen = None
    for batch in batches:
        device = next(model.parameters()).device
        counted = not batch.get(NOT_COUNTED, False)
        if not counted:
            _lockstep_pass(model, head, {k: v for k, v in batch.items() if k != NOT_COUNTED}, device,
                           mc_samples if fisher_type == "true" else 1, collector)
            continue
        kwargs, batch = head.inputs(batch, device)
        with torch.enable_grad():
            outputs = model(**kwargs)
            draws = [batch]
            if fisher_type == "true":
                if gen is None:
                    gen = torch.Generator(device=device).manual_seed(seed)
                draws = head.draws(outputs, batch, mc_samples, gen)
            for draw, draw_batch in enumerate(draws):
                last = draw == len(draws) - 1
                loss, n_label = head.loss(outputs, draw_batch, last=last)
                if last:  # the loss's graph holds the logits only until their gradient has been used
                    del outputs
                loss.backward(retain_graph=not last)
        n_seq = batch_size(kwargs)
        mask = kwargs.get("attention_mask")
        totals["batches"] += 1
        totals["sequences"] += n_seq
        totals["max_batch_size"] = max(totals["max_batch_size"], n_seq)
        if mask is not None:
            totals["max_sequence_length"] = max(totals["max_sequence_length"], int(mask.sum(-1).max()))
            totals["tokens"] += int(mask.sum())
        totals["label_tokens"] += n_label
        totals["loss_sum"] += float(loss.detach())
        if progress is not None:
            progress.update(n_seq)
        del loss
        if device.type == "cpu":
            release_host_memory()  # this batch's activations, before the next batch fragments the heap
    return check_totals(totals) if check else totals


def _lockstep_pass(model: nn.Module, head: Head, batch: dict, device, backwards: int, collector) -> None:
    """One forward and ``backwards`` backward passes of ``batch``, with the collector's hooks off."""
    kwargs, batch = head.inputs(batch, device)
    collector.counting = False
    try:
        with torch.enable_grad():
            outputs = model(**kwargs)
            for i in range(backwards):
                loss, _ = head.loss(outputs, batch, last=i == backwards - 1)
                if not loss.requires_grad:  # no label in this batch: the same backward, of a zero
                    loss = 0 * next(v for v in outputs.values()
                                    if isinstance(v, torch.Tensor) and v.requires_grad).sum()
                loss.backward(retain_graph=i < backwards - 1)
    finally:
        collector.counting = True


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
