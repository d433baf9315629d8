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

from fisherlora.losses import _SumCrossEntropy, position_ids_from_mask, token_loss_sum  # noqa: F401 (re-exported)
from fisherlora.memory import release_host_memory

__all__ = ["token_loss_sum", "position_ids_from_mask", "run_calibration", "EmptyCalibrationError"]


class EmptyCalibrationError(ValueError):
    """The calibration data produced no batch."""


def run_calibration(model: nn.Module, batches: Iterable[dict], *,
                    fisher_type: str = "empirical", mc_samples: int = 1, seed: int = 0,
                    progress: Iterator | None = None) -> dict:
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
        ValueError: empty data, or a batch without ``input_ids``.
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
