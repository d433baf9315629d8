"""Model heads: for each kind of model, what a calibration batch feeds its forward, the summed
loss and the number of examples it sums over, how labels are drawn for the true Fisher, which
attention mask counts a layer's input rows, and the PEFT task type (docs/DESIGN.md §10).

Kinds: ``causal_lm`` (``*ForCausalLM``, ``*LMHeadModel``, and any other module whose output has
``.logits`` when no ``loss_fn`` is given), ``seq_cls`` (``*ForSequenceClassification``),
``image_cls`` (``*ForImageClassification``), ``seq2seq_lm`` (encoder-decoder LMs such as T5), and
``custom`` (a user ``loss_fn``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from fisherlora.losses import position_ids_from_mask, token_loss_sum

__all__ = ["Head", "resolve_head", "head_kind", "batch_size", "TokenMasks", "input_embeddings", "default_lora_config"]

#: PEFT ``task_type`` per head kind (None: a plain ``PeftModel``)
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM",
              "image_cls": None, "custom": None}
_SUFFIXES = (("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"),
             ("ForSequenceClassification", "seq_cls"), ("ForImageClassification", "image_cls"),
             ("ForConditionalGeneration", "seq2seq_lm"), ("ForSeq2SeqLM", "seq2seq_lm"))


def head_kind(model: nn.Module) -> str:
    """The head kind of ``model`` from its class name (``BertForSequenceClassification`` ->
    ``seq_cls``); ``*ForConditionalGeneration`` counts as ``seq2seq_lm`` only for an
    encoder-decoder config. Anything else is treated as a causal LM (the historical default)."""
    name = type(model).__name__
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            if kind == "seq2seq_lm" and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                continue
            return kind
    return "causal_lm"


def _forward_params(model: nn.Module) -> set[str] | None:
    """The keyword names the model's forward takes; None when it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _sample_classes(logits: torch.Tensor, keep: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of ``logits`` ``(..., C)`` drawn from ``softmax(logits)`` (float32 or
    wider); -100 where ``keep`` ``(...)`` is False."""
    probs = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), -1)
    sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(keep.shape)
    return sampled.masked_fill(~keep, -100)


class Head:
    """The calibration side of one head kind (module docstring).

    Args:
        kind: a key of :data:`TASK_TYPES`. model: the model (its forward's parameters are read).
        loss_fn: for ``custom``: ``loss_fn(outputs, batch)`` returning the SUM over examples of
            the per-example losses as a 0-d tensor, or ``(sum, count)`` with ``count`` the number
            of examples summed (an int); a bare tensor counts ``batch``'s size (dim 0 of its first
            tensor) as examples.
    """

    def __init__(self, kind: str, model: nn.Module, loss_fn: Callable | None = None):
        self.kind = kind
        self.loss_fn = loss_fn
        self.task_type = TASK_TYPES[kind]
        self._params = _forward_params(model)
        self._model = model

    # -------------------------------------------------------------------------- inputs
    def inputs(self, batch: dict, device) -> tuple[dict, dict]:
        """``(model kwargs, loss batch)``: the batch on ``device``, with padding labels set to -100
        and, per kind, positions (causal LM), decoder inputs and mask (seq2seq).

        Raises:
            ValueError: a batch without the kind's input (``input_ids``; ``pixel_values``), or
                without ``labels`` for a classifier or an encoder-decoder.
        """
        b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if self.kind == "custom":
            return {k: v for k, v in b.items() if self._params is None or k in self._params}, b
        need = "pixel_values" if self.kind == "image_cls" else "input_ids"
        if need not in b:
            raise ValueError(f"a calibration batch for the {self.kind!r} head needs {need!r}; got keys {sorted(b)}")
        if self.kind in ("image_cls", "seq_cls", "seq2seq_lm") and "labels" not in b:
            raise ValueError(f"a calibration batch for the {self.kind!r} head needs 'labels'; got keys {sorted(b)}")
        if self.kind == "image_cls":
            return {"pixel_values": b["pixel_values"]}, b
        ids = b["input_ids"]
        mask = b.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "causal_lm":
            labels = b.get("labels")
            b["labels"] = (ids if labels is None else labels).masked_fill(mask == 0, -100)
            kwargs["use_cache"] = False
            if self._params is None or "position_ids" in self._params:
                kwargs["position_ids"] = position_ids_from_mask(mask)
        elif self.kind == "seq2seq_lm":
            labels = b["labels"]
            dec_ids = b.get("decoder_input_ids")
            kwargs["decoder_input_ids"] = (self._model.prepare_decoder_input_ids_from_labels(labels=labels)
                                           if dec_ids is None else dec_ids)
            dec_mask = b.get("decoder_attention_mask")
            kwargs["decoder_attention_mask"] = (labels != -100).long() if dec_mask is None else dec_mask
            b["labels"] = labels.masked_fill(kwargs["decoder_attention_mask"] == 0, -100)
            kwargs["use_cache"] = False
        elif self.kind == "seq_cls" and "token_type_ids" in b:
            kwargs["token_type_ids"] = b["token_type_ids"]
        return kwargs, b

    # -------------------------------------------------------------------------- loss
    def loss(self, outputs, batch: dict, *, last: bool = True) -> tuple[torch.Tensor, int]:
        """``(loss, count)``: the SUM of per-example losses (0-d, float32 or wider) and the number
        of examples it sums (label tokens for the token-level kinds, labelled images or
        sequences for classifiers). ``last``: the last backward over these outputs (the causal
        LM's loss may then reuse the logits' storage for their gradient)."""
        if self.kind == "custom":
            out = self.loss_fn(outputs, batch)
            loss, count = out if isinstance(out, tuple) else (out, batch_size(batch))
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"loss_fn must return a 0-d tensor (the SUM of per-example losses), or "
                                 f"(tensor, count); got {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
            if torch.is_grad_enabled() and loss.grad_fn is None:
                raise ValueError("loss_fn returned a tensor without a graph (no grad_fn: e.g. built with "
                                 "torch.tensor(float(...)), .item() or .detach()): it must return the SUM of "
                                 "per-example losses computed from the model's outputs with torch operations, so "
                                 "that the gradients flow back through the model")
            return loss, int(count)
        logits = outputs.logits
        labels = batch["labels"]
        if self.kind == "causal_lm":
            return token_loss_sum(logits, labels, reuse_logits=last)
        if self.kind == "seq2seq_lm":
            return token_loss_sum(logits, labels, reuse_logits=last, shift=False)
        work = logits.to(torch.promote_types(logits.dtype, torch.float32))
        problem = self.problem()
        if problem == "regression":  # the Gaussian negative log-likelihood with unit variance
            return 0.5 * (work - labels.to(work.dtype).reshape(work.shape)).square().sum(), int(labels.shape[0])
        if problem == "multi_label_classification":
            loss = nn.functional.binary_cross_entropy_with_logits(work, labels.to(work.dtype), reduction="sum")
            return loss, int(labels.shape[0])
        loss = nn.functional.cross_entropy(work, labels.long(), ignore_index=-100, reduction="sum")
        return loss, int((labels != -100).sum())

    def problem(self) -> str:
        """A classifier's likelihood: ``single_label_classification`` (softmax), ``regression``
        (unit Gaussian: ``num_labels == 1`` or ``problem_type="regression"``) or
        ``multi_label_classification`` (independent sigmoids), as ``transformers`` decides it."""
        cfg = self._model.config
        if cfg.problem_type:
            return cfg.problem_type
        return "regression" if cfg.num_labels == 1 else "single_label_classification"

    # -------------------------------------------------------------------------- true Fisher
    def draws(self, outputs, batch: dict, n: int, gen: torch.Generator) -> list[dict]:
        """``n`` copies of ``batch`` whose labels are drawn from the model's predictive
        distribution (``fisher_type="true"``), at the positions the data labels (docs/DESIGN.md §10)."""
        logits = outputs.logits
        labels = batch["labels"]
        out = []
        if self.kind == "causal_lm":  # the predictive distribution once, for every draw (docs/DESIGN.md §4)
            probs = torch.softmax(logits.detach()[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)
            keep = labels[:, 1:] != -100
            for _ in range(n):
                sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen)
                drawn = torch.cat([labels[:, :1], sampled.reshape(keep.shape).masked_fill(~keep, -100)], 1)
                out.append({**batch, "labels": drawn})
            return out
        for _ in range(n):
            if self.kind == "seq2seq_lm" or self.problem() == "single_label_classification":
                drawn = _sample_classes(logits, labels != -100, gen)
            elif self.problem() == "regression":  # y ~ N(f(x), 1)
                drawn = logits.detach() + torch.randn(logits.shape, generator=gen, device=logits.device,
                                                      dtype=logits.dtype)
            else:  # multi-label: independent Bernoulli draws
                p = torch.sigmoid(logits.detach().float())
                drawn = (torch.rand(p.shape, generator=gen, device=p.device) < p).to(labels.dtype)
            out.append({**batch, "labels": drawn})
        return out


def batch_size(batch: dict) -> int:
    """Examples in a batch: dim 0 of its first tensor (1 if it holds none)."""
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return 1 if first is None else int(first.shape[0])


def resolve_head(model: nn.Module, loss_fn: Callable | None = None, fisher_type: str = "empirical") -> Head:
    """The :class:`Head` of ``model`` (``custom`` when ``loss_fn`` is given).

    Raises:
        ValueError: ``loss_fn`` that is not callable, or ``fisher_type="true"`` with a custom
            ``loss_fn`` (fisherlora cannot know its predictive distribution), before any pass.
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(outputs, batch), got {type(loss_fn).__name__}")
        if fisher_type == "true":
            raise ValueError("fisher_type='true' needs the model's predictive distribution, which a custom loss_fn "
                             "does not define: use fisher_type='empirical' with loss_fn, or a built-in head")
        return Head("custom", model, loss_fn)
    return Head(head_kind(model), model)


def input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs start the backward pass when the targets are not in one stack
    of layers: the input embeddings, and an encoder-decoder's encoder and decoder embeddings
    (T5's stacks hold their own modules sharing the ``shared`` weight). Empty without any."""
    found = []
    for owner in (model, *(_stacks(model))):
        get = getattr(owner, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if isinstance(emb, nn.Module) and all(emb is not f for f in found):
            found.append(emb)
    return found


def _stacks(model: nn.Module) -> list[nn.Module]:
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return []
    return [m for m in (model.get_encoder(), model.get_decoder()) if isinstance(m, nn.Module)]


class TokenMasks:
    """Which attention mask counts a layer's input rows: the encoder's ``attention_mask``, or
    an encoder-decoder model's ``decoder_attention_mask`` for layers that run after its encoder,
    except layers that read the encoder's output itself (cross-attention keys and values).

    The collector calls :meth:`hooks` to register what it needs and :meth:`mask_for` per layer
    call. For a model that is not encoder-decoder every layer uses ``attention_mask``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = getattr(model, "config", None)
        self.encoder = model.get_encoder() if getattr(cfg, "is_encoder_decoder", False) else None
        self.masks: dict[str, torch.Tensor | None] = {}
        self.counts: dict[str, torch.Tensor | None] = {}
        self._after_encoder = False
        self._encoder_out = None

    def start(self, kwargs: dict) -> None:
        """At the root forward: capture the masks of this forward."""
        self._after_encoder, self._encoder_out = False, None
        for key in ("attention_mask", "decoder_attention_mask"):
            m = kwargs.get(key)
            self.masks[key] = None if m is None else m.bool()
            self.counts[key] = None if m is None else self.masks[key].sum()  # a device tensor: no sync

    def hooks(self) -> list:
        """Handles of the hooks registered (the encoder's end), for the collector to remove."""
        if self.encoder is None:
            return []

        def done(module, args, output):
            self._after_encoder = True
            self._encoder_out = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)

        return [self.encoder.register_forward_hook(done)]

    def mask_for(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(mask, count)`` for a layer whose input is ``x`` (the count a 0-d device tensor)."""
        key = ("decoder_attention_mask" if self._after_encoder and x is not self._encoder_out
               else "attention_mask")
        return self.masks.get(key), self.counts.get(key)


def default_lora_config(config, head: Head, model: nn.Module):
    """The ``LoraConfig`` used when none is passed: ``config.to_lora_config()`` with the head's
    PEFT ``task_type``. An image classifier's output layer (``classifier``/``score``), which PEFT
    has no task type to recognise, is left out of the targets and trained in full
    (``modules_to_save``), as PEFT's ``SEQ_CLS`` task type does for sequence classifiers."""
    extra = {"task_type": head.task_type}
    if head.kind == "image_cls":
        names = [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]
        if names:
            extra.update(exclude_modules=names[:1], modules_to_save=names[:1])
    return config.to_lora_config(**extra)
