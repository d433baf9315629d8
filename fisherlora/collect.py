"""Hook-based collection of Kronecker-factored Fisher statistics (DESIGN.md §1 step 1).

For every target layer ``s = W a`` (``W`` of shape ``(d_out, d_in)``) the collector accumulates

- ``A = (1/N_A) Σ a aᵀ``, ``(d_in, d_in)``, over the layer inputs of every counted token and call;
- ``G = (1/N_G) Σ g gᵀ``, ``(d_out, d_out)``, with ``g = ∂L/∂s`` the gradient of the SUM of the
  per-token losses with respect to the layer output (so ``g`` is a per-token gradient, and
  micro-batching does not change the factors);

the K-FAC approximation ``F ≈ A ⊗ G`` of the layer's Fisher block (Martens & Grosse 2015).

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
- Memory modes (DESIGN.md §4): ``full`` keeps dense ``(d, d)`` factors; ``packed`` keeps their
  upper triangles ``(d(d+1)/2,)``; ``projected`` never forms ``A`` or ``G``: given each layer's
  singular bases it accumulates ``diag(VᵀAV)`` and ``diag(UᵀGU)`` ``(k,)`` directly (no ``A``
  sharing: each layer projects on its own ``V``).
- No weight gradient is computed: every parameter has ``requires_grad=False`` during
  collection; gradients reach the hooks because the hidden states entering the LOWEST decoder
  layer that holds a hooked module are made to require grad (so the layers below it keep no
  autograd graph and see no backward pass), or, when the hooked modules do not all sit in one
  stack of decoder layers (``model.layers.<i>...``), the input embeddings' output (for a model
  without input embeddings, its floating-point inputs).
- ``checkpoint=True`` (what the projected mode passes, DESIGN.md §4) recomputes each decoder layer
  from that lowest one upward during the backward pass (``torch.utils.checkpoint``,
  non-reentrant), so a batch holds one layer's activations instead of all of them.
- The model's train/eval mode is left as the caller set it (``eval()`` for the Fisher of the
  deterministic network; ``train()`` where gradient checkpointing, which ``transformers`` only
  applies in training mode, is wanted). Its ``requires_grad`` flags, ``training`` flags, hooks
  and the RNG state are restored on exit, also when an exception is raised inside the block.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fisherlora import ops
from fisherlora._hostmem import release_host_memory

__all__ = ["FisherStatistics", "StatisticsCollector", "find_target_modules", "is_conv1d", "weight_fingerprint",
           "fingerprints_match", "decoder_layer_index"]


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers``' ``Conv1D`` (weight stored ``(d_in, d_out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_fingerprint(W: torch.Tensor, probes: int = 4) -> dict:
    """A sketch that recognises a weight: ``{"rms": ‖W‖_F/√(d_out·d_in), "sketch": [uₖᵀ W zₖ]}``.

    ``uₖ`` and ``zₖ`` are fixed unit Gaussian vectors (seeded by the shape), so any change of
    ``W`` beyond rounding (a permutation, a fine-tuning step) moves the sketch at first order,
    unlike the Frobenius norm. Computed in float64 on the CPU. Used to recognise the base model
    of a saved initialisation and the model statistics were collected on.
    """
    d_out, d_in = W.shape
    g = torch.Generator().manual_seed(1_000_003 * d_out + d_in)
    u = torch.randn(probes, d_out, generator=g, dtype=torch.float64)
    z = torch.randn(probes, d_in, generator=g, dtype=torch.float64)
    u, z = u / u.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    Wd = W.detach().to("cpu", torch.float64)
    return {"rms": float(Wd.norm()) / (d_out * d_in) ** 0.5, "sketch": ((u @ Wd) * z).sum(1).tolist()}


def fingerprints_match(a: dict, b: dict, rtol: float = 1e-3) -> bool:
    """Sketches equal up to ``rtol`` of the weight's rms entry (a sketch's typical size): float32
    rounding passes, a different dtype's rounding (bf16 vs fp32) or any real change does not."""
    tol = rtol * max(a["rms"], 1e-30)
    return len(a["sketch"]) == len(b["sketch"]) and all(abs(x - y) <= tol for x, y in zip(a["sketch"], b["sketch"]))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D layer."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def decoder_layer_index(name: str) -> tuple[str, int] | None:
    """``(stack, i)`` for a module inside decoder layer ``i`` of the stack ``stack``: the first
    integer of the dotted name (``model.layers.7.mlp.up_proj`` -> ``("model.layers", 7)``), or
    None for a module outside any numbered stack (``lm_head``)."""
    m = _LAYER_INDEX.search(name)
    return (name[: m.start()], int(m.group(1))) if m else None


def find_target_modules(model: nn.Module, lora_config) -> dict[str, nn.Module]:
    """The layers PEFT's ``LoraConfig`` would adapt, by full module name, in model order.

    Uses PEFT's own matching (``check_target_module_exists``, and its ``all-linear`` expansion,
    which leaves out the output head), so fisherlora and PEFT always agree on the targets.

    Raises:
        ValueError: nothing matches, or a match is not a Linear/Conv1D layer.
    """
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    config = copy.deepcopy(lora_config)
    config = _maybe_include_all_linear_layers(config, model)
    found = {}
    for name, module in model.named_modules():
        if name and check_target_module_exists(config, name):
            if hasattr(module, "base_layer"):
                raise ValueError(
                    f"{name!r} already carries PEFT adapters ({type(module).__name__}); pass the base model, "
                    "not a PeftModel or a model wrapped before")
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise ValueError(
                    f"target module {name!r} is a {type(module).__name__}; fisherlora supports nn.Linear "
                    "and transformers' Conv1D"
                )
            found[name] = module
    if not found:
        raise ValueError(
            f"target_modules={lora_config.target_modules!r} matches no module of {type(model).__name__}; "
            f"some module names: {[n for n, _ in list(model.named_modules())[1:8]]}"
        )
    return found


@dataclass
class FisherStatistics:
    """Normalised K-FAC factors of a set of layers.

    Attributes:
        A: factor key -> activation covariance ``E[aaᵀ]`` (float32/float64): dense
            ``(d_in, d_in)`` (``kind="full"``), packed ``(d_in(d_in+1)/2,)`` (``"packed"``), or
            its projection ``diag(VᵀAV)`` ``(k,)`` on the layer's right singular vectors
            (``"projected"``).
        G: layer name -> gradient covariance ``E[ggᵀ]``, in the same form (``diag(UᵀGU)``).
        a_key: layer name -> key of its (possibly shared) ``A``.
        a_count: factor key -> counted (token, call) pairs ``N_A``.
        g_count: layer name -> counted (token, call, draw) triples ``N_G``.
        shapes: layer name -> ``(d_out, d_in)``.
        info: free-form JSON-able metadata (model, data, fisher type, label tokens, ...).
        kind: ``"full"``, ``"packed"`` or ``"projected"``.
    """

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    a_key: dict[str, str]
    a_count: dict[str, int]
    g_count: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    info: dict = field(default_factory=dict)
    kind: str = "full"

    @classmethod
    def merge(cls, parts: list[FisherStatistics]) -> FisherStatistics:
        """One object from the statistics of disjoint layer groups (same kind)."""
        out = cls({}, {}, {}, {}, {}, {}, {}, parts[0].kind if parts else "full")
        for p in parts:
            if p.kind != out.kind:
                raise ValueError(f"cannot merge {p.kind} statistics into {out.kind} ones")
            for name in ("A", "G", "a_key", "a_count", "g_count", "shapes"):
                getattr(out, name).update(getattr(p, name))
            fingerprints = {**out.info.get("weight_fingerprints", {}), **p.info.get("weight_fingerprints", {})}
            out.info.update(p.info)  # the calibration totals are the same for every group
            out.info["weight_fingerprints"] = fingerprints
        return out

    def drop_tensors(self) -> None:
        """Free the factors, keeping names and counts (for the report)."""
        self.A.clear()
        self.G.clear()

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)`` of layer ``name``."""
        return self.A[self.a_key[name]], self.G[name]

    @property
    def layers(self) -> list[str]:
        return list(self.G)

    def save(self, path) -> None:
        """Write to a safetensors file (tensors ``A.<key>``, ``G.<name>``; the rest as metadata)."""
        from safetensors.torch import save_file

        tensors = {f"A.{k}": v.contiguous() for k, v in self.A.items()}
        tensors.update({f"G.{k}": v.contiguous() for k, v in self.G.items()})
        meta = {"a_key": self.a_key, "a_count": self.a_count, "g_count": self.g_count,
                "shapes": self.shapes, "info": self.info, "kind": self.kind}
        save_file(tensors, str(path), metadata={"fisherlora": json.dumps(meta)})

    @classmethod
    def load(cls, path, device="cpu") -> FisherStatistics:
        """Read a file written by :meth:`save`; raises ``ValueError`` for another kind of file."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                raw = (f.metadata() or {}).get("fisherlora")
                if raw is None:
                    raise ValueError(f"{path} is not a fisherlora statistics file (no 'fisherlora' metadata)")
                meta = json.loads(raw)
                A = {k: f.get_tensor(f"A.{k}") for k in meta["a_count"]}
                G = {k: f.get_tensor(f"G.{k}") for k in meta["g_count"]}
        except SafetensorError as exc:
            raise ValueError(f"{str(path)!r} is not a complete fisherlora statistics file: {exc}") from exc
        shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        return cls(A, G, meta["a_key"], meta["a_count"], meta["g_count"], shapes, meta["info"],
                   meta.get("kind", "full"))


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
        mode: ``"full"``, ``"packed"`` or ``"projected"`` (module docstring).
        bases: for ``"projected"``: layer name -> ``(U, Vh)``, the thin SVD factors
            ``(d_out, k)`` and ``(k, d_in)`` of the layer's weight (any float dtype).
        checkpoint: recompute the decoder layers, from the lowest hooked one up, in the
            backward pass (module docstring); ignored when the hooked modules are not all in
            one stack of decoder layers.

    Raises:
        ValueError: no modules, an unknown mode, or missing bases for ``"projected"``.
    """

    MODES = ("full", "packed", "projected")

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], *,
                 stats_dtype: torch.dtype = torch.float32, backend: str = "auto", mode: str = "full",
                 bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, checkpoint: bool = False):
        if not modules:
            raise ValueError("StatisticsCollector needs at least one target module")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "projected":
            missing = [n for n in modules if not bases or n not in bases]
            if missing:
                raise ValueError(f"projected mode needs the singular bases of {missing[:5]}")
        self.model = model
        self.modules = dict(modules)
        self.stats_dtype = stats_dtype
        self.backend = backend
        self.mode = mode
        self.checkpoint = checkpoint
        # projected mode: Q matrices (d, k) for the input side (V) and the output side (U)
        self._V = {n: bases[n][1].mT for n in modules} if mode == "projected" else {}
        self._U = {n: bases[n][0] for n in modules} if mode == "projected" else {}
        self.shapes = {n: layer_shape(m) for n, m in self.modules.items()}
        self._A: dict[str, torch.Tensor] = {}
        self._G: dict[str, torch.Tensor] = {}
        self.a_key: dict[str, str] = {}
        self.a_count: dict[str, int] = {}
        self.g_count: dict[str, int] = {n: 0 for n in self.modules}
        self._mask: torch.Tensor | None = None
        self._mask_count: int | None = None
        self._seen: dict[int, tuple] = {}
        self._handles: list = []
        self._saved: dict | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> StatisticsCollector:
        model = self.model
        self._saved = {
            "requires_grad": [(p, p.requires_grad) for p in model.parameters()],
            "training": [(m, m.training) for m in model.modules()],
            "rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "forward": [],  # (decoder layer, its own instance-level forward or None) under checkpoint
        }
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
            layers = self._decoder_layers()
            embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if layers:
                self._handles.append(layers[0].register_forward_pre_hook(_make_hidden_states_require_grad,
                                                                         with_kwargs=True))
            elif isinstance(embed, nn.Module):
                self._handles.append(embed.register_forward_hook(_make_output_require_grad))
            else:
                self._handles.append(model.register_forward_pre_hook(_make_inputs_require_grad, with_kwargs=True))
            if self.checkpoint:
                for layer in layers:
                    self._saved["forward"].append((layer, layer.__dict__.get("forward")))
                    layer.forward = _checkpointed(layer.forward)
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
        self._mask = None
        saved, self._saved = self._saved, None
        if saved is None:
            return
        for layer, own in saved["forward"]:
            if own is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = own
        for p, flag in saved["requires_grad"]:
            p.requires_grad_(flag)
        for m, flag in saved["training"]:
            m.training = flag
        torch.random.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

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
        mask = kwargs.get("attention_mask")
        self._mask = None if mask is None else mask.bool()
        # counted once per forward: one device sync per batch, not one per hooked layer
        self._mask_count = None if mask is None else int(self._mask.sum())
        self._seen.clear()
        return None

    def _rows_mask(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is None:
            return None
        if mask.numel() != x[..., 0].numel():
            raise ValueError(
                f"layer {name!r}: attention_mask of shape {tuple(mask.shape)} does not match its input "
                f"tokens {tuple(x.shape[:-1])}"
            )
        return mask.reshape(x.shape[:-1])

    def _forward_hook(self, name: str, module: nn.Module, args, output) -> None:
        x = args[0]
        mask = self._rows_mask(name, x)
        count = self._mask_count if mask is not None else x[..., 0].numel()
        if not _in_backward():
            self._accumulate_A(name, x, mask, count)
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._grad_hook, name, mask, count))

    def _new_acc(self, name: str, d: int, device) -> torch.Tensor:
        if self.mode == "projected":
            size = (min(self.shapes[name]),)
        elif self.mode == "packed":
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
        if self.mode == "projected":  # no sharing: every layer projects on its own V
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
    def _grad_hook(self, name: str, mask: torch.Tensor | None, count: int, grad: torch.Tensor) -> None:
        if name not in self._G:
            self._G[name] = self._new_acc(name, self.shapes[name][0], grad.device)
        self._update(self._G[name], grad, mask, self._U.get(name))
        self.g_count[name] += count

    # ----------------------------------------------------------------------------- results
    def statistics(self, info: dict | None = None) -> FisherStatistics:
        """The normalised factors ``A = Σaaᵀ/N_A`` and ``G = Σggᵀ/N_G``.

        Raises:
            RuntimeError: a layer saw no forward or no gradient (naming it), or a factor holds
                NaN/inf (naming the layers that use it).
        """
        missing = [n for n in self.modules if n not in self.a_key]
        if missing:
            raise RuntimeError(f"no forward pass reached the target layers {missing[:5]} (of {len(missing)})")
        no_grad = [n for n in self.modules if n not in self._G or self.g_count[n] == 0]
        if no_grad:
            raise RuntimeError(
                f"no output gradient reached {no_grad[:5]} (of {len(no_grad)}): run backward() on a loss "
                "inside the collector, on data with at least one counted token"
            )
        A = {key: ops.symmetrize_(acc) / max(self.a_count[key], 1) for key, acc in self._A.items()}
        G = {name: ops.symmetrize_(acc) / max(self.g_count[name], 1) for name, acc in self._G.items()}
        for key, mat in A.items():
            if not torch.isfinite(mat).all():
                users = [n for n, k in self.a_key.items() if k == key]
                raise FloatingPointError(f"non-finite values in the activation covariance A of layer(s) {users}")
        for name, mat in G.items():
            if not torch.isfinite(mat).all():
                raise FloatingPointError(f"non-finite values in the gradient covariance G of layer {name!r}")
        return FisherStatistics(A, G, dict(self.a_key), dict(self.a_count), dict(self.g_count),
                                dict(self.shapes), dict(info or {}), self.mode)


def _make_output_require_grad(module, args, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def _make_hidden_states_require_grad(module, args, kwargs):
    """Pre-hook of the lowest hooked decoder layer: its hidden states (first positional
    argument, or ``hidden_states=``) start the backward pass."""
    if not torch.is_grad_enabled():
        return None
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor) and h.is_floating_point():
        return args, {**kwargs, "hidden_states": h.detach().requires_grad_(True)}
    return _make_inputs_require_grad(module, args, kwargs)


def _checkpointed(forward):
    """``forward`` run under non-reentrant activation checkpointing when grad mode is on."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _make_inputs_require_grad(module, args, kwargs):
    if not torch.is_grad_enabled():
        return None

    def lift(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
            return t.detach().requires_grad_(True)
        return t

    return tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}


# --------------------------------------------------------------------------- the package's driver
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
                    progress: Iterator | None = None) -> dict:
    """Drive forward and backward passes of a causal LM over calibration batches, inside a
    :class:`StatisticsCollector` (whose hooks do the accumulating).

    Each batch holds ``input_ids`` and ``attention_mask`` ``(B, T)``, and ``labels`` ``(B, T)``
    (-100 where no loss is taken). The loss is :func:`token_loss_sum`. Under the true Fisher,
    labels at the label positions are drawn ``mc_samples`` times from the model's own
    predictive distribution (a ``torch.Generator`` seeded with ``seed``; the global RNG is not
    touched) and each draw is back-propagated; the forward pass, and so ``A``, is shared.

    Returns:
        ``{"batches", "sequences", "tokens", "label_tokens", "loss_sum"}`` totals.

    Raises:
        ValueError: empty data, or a batch without ``input_ids``.
    """
    accepts_positions = "position_ids" in _forward_params(model)
    totals = {"batches": 0, "sequences": 0, "tokens": 0, "label_tokens": 0, "loss_sum": 0.0}
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
        totals["tokens"] += int(attention_mask.sum())
        totals["label_tokens"] += n_label
        totals["loss_sum"] += float(loss.detach())
        if progress is not None:
            progress.update(input_ids.shape[0])
        del loss
        if device.type == "cpu":
            release_host_memory()  # this batch's activations, before the next batch fragments the heap
    if totals["batches"] == 0:
        raise ValueError("the calibration data is empty: no batch was produced")
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
