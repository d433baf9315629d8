"""The target layers of a model: which modules are adapted, their weights' shape and orientation,
their decoder-layer index and group, their rank and scaling, and the checks of what can be adapted
(the fingerprint that recognises a weight is :mod:`fisherlora.fingerprint`). Every other module
of the package reads layers through these functions.

A target is a ``torch.nn.Linear`` or a ``transformers`` ``Conv1D`` (GPT-2), whose weight is
stored transposed, ``(d_in, d_out)``, or a supported quantised layer (:mod:`fisherlora.quant`,
docs/DESIGN.md §8); :func:`weight_view` and :func:`write_weight` hide both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from fisherlora import quant, sharded
from fisherlora.memory import all_finite

__all__ = [
    "is_conv1d",
    "weight_view",
    "write_weight",
    "weight_storage",
    "weight_views",
    "layer_shape",
    "decoder_layer_index",
    "layer_kind",
    "unwrap_model",
    "find_target_modules",
    "check_no_adapters",
    "layer_groups",
    "ranks_and_scalings",
    "check_ranks",
    "check_target_weights",
    "check_not_shared",
    "check_finite",
    "check_model",
]


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers``' ``Conv1D`` (weight stored ``(d_in, d_out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_view(module: nn.Module) -> torch.Tensor:
    """The ``(d_out, d_in)`` view of a Linear/Conv1D weight (no copy); for a quantised layer a new
    float32 tensor, its weight dequantised (:func:`fisherlora.quant.dequantise`): read it once
    per use and drop it, it is one layer's full-precision weight; for an FSDP2-sharded layer the
    whole weight gathered (:func:`fisherlora.sharded.gather`, a collective: every rank reads the
    same layers in the same order), to drop as soon as it is used."""
    if quant.is_quantised(module):
        return quant.dequantise(module)
    w = sharded.gather(module) if sharded.is_sharded(module) else module.weight
    return w.T if is_conv1d(module) else w


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Copy the ``(d_out, d_in)`` matrix ``W`` into the module's weight, in its own dtype and
    orientation (no autograd); a quantised layer's weight is requantised in place with its own
    settings (:func:`fisherlora.quant.requantise_`); a sharded layer's local shard is overwritten
    with its rows of ``W`` (:func:`fisherlora.sharded.write_`)."""
    if quant.is_quantised(module):
        quant.requantise_(module, W)
        return
    if sharded.is_sharded(module):  # this rank's rows of W into its shard (no communication)
        sharded.write_(module, W.T if is_conv1d(module) else W)
        return
    with torch.no_grad():
        weight_view(module).copy_(W)


def weight_storage(module: nn.Module) -> list[torch.Tensor]:
    """The tensors :func:`write_weight` overwrites (to stash before writing): the weight, or a
    quantised layer's packed data and scales, a sharded layer's local shard."""
    if quant.is_quantised(module):
        return quant.storage(module)
    return sharded.storage(module) if sharded.is_sharded(module) else [module.weight]


class _WeightViews(Mapping):
    """name -> :func:`weight_view` of the module, computed on access, one at a time."""

    def __init__(self, modules: dict[str, nn.Module]):
        self._modules = modules

    def __getitem__(self, name: str) -> torch.Tensor:
        return weight_view(self._modules[name])

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def weight_views(modules: dict[str, nn.Module]) -> Mapping[str, torch.Tensor]:
    """A lazy mapping name -> :func:`weight_view`: iterating its items holds one weight at a
    time, so quantised layers are dequantised one by one (for :func:`fisherlora.svd.iter_thin_svd`)."""
    return _WeightViews(modules)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear, Conv1D or quantised layer (nothing dequantised, nothing gathered)."""
    if quant.is_quantised(module):
        return quant.shape(module)
    shape = tuple(module.weight.shape)  # a DTensor's is the whole weight's
    return shape[::-1] if is_conv1d(module) else shape


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def decoder_layer_index(name: str) -> tuple[str, int] | None:
    """``(stack, i)`` for a module inside decoder layer ``i`` of the stack ``stack``: the first
    integer of the dotted name (``model.layers.7.mlp.up_proj`` -> ``("model.layers", 7)``), or
    None for a module outside any numbered stack (``lm_head``)."""
    m = _LAYER_INDEX.search(name)
    return (name[: m.start()], int(m.group(1))) if m else None


def layer_kind(name: str) -> str:
    """What a module is within its decoder layer, the same for every layer of a stack:
    ``model.layers.7.self_attn.q_proj`` -> ``self_attn.q_proj``; a module outside any numbered
    stack is its own kind (``lm_head``)."""
    m = _LAYER_INDEX.search(name)
    return name[m.end():] if m and m.end() < len(name) else name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model whose module names an adapter uses, out of the containers it may arrive in.

    Distributed and compiled containers (``DataParallel``, ``DistributedDataParallel``, FSDP,
    DeepSpeed engines, ``torch.compile``) are unwrapped with ``accelerate``'s own
    ``extract_model_from_parallel``, so a wrapped model gets the same targets, names and output
    head as the bare one (and its adapter loads on the bare base). Any other module that holds a
    ``transformers`` model without being one is refused: its names would not be the model's.

    Raises:
        ValueError: an unknown wrapper, naming the attribute that holds the model.
    """
    from accelerate.utils import extract_model_from_parallel
    from transformers import PreTrainedModel

    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    if not isinstance(inner, PreTrainedModel):
        held = next(((n, m) for n, m in inner.named_modules() if n and isinstance(m, PreTrainedModel)), None)
        if held is not None:
            raise ValueError(
                f"{type(inner).__name__} wraps a transformers model ({type(held[1]).__name__}) at {held[0]!r}: "
                f"fisherlora would see other module names and no output head; pass the model itself "
                f"(<wrapper>.{held[0]})")
    return inner


def find_target_modules(model: nn.Module, lora_config) -> dict[str, nn.Module]:
    """The layers PEFT's ``LoraConfig`` would adapt, by full module name, in model order.

    Uses PEFT's own matching (``check_target_module_exists``, and its ``all-linear`` expansion,
    which leaves out the output head), so fisherlora and PEFT always agree on the targets.

    Raises:
        ValueError: nothing matches, a match is not a Linear/Conv1D layer, or the model already
            holds PEFT adapters (:func:`check_no_adapters`).
    """
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    check_no_adapters(model)
    config = copy.deepcopy(lora_config)
    if config.target_modules == "all-linear":  # PEFT's expansion would skip them without a word
        other = next(((n, k) for n, m in model.named_modules() if (k := quant.unsupported_kind(m))), None)
        if other is not None:
            raise ValueError(f"module {other[0]!r} is a {other[1]} quantised layer, which target_modules='all-linear' "
                             f"would leave out; fisherlora supports, quantised, {quant.SUPPORTED}")
    config = _maybe_include_all_linear_layers(config, model)
    found = {}
    for name, module in model.named_modules():
        if name and check_target_module_exists(config, name):
            kind = quant.unsupported_kind(module)
            if kind is not None or not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise ValueError(
                    f"target module {name!r} is a {type(module).__name__}"
                    + (f", a {kind} quantised layer" if kind else "")
                    + f"; fisherlora supports nn.Linear, transformers' Conv1D and, quantised, {quant.SUPPORTED}")
            found[name] = module
    if not found:
        raise ValueError(
            f"target_modules={lora_config.target_modules!r} matches no module of {type(model).__name__}; "
            f"some module names: {[n for n, _ in list(model.named_modules())[1:8]]}"
        )
    return found


def check_no_adapters(model: nn.Module) -> None:
    """Refuse a model any of whose modules already holds PEFT tuner layers (``BaseTunerLayer``:
    LoRA and every other PEFT method) or PEFT's wrappers of modules trained in full
    (``modules_to_save``, trainable tokens), targets or not: PEFT activates one adapter at a time,
    so adding fisherlora's would switch the user's off and change the model's outputs.

    Raises:
        ValueError: naming the first such module, its adapters and its type.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:  # PEFT >= 0.15: the base of modules_to_save and trainable-token wrappers
        from peft.utils.other import AuxiliaryTrainingWrapper as Wrapper
    except ImportError:
        from peft.utils.other import ModulesToSaveWrapper as Wrapper

    held = [(n, m) for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, Wrapper))]
    if held:
        name, module = held[0]
        names = (*getattr(module, "adapter_layer_names", ()), "modules_to_save")
        adapters = sorted({a for attr in names for a in getattr(module, attr, {}) or {}})
        raise ValueError(
            f"{name!r} already carries PEFT adapters {adapters} ({type(module).__name__}; {len(held)} module(s) in "
            "all): adding fisherlora's adapter would switch them off (PEFT activates one adapter at a time). Pass "
            "the base model, not a PeftModel or a model wrapped before, or merge them first (merge_and_unload())")


def layer_groups(modules: dict[str, object], n_groups: int) -> list[dict[str, object]]:
    """Split target layers into ``n_groups`` contiguous groups of decoder layers.

    The decoder layer of a module is :func:`decoder_layer_index` (``model.layers.7.mlp.up_proj``
    -> 7); modules without one join the first group. Fewer groups come back when there are
    fewer decoder layers than ``n_groups``.
    """

    def index(name):
        where = decoder_layer_index(name)
        return -1 if where is None else where[1]

    indices = sorted({index(n) for n in modules})
    n_groups = max(1, min(n_groups, len(indices)))
    per = -(-len(indices) // n_groups)
    group_of = {idx: min(i // per, n_groups - 1) for i, idx in enumerate(indices)}
    groups = [dict() for _ in range(n_groups)]
    for name, module in modules.items():
        groups[group_of[index(name)]][name] = module
    return [g for g in groups if g]


def ranks_and_scalings(lora_config, names: list[str]) -> dict[str, tuple[int, float]]:
    """``(r, s)`` per layer as PEFT will build it (``rank_pattern``/``alpha_pattern``, rsLoRA):
    ``s = alpha / r``, or ``alpha / √r`` with ``use_rslora``."""
    from peft.utils.other import get_pattern_key

    out = {}
    for name in names:
        r = lora_config.r
        alpha = lora_config.lora_alpha
        if lora_config.rank_pattern:
            r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), r)
        if lora_config.alpha_pattern:
            alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), name), alpha)
        out[name] = (r, alpha / (r**0.5 if lora_config.use_rslora else r))
    return out


def check_ranks(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> None:
    """The one rank bound: ``r <= min(d_out, d_in)`` for every layer.

    Args:
        shapes: layer name -> ``(d_out, d_in)``. ranks: layer name -> ``r``.

    Raises:
        ValueError: naming the first layer whose rank is too large, with its shape.
    """
    for name, r in ranks.items():
        d_out, d_in = shapes[name]
        if r > min(d_out, d_in):
            raise ValueError(f"rank {r} exceeds min(d_out, d_in) = {min(d_out, d_in)} of layer {name!r} "
                             f"({d_out}x{d_in})")


#: weight dtypes fisherlora decomposes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _own_shape(module: nn.Module) -> tuple[int, int]:
    """The shape the layer's weight has when it is a plain tensor: ``(out, in)``, Conv1D ``(in, out)``."""
    if is_conv1d(module):
        return (module.nx, module.nf) if hasattr(module, "nx") else tuple(module.weight.shape)
    return (module.out_features, module.in_features)


def _weight_problem(module: nn.Module) -> str | None:
    """Why the module's weight is not a plain float ``Parameter`` of its own shape nor a supported
    quantised weight, or None."""
    if quant.is_quantised(module):
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return f"is {type(w).__name__}, not a tensor"
    what = f"a {type(w).__name__} ({str(w.dtype).removeprefix('torch.')}, shape {tuple(w.shape)})"
    if w.is_meta:
        return (f"is {what} on the meta device (a model built without its weights, e.g. under "
                "init_empty_weights): load the weights first")
    if w.numel() == 0 or (w.dim() < 2 and hasattr(w, "ds_shape")):
        return (f"is {what}, an empty or 1-D placeholder: the model is sharded (DeepSpeed ZeRO-3 partitions "
                "weights this way), which fisherlora cannot write back; load the model whole on every rank "
                "(outside deepspeed.zero.Init, before deepspeed.initialize) for the initialisation, with "
                "torchrun splitting the calibration data over the ranks, and shard it for training afterwards")
    if sharded.is_dtensor(w):  # FSDP2: gathered one layer at a time and written back as shards
        problem = sharded.placement_problem(w)
        if problem is not None:
            return f"is {what}, {problem}"
    elif type(w) is not nn.Parameter and type(w) is not torch.Tensor:
        kind = quant.unsupported_kind(module)
        return f"is {what}: " + (f"{kind} quantisation" if kind else "a quantised or wrapped weight type")
    if w.dtype not in FLOAT_DTYPES:
        return f"is {what}: not a floating-point weight"
    if tuple(w.shape) != _own_shape(module):
        return f"is {what}, not the layer's own shape {_own_shape(module)}"
    return None


def check_target_weights(modules: dict[str, nn.Module]) -> None:
    """Refuse, by kind, every target whose weight fisherlora cannot decompose and write back.

    Supported: a plain ``torch.nn.Parameter`` (or tensor) of dtype float16, bfloat16, float32 or
    float64 with the layer's own shape, the same as an FSDP2 ``DTensor`` of row shards
    (:mod:`fisherlora.sharded`), and the quantised layers of :data:`fisherlora.quant.SUPPORTED`.
    Refused, naming the layer and the weight's type, dtype and shape: other quantised weights
    (torchao tensor subclasses, GGUF weights kept quantised, any other tensor subclass), integer
    weights, meta tensors, empty or 1-D placeholders (DeepSpeed ZeRO-3) and ``DTensor`` weights
    with tensor-parallel placements. (Quantised layers that are not ``nn.Linear``, GPTQ and AWQ, are refused by
    :func:`find_target_modules`.)

    Raises:
        ValueError: for the first such target.
    """
    for name, module in modules.items():
        problem = _weight_problem(module)
        if problem is not None:
            raise ValueError(
                f"target {name!r} ({type(module).__name__}): its weight {problem}. fisherlora supports plain "
                f"float16/bfloat16/float32/float64 nn.Parameter weights of the layer's own shape and, quantised, "
                f"{quant.SUPPORTED}")


def check_not_shared(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Refuse a target whose weight shares its storage with another parameter or buffer of the
    model (tied embeddings, one ``Parameter`` assigned to two layers, views of one tensor): writing
    its residual would change the other module too. Sharing is found by storage, not by name.

    Raises:
        ValueError: naming the target and the tensors it shares with.
    """
    owners: dict[int, list[str]] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for tname, t in tensors:
        if t.numel() and not t.is_meta:
            owners.setdefault(sharded.local(t).untyped_storage().data_ptr(), []).append(tname)
    for name, module in modules.items():
        w = module.weight
        if not w.numel() or w.is_meta:
            continue
        others = [o for o in owners.get(sharded.local(w).untyped_storage().data_ptr(), []) if o != f"{name}.weight"]
        if others:
            raise ValueError(
                f"target {name!r} shares its weight with {others} (tied weights, e.g. tie_word_embeddings): "
                "writing its residual would change them too. Leave it out of target_modules, or untie the "
                "weights before initialising (give the module its own copy of the weight)")


def check_finite(model: nn.Module) -> None:
    """Refuse non-finite values in any floating-point parameter or buffer the passes read.

    Raises:
        FloatingPointError: naming the tensor (``model.embed_tokens.weight``) and its count of NaN/inf.
    """
    # a quantised weight's packed bits may be stored in a float dtype (bnb_4bit_quant_storage): not values
    packed = {id(m.weight) for m in model.modules() if quant.is_quantised(m)}
    with torch.no_grad():
        for tname, t in [*model.named_parameters(), *model.named_buffers()]:
            if sharded.is_dtensor(t):  # counted over all shards (a collective), so every rank agrees
                bad = sharded.count_nonfinite(t) if t.is_floating_point() else 0
            # all_finite: nothing of the tensor's size (an embedding's isfinite mask is the run's peak)
            elif t.is_floating_point() and id(t) not in packed and not t.is_meta and not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
            else:
                bad = 0
            if bad:
                raise FloatingPointError(f"{tname} holds {bad} non-finite value(s) (NaN or inf): the calibration "
                                         "passes would spread them into every statistic; fix the weights first")


def check_model(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Every up-front check of the model's weights, before any pass: the layout of every quantised
    layer (:func:`fisherlora.quant.check_layouts`), the targets' weight kind
    (:func:`check_target_weights`), shared storage (:func:`check_not_shared`) and non-finite
    values anywhere (:func:`check_finite`).

    Raises:
        ValueError, FloatingPointError: as those functions.
    """
    quant.check_layouts(model)
    check_target_weights(modules)
    check_not_shared(model, modules)
    check_finite(model)
