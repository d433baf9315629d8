"""Hook-based collection of Kronecker-factored Fisher statistics (docs/DESIGN.md §1 step 1).

For every target layer ``s = W a`` (``W`` of shape ``(d_out, d_in)``) the collector accumulates

- ``A = (1/N_A) Σ a aᵀ``, ``(d_in, d_in)``, over the layer inputs of every counted token and call;
- ``G = (1/N_G) Σ g gᵀ``, ``(d_out, d_out)``, with ``g = ∂L/∂s`` the gradient of the SUM of the
  per-token losses with respect to the layer output (so ``g`` is a per-token gradient, and
  micro-batching does not change the factors);

the K-FAC approximation ``F ≈ A ⊗ G`` of the layer's Fisher block (Martens & Grosse 2015), and,
with ``gradient=True``, the weight gradient

- ``∇W = (1/N_G) Σ g aᵀ``, ``(d_out, d_in)``, over the same counted tokens as ``G``: the gradient of
  the summed loss divided by ``N_G`` (docs/DESIGN.md §1 step 1). Each layer's input is held from
  its forward until its output gradient arrives (a reference, not a copy).

Conventions (tested in ``tests/test_collect.py``):

- **Counted tokens** are those with ``attention_mask == 1``; padding never counts, in ``A`` or
  ``G``. Supervised label masks (``label == -100``) only remove tokens from the *loss*; ``A``
  still counts every non-padding token, and so does ``G`` (a prompt token's output gradient is
  generally non-zero through attention). ``N_A`` and ``N_G`` are the numbers of counted
  (token, call) pairs (times label draws for ``G`` under the true Fisher).
- A layer called twice in one forward counts both calls. Gradient checkpointing's recomputation
  (forward hooks firing again inside backward) is not counted twice.
- Layers that read the same input tensor in a forward (q/k/v, gate/up) share one ``A``: the
  sharing is discovered from tensor identity on the first forward, and the factor is
  accumulated once per input.
- Statistics are kept in float32 (float64 on request) whatever the model dtype.
- Memory modes (docs/DESIGN.md §4): ``full`` (dense ``(d, d)``), ``packed`` (upper triangles
  ``(d(d+1)/2,)``), ``projected`` (only ``diag(VᵀAV)`` and ``diag(UᵀGU)`` ``(k,)``, no ``A`` sharing).
- No weight gradient is computed: every parameter has ``requires_grad=False`` during
  collection; gradients reach the hooks because the hidden states entering the LOWEST decoder
  layer that holds a hooked module are made to require grad (so the layers below it keep no
  autograd graph and see no backward pass), or, when the hooked modules do not all sit in one
  stack of decoder layers (``model.layers.<i>...``), the input embeddings' output (for a model
  without input embeddings, its floating-point inputs).
- ``checkpoint=True`` (what the projected mode passes, docs/DESIGN.md §4) recomputes each decoder layer
  from that lowest one upward during the backward pass (``torch.utils.checkpoint``,
  non-reentrant), so a batch holds one layer's activations instead of all of them.
- The passes see the deterministic network whatever mode the caller left the model in: every
  module is in eval mode (dropout off), as PEFT's data-driven initialisers (EVA, CorDA) run
  their calibration, except the modules on which ``transformers``' gradient checkpointing is on,
  which apply it only in training mode and keep their flag; the global RNG is seeded from the
  config's seed for the passes, so anything random left is a function of the config too (the
  result depends on the model, the data and the config alone). Its ``requires_grad`` flags,
  ``training`` flags, hooks and the RNG state are restored on exit, also when an exception is
  raised inside the block.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from fisherlora import distributed, ops, sharded
from fisherlora.calibration import run_calibration
from fisherlora.config import FisherLoraConfig, MemoryMode
from fisherlora.entry import (
    checkpointed,
    make_hidden_states_require_grad,
    make_inputs_require_grad,
    make_output_require_grad,
)
from fisherlora.heads import TokenMasks, input_embeddings
from fisherlora.layers import decoder_layer_index, layer_shape
from fisherlora.memory import all_finite
from fisherlora.snapshot import ModelState, keeps_global_rng
from fisherlora.statistics import FisherStatistics

__all__ = ["StatisticsCollector", "collect_statistics"]


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


class StatisticsCollector:
    """Context manager that hooks target layers and accumulates their K-FAC factors.

    Inside the ``with`` block the caller runs forward passes (passing ``attention_mask`` as a
    keyword, as ``transformers`` models take it) and backward passes of a sum-reduced loss; on
    exit every hook is removed and the model restored. :meth:`statistics` then returns the
    normalised factors.

    Example::

        with StatisticsCollector(model, find_target_modules(model, lora_config)) as col:
            for batch in loader:
                out = model(**batch)
                loss, _ = token_loss_sum(out.logits, batch["labels"])
                loss.backward()
        stats = col.statistics()

    Args:
        model: the root module (the ``attention_mask`` keyword of its forward is captured).
        modules: layer name -> Linear/Conv1D module to hook (see :func:`find_target_modules`).
        stats_dtype: ``torch.float32`` (default) or ``torch.float64``.
        backend: op backend for the factor updates (``"auto"``, ``"torch"``, ...).
        mode: a :class:`~fisherlora.config.MemoryMode` other than ``auto`` (module docstring).
        bases: for ``projected``: layer name -> ``(U, Vh)``, the thin SVD factors
            ``(d_out, k)`` and ``(k, d_in)`` of the layer's weight (any float dtype).
        checkpoint: recompute the decoder layers, from the lowest hooked one up, in the
            backward pass (module docstring); ignored when the hooked modules are not all in
            one stack of decoder layers.
        gradient: also accumulate the weight gradient ``∇W`` of every layer (``full`` or
            ``packed`` mode), with :func:`fisherlora.ops.gradient_accumulate_`.

    Raises:
        ValueError: no modules, an unknown mode, missing bases for ``projected``, or
            ``gradient`` with ``projected``.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], *,
                 stats_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 mode: MemoryMode | str = MemoryMode.FULL,
                 bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, checkpoint: bool = False,
                 gradient: bool = False):
        if not modules:
            raise ValueError("StatisticsCollector needs at least one target module")
        held = MemoryMode.held()
        if mode not in held:
            raise ValueError(f"mode must be one of {[m.value for m in held]}, got {mode!r}")
        mode = MemoryMode(mode)
        if mode is MemoryMode.PROJECTED:
            missing = [n for n in modules if not bases or n not in bases]
            if missing:
                raise ValueError(f"projected mode needs the singular bases of {missing[:5]}")
            if gradient:
                raise ValueError("the weight gradient is dense (d_out x d_in per layer), which the projected mode "
                                 "does not hold; collect it in the full or packed mode")
        self.model = model
        self.modules = dict(modules)
        self.stats_dtype = stats_dtype
        self.backend = backend
        self.mode = mode
        self.checkpoint = checkpoint
        # projected mode: Q matrices (d, k) for the input side (V) and the output side (U)
        self._V = {n: bases[n][1].mT for n in modules} if mode is MemoryMode.PROJECTED else {}
        self._U = {n: bases[n][0] for n in modules} if mode is MemoryMode.PROJECTED else {}
        self.shapes = {n: layer_shape(m) for n, m in self.modules.items()}
        self._A: dict[str, torch.Tensor] = {}
        self._G: dict[str, torch.Tensor] = {}
        self.gradient = gradient
        self._grad: dict[str, torch.Tensor] = {}
        self.a_key: dict[str, str] = {}
        self.a_count: dict[str, int] = {}
        self.g_count: dict[str, int] = {n: 0 for n in self.modules}
        self._masks = TokenMasks(model)
        self._seen: dict[int, tuple] = {}
        self._handles: list = []
        self._state: ModelState | None = None
        self._normalised = False
        self.counting = True  # False: hooks add nothing (a sharded model's lock-step passes, §7)

    # ----------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> StatisticsCollector:
        model = self.model
        self._state = ModelState(model)
        try:
            for m in model.modules():  # eval mode but where transformers' checkpointing needs training
                m.training = m.training and bool(getattr(m, "gradient_checkpointing", False))
            for p in model.parameters():
                p.requires_grad_(False)
            self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
            self._handles += self._masks.hooks()
            layers = self._decoder_layers()
            embeds = input_embeddings(model)
            if layers:
                self._handles.append(layers[0].register_forward_pre_hook(make_hidden_states_require_grad,
                                                                         with_kwargs=True))
            elif embeds:
                self._handles += [e.register_forward_hook(make_output_require_grad) for e in embeds]
            else:
                self._handles.append(model.register_forward_pre_hook(make_inputs_require_grad, with_kwargs=True))
            if self.checkpoint:
                for layer in layers:
                    layer.forward = checkpointed(layer.forward)
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(partial(self._forward_hook, name)))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        self._masks.masks.clear()
        state, self._state = self._state, None
        if state is not None:
            state.restore()

    def _decoder_layers(self) -> list[nn.Module]:
        """The decoder layers from the lowest one holding a hooked module to the top of their
        stack; empty when the hooked modules are not all in one stack (``nn.ModuleList``)."""
        where = [decoder_layer_index(n) for n in self.modules]
        if not where or None in where or len({stack for stack, _ in where}) != 1:
            return []
        try:
            stack = self.model.get_submodule(where[0][0])
        except AttributeError:
            return []
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
            return []
        return list(stack)[min(i for _, i in where):]

    # ----------------------------------------------------------------------------- hooks
    def _root_pre_hook(self, module, args, kwargs):
        # counted once per forward and kept on the device: the counts are read once, when the
        # statistics are finalised, so no hook waits for the device (docs/DESIGN.md §11)
        self._masks.start(kwargs)
        self._seen.clear()
        return None

    def _rows_mask(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """``(mask, count)``: the batch's attention mask in the shape of the layer's token dims
        ``x.shape[:-1]``, which the ops require exactly (the one place where the mask is
        reshaped), and the rows it counts.

        Only where the order of the tokens is unambiguous: the same dims up to size-1 dims, or
        every token in a single dim (row-major, as ``reshape(-1, d)`` lays out ``(B, T)``). Any
        other shape with the same element count (sequence-first ``(T, B)``, tokens split into
        chunks, ...) is refused, because which row is which token would be a guess. A layer with
        one row per sequence ``(B, d)`` (a pooler, a classifier) counts every row (docs/DESIGN.md §10).
        Which mask (encoder or decoder) is :class:`fisherlora.heads.TokenMasks`'s choice.
        """
        mask, count = self._masks.mask_for(x)
        tokens = x.shape[:-1]
        if mask is None or (mask.dim() > 1 and tuple(tokens) == (mask.shape[0],)):
            return None, x[..., 0].numel()
        real = [n for n in tokens if n != 1]
        if mask.numel() != x[..., 0].numel() or (len(real) > 1 and real != [n for n in mask.shape if n != 1]):
            raise ValueError(
                f"layer {name!r}: attention_mask of shape {tuple(mask.shape)} does not match its input "
                f"tokens {tuple(tokens)}; the mask can only be laid onto the same dims (size-1 dims "
                "aside) or onto all tokens in one dim, since otherwise which row is which token is unknown"
            )
        return mask.reshape(tokens), count

    def _forward_hook(self, name: str, module: nn.Module, args, output) -> None:
        if self._normalised:
            raise RuntimeError(f"layer {name!r} ran after statistics() normalised this collector's factors in "
                               "place; use a new StatisticsCollector for more passes")
        if not self.counting:  # a lock-step pass of a sharded model (distributed.shard_batches)
            return
        x = args[0]
        mask, count = self._rows_mask(name, x)
        if not _in_backward():
            self._accumulate_A(name, x, mask, count)
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            # the input travels with the hook for the weight gradient: a reference, not a copy
            a = (x.detach(), x._version) if self.gradient else None
            output.register_hook(partial(self._grad_hook, name, mask, count, a))

    def _new_acc(self, name: str, d: int, device) -> torch.Tensor:
        if self.mode is MemoryMode.PROJECTED:
            size = (min(self.shapes[name]),)
        elif self.mode is MemoryMode.PACKED:
            size = (ops.packed_size(d),)
        else:
            size = (d, d)
        return torch.zeros(size, dtype=self.stats_dtype, device=device)

    def _update(self, acc: torch.Tensor, rows: torch.Tensor, mask, Q: torch.Tensor | None) -> None:
        if Q is not None:
            ops.projected_sq_accumulate_(acc, rows, Q, mask, backend=self.backend)
        else:
            ops.syrk_accumulate_(acc, rows, mask, backend=self.backend)

    @torch.no_grad()
    def _accumulate_A(self, name: str, x: torch.Tensor, mask: torch.Tensor | None, count: int) -> None:
        if self.mode is MemoryMode.PROJECTED:  # no sharing: every layer projects on its own V
            self.a_key[name] = name
            if name not in self._A:
                self._A[name] = self._new_acc(name, 0, x.device)
                self.a_count[name] = 0
            self._update(self._A[name], x.detach(), mask, self._V[name])
            self.a_count[name] += count
            return
        entry = self._seen.get(id(x))
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            shared = entry[2]
            if self.a_key.setdefault(name, shared) != shared:
                raise RuntimeError(
                    f"layer {name!r} read the input of {shared!r} in this forward but not in an earlier one; "
                    "fisherlora needs a fixed sharing of activation factors"
                )
            return
        key = self.a_key.setdefault(name, name)
        if key not in self._A:
            self._A[key] = self._new_acc(name, self.shapes[name][1], x.device)
            self.a_count[key] = 0
        self._update(self._A[key], x.detach(), mask, None)
        self.a_count[key] += count
        self._seen[id(x)] = (weakref.ref(x), x._version, key)

    @torch.no_grad()
    def _grad_hook(self, name: str, mask: torch.Tensor | None, count: int, a: tuple | None,
                   grad: torch.Tensor) -> None:
        if name not in self._G:
            self._G[name] = self._new_acc(name, self.shapes[name][0], grad.device)
        self._update(self._G[name], grad, mask, self._U.get(name))
        if a is not None:
            a, version = a
            if a._version != version:
                raise RuntimeError(f"layer {name!r}: its input was modified in place between the forward and the "
                                   "backward pass, so the weight gradient cannot be formed from it")
            if name not in self._grad:
                self._grad[name] = torch.zeros(self.shapes[name], dtype=self.stats_dtype, device=grad.device)
            ops.gradient_accumulate_(self._grad[name], grad, a, mask, backend=self.backend)
        self.g_count[name] += count

    # ----------------------------------------------------------------------------- results
    def statistics(self, info: dict | None = None) -> FisherStatistics:
        """The normalised factors ``A = Σaaᵀ/N_A`` and ``G = Σggᵀ/N_G`` (and ``∇W = Σgaᵀ/N_G``).

        The accumulators themselves become the factors: the first call mirrors (dense) and divides
        each one in place, one at a time, so finalising needs no memory beyond the accumulators
        (docs/DESIGN.md §4). Later calls return the same tensors; a pass after the first call is
        refused, since the accumulators no longer hold sums.

        Raises:
            RuntimeError: a layer saw no forward or no gradient (naming it), or a factor holds
                NaN/inf (naming the layers that use it).
        """
        missing = [n for n in self.modules if n not in self.a_key]
        if missing:
            raise RuntimeError(f"no forward pass reached the target layers {missing[:5]} (of {len(missing)})")
        self.a_count, self.g_count = _host_counts(self.a_count), _host_counts(self.g_count)  # read once
        no_grad = [n for n in self.modules if n not in self._G or self.g_count[n] == 0]
        if no_grad:
            raise RuntimeError(
                f"no output gradient reached {no_grad[:5]} (of {len(no_grad)}): run backward() on a loss "
                "inside the collector, on data with at least one counted token"
            )
        if not self._normalised:  # the accumulators become the statistics: no second copy
            self._normalised = True
            for key, acc in self._A.items():
                _normalise_(acc, self.a_count[key])
            for name, acc in self._G.items():
                _normalise_(acc, self.g_count[name])
            for name, acc in self._grad.items():
                acc.div_(max(self.g_count[name], 1))
        for key, acc in self._A.items():
            if not all_finite(acc):
                users = [n for n, k in self.a_key.items() if k == key]
                raise FloatingPointError(f"non-finite values in the activation covariance A of layer(s) {users}")
        for name, acc in self._G.items():
            if not all_finite(acc):
                raise FloatingPointError(f"non-finite values in the gradient covariance G of layer {name!r}")
        for name, acc in self._grad.items():
            if not all_finite(acc):
                raise FloatingPointError(f"non-finite values in the weight gradient of layer {name!r}")
        return FisherStatistics(dict(self._A), dict(self._G), dict(self.a_key), dict(self.a_count),
                                dict(self.g_count), dict(self.shapes), dict(info or {}), self.mode,
                                grad={n: self._grad[n] for n in self.modules if n in self._grad})


def _host_counts(counts: dict) -> dict[str, int]:
    """Token counts as ints; those the hooks kept on the device are read in one transfer."""
    kept = [k for k, v in counts.items() if isinstance(v, torch.Tensor)]
    return {**counts, **dict(zip(kept, torch.stack([counts[k] for k in kept]).tolist() if kept else []))}


def _normalise_(acc: torch.Tensor, count: int) -> None:
    """``acc`` (a dense accumulator mirrored first) divided by ``count`` in place: no temporary
    of its size (docs/DESIGN.md §4)."""
    if acc.dim() == 2:
        ops.symmetrize_(acc)
    acc.div_(max(count, 1))


@keeps_global_rng
def collect_statistics(model: nn.Module, modules: dict[str, nn.Module], batches, config: FisherLoraConfig, *,
                       mode: MemoryMode | str = MemoryMode.FULL, bases: dict | None = None,
                       num_batches: int | None = None, progress: bool = True,
                       desc: str = "calibration (fwd+bwd)", head=None, process_group=None) -> FisherStatistics:
    """Run the calibration passes over ``batches`` and return the statistics of ``modules``.

    Args:
        model: a model with a head of :mod:`fisherlora.heads` (default: a causal LM, output with
            ``.logits``). modules: layer name -> module. head: its :class:`fisherlora.heads.Head`
            (default :func:`fisherlora.heads.resolve_head`; a custom one carries the ``loss_fn``).
        batches: iterable of batches for that head (a causal LM: ``{"input_ids", "attention_mask", "labels"}``).
        config: fisher type, label draws, seed, statistics dtype, backend, ``init`` (weight gradient or not).
        mode, bases: the memory mode and, for ``projected``, the singular bases (:class:`StatisticsCollector`;
            projected also recomputes the decoder layers in the backward pass: activation checkpointing).
        process_group: inside an initialised ``torch.distributed`` (or with this group), every rank
            passes the SAME ``batches``, runs its share and gets the statistics of all (§7).

    Raises:
        ValueError: empty data. RuntimeError/FloatingPointError: as
            :meth:`StatisticsCollector.statistics`. The model is restored in every case.
    """
    dtype = getattr(torch, config.stats_dtype)
    ctx = distributed.context(process_group)
    collector = StatisticsCollector(model, modules, stats_dtype=dtype, backend=config.backend, mode=mode,
                                    bases=bases, checkpoint=mode == MemoryMode.PROJECTED,
                                    gradient=config.init.needs_gradient)
    with collector as col, tqdm(total=num_batches or 0, desc=desc, unit="seq", disable=not progress,
                                dynamic_ncols=True) as bar, distributed.together(ctx, "the calibration passes"):
        shares = batches if ctx is None else distributed.shard_batches(batches, ctx, sharded.model_is_sharded(model))
        torch.manual_seed(config.seed + (ctx.rank if ctx else 0))  # not the caller's RNG (restored on exit)
        totals = run_calibration(model, shares, fisher_type=config.fisher_type.value, mc_samples=config.mc_samples,
                                 seed=config.seed + (ctx.rank if ctx else 0), progress=bar, head=head,
                                 check=ctx is None, collector=col)
    if ctx is not None:
        totals = distributed.reduce_collector(col, totals, ctx)
    return col.statistics(info={"calibration": totals, "fisher_type": config.fisher_type.value})
