"""The adapter on the model and on disk: PEFT wrapping with the factors and residual weights
written (the model restored if anything fails), loading a saved initialisation back onto the
ORIGINAL base, and the residual model for plain-PEFT users.

The residual ``W_res = W − s·B0 A0`` is rebuilt from the ORIGINAL base and the initial adapter
by :func:`load`, so no residual model has to be written. After training, PEFT converts the
trained adapter to a plain LoRA on the original base with
``peft_model.save_pretrained(dir, path_initial_model_for_weight_conversion=out)``
(the saved config has ``init_lora_weights=True`` as that mechanism requires).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from fisherlora import digest, quant, sharded
from fisherlora.decompose import LayerInit, residual_weight
from fisherlora.fingerprint import fingerprints_match, module_fingerprint
from fisherlora.layers import (
    check_model,
    find_target_modules,
    unwrap_model,
    weight_storage,
    weight_view,
    write_weight,
)
from fisherlora.outdir import MARKER_FILE
from fisherlora.snapshot import keeps_global_rng, restore_on_error

__all__ = ["lora_layers", "is_causal_lm", "wrap_and_write", "residual_refusal", "residual_refusal_for",
           "save_residual_model", "save_plain_model", "load", "LINEAGE_TAG", "initial_adapter_id", "mark_lineage",
           "recorded_lineage", "check_lineage"]

#: the model-card tag that carries the initial adapter's id (``fisherlora-init-<id>``) through
#: PEFT's ``save_pretrained`` and the trainers' saving (docs/DESIGN.md §9)
LINEAGE_TAG = "fisherlora-init-"


def lora_layers(peft_model, adapter_name: str = "default"):
    """``(name in the base model, LoRA layer)`` for every adapted layer."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def is_causal_lm(model: nn.Module) -> bool:
    """True for a ``transformers`` causal LM class (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def wrap_and_write(model: nn.Module, lora_config, inits: dict[str, LayerInit], errors: dict | None = None):
    """Wrap with PEFT and write B, A and the residual weights (model restored on error).

    A quantised layer's residual is requantised (docs/DESIGN.md §8); for each such layer
    ``errors`` (if given) receives ``{"requant_error", "quant_error"}``
    (:func:`fisherlora.quant.requantisation_error`, :func:`fisherlora.quant.quantisation_error`)."""
    import copy

    import peft

    cfg = copy.deepcopy(lora_config)
    cfg.init_lora_weights = True  # cheap (B = 0) and what PEFT's conversion to plain LoRA expects
    if cfg.task_type is None and is_causal_lm(model):
        cfg.task_type = "CAUSAL_LM"  # a PeftModelForCausalLM, here and when PEFT loads the saved adapter
    with restore_on_error(model) as state:
        peft_model = peft.get_peft_model(model, cfg)
        layers = dict(lora_layers(peft_model))
        missing = set(inits) - set(layers)
        if missing:
            raise RuntimeError(f"PEFT did not adapt {sorted(missing)[:5]}; fisherlora and PEFT disagree on targets")
        with torch.no_grad():
            for name, init in inits.items():
                layer = layers[name]
                if abs(layer.scaling["default"] - init.scaling) > 1e-6 * init.scaling:
                    raise RuntimeError(f"{name}: PEFT scaling {layer.scaling['default']} != expected {init.scaling}")
                layer.lora_A["default"].weight.copy_(init.A)
                layer.lora_B["default"].weight.copy_(init.B)
            for name, init in inits.items():  # residuals last; each original is stashed first
                layer = layers[name]
                base = layer.get_base_layer()
                # from the factors as the adapter stores them (its dtype), so W_res + s·BA = W exactly
                W = weight_view(base)  # a quantised layer's: dequantised, one layer at a time
                W_res = residual_weight(W, layer.lora_B["default"].weight, layer.lora_A["default"].weight,
                                        init.scaling)
                measure = errors is not None and quant.is_quantised(base)
                if measure:
                    norm, quant_error = float(W.norm()), quant.quantisation_error(base, W)
                del W
                for t in weight_storage(base):
                    state.stash(t)
                write_weight(base, W_res)
                if measure:
                    errors[name] = {"requant_error": quant.requantisation_error(base, W_res, norm),
                                    "quant_error": quant_error}
                del W_res
        sharded.shard_adapters(peft_model)  # an FSDP2 base: the factors sharded like it (§7)
    if not sharded.model_is_sharded(model):  # a sharded adapter's id would need a gather: left untagged
        from peft.utils import get_peft_model_state_dict

        # the tensors result.save writes (save_embedding_layers=False), so the id of the file is this one
        mark_lineage(peft_model, digest.state_digest(get_peft_model_state_dict(peft_model,
                                                                               save_embedding_layers=False)))
    return peft_model


def initial_adapter_id(init_dir) -> str:
    """The id of the initial adapter saved in ``init_dir``: :func:`fisherlora.digest.state_digest`
    of its tensors as PEFT saved them (the same id :func:`wrap_and_write` gives it in memory)."""
    from peft.utils import load_peft_weights

    return digest.state_digest(load_peft_weights(str(init_dir), device="cpu"))


def mark_lineage(peft_model, init_id: str) -> None:
    """Tag ``peft_model``'s base model with ``fisherlora-init-<init_id>`` (replacing any earlier
    such tag) in ``model_tags``, which PEFT's ``save_pretrained`` writes into the saved adapter's
    README.md, as ``transformers``' Trainer and TRL keep them: an adapter trained from this model
    and saved by them names its initialisation."""
    base = peft_model.get_base_model()
    tags = [t for t in (getattr(base, "model_tags", None) or []) if not str(t).startswith(LINEAGE_TAG)]
    base.model_tags = [*tags, LINEAGE_TAG + init_id]


def recorded_lineage(adapter_dir) -> list[str] | None:
    """The initial-adapter ids that the model card (README.md) of ``adapter_dir`` records in its
    tags, or None without a card or without such a tag."""
    readme = Path(adapter_dir) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        tags = ModelCard.load(readme).data.tags or []
    except Exception:  # noqa: BLE001 (a card that cannot be read records nothing)
        return None
    ids = [t[len(LINEAGE_TAG):] for t in tags if isinstance(t, str) and t.startswith(LINEAGE_TAG)]
    return ids or None


def check_lineage(init_dir, adapter_dir, init_id: str | None = None) -> None:
    """Refuse a trained adapter whose model card names another initialisation than ``init_dir``.

    Raises:
        ValueError: naming both directories and both ids. Warns (``UserWarning``) when the card
            records no initialisation (a card lost or rewritten, an adapter trained without
            fisherlora's tag): the lineage cannot be checked then.
    """
    init_id = init_id or initial_adapter_id(init_dir)
    theirs = recorded_lineage(adapter_dir)
    if theirs is None:
        warnings.warn(f"cannot tell which initialisation the adapter {str(adapter_dir)!r} was trained from: its "
                      f"README.md records no '{LINEAGE_TAG}<id>' tag (PEFT's save_pretrained writes it for a model "
                      f"that fisherlora initialised or loaded). If it was trained from another initialisation "
                      f"than {str(init_dir)!r}, the result is wrong", UserWarning, stacklevel=3)
    elif init_id not in theirs:
        raise ValueError(f"the adapter {str(adapter_dir)!r} does not match this initialisation {str(init_dir)!r}: it "
                         f"was trained from another initialisation (its model card records {LINEAGE_TAG}{theirs[0]}, "
                         f"the initial adapter in {str(init_dir)!r} is {LINEAGE_TAG}{init_id}). The residual "
                         "W - s*B0*A0 must be that of the initialisation it was trained from: pass that one")


def residual_refusal(*, quantised: str | None = None, sharded_model: bool = False) -> str | None:
    """Why the residual base cannot be saved as a model folder (``residual=True``,
    ``--save-residual``), or None. One rule for :meth:`FisherLoraResult.save` (facts from the
    model) and for ``fisherlora init`` (facts from its flags, before any work).

    Args:
        quantised: the name of a bitsandbytes-quantised layer of the model (or the flag that
            will quantise its layers): a target's residual lives requantised in the layer, and
            :func:`save_plain_model` rebuilds only float layers.
        sharded_model: the model is sharded with FSDP2 (saving would gather it whole on rank 0).
    """
    if quantised:
        return (f"residual=True (--save-residual) with a bitsandbytes-quantised base ({quantised}): the residual is "
                "requantised inside the quantised layers and cannot be saved as a plain model folder. Save without "
                "it: fisherlora.load(base, out_dir) rebuilds the same requantised residual bit for bit on the "
                "same quantised base")
    if sharded_model:
        return ("residual=True (--save-residual) would gather the whole sharded model on rank 0; save the residual "
                "with the model's own sharded checkpointing (torch.distributed.checkpoint) instead")
    return None


def residual_refusal_for(model: nn.Module) -> str | None:
    """:func:`residual_refusal` for ``model`` (a PEFT model or a bare one)."""
    quantised = next((n for n, m in model.named_modules() if quant.is_quantised(m)), None)
    return residual_refusal(quantised=quantised, sharded_model=sharded.model_is_sharded(model))


def save_residual_model(peft_model, path: Path, tokenizer=None) -> None:
    """Save the residual base model (base weights ``W_res``, no LoRA) as a ``transformers`` folder.

    The model is rebuilt from its config without ``quantization_config`` (``save_pretrained``
    refuses GGUF-loaded models) and given the residual state dict.
    """
    save_plain_model(peft_model.get_base_model(), path, tokenizer=tokenizer)


def save_plain_model(base: nn.Module, path: Path, tokenizer=None) -> None:
    """Save ``base`` (LoRA layers skipped: their base layers' weights are saved) as a plain
    ``transformers`` folder, also when it was loaded from a GGUF file (see :func:`save_residual_model`)."""
    from fisherlora.models import plain_config

    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:  # the adapter's own weights
            continue
        # a wrapped layer's base, and a module PEFT trains in full (modules_to_save): its original
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    with torch.device("meta"):
        clean = type(base)(plain_config(base.config))
    clean.load_state_dict(state, assign=True, strict=False)
    clean.tie_weights()
    clean.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


@keeps_global_rng
def load(base_model: nn.Module, out_dir, *, adapter=None, is_trainable: bool = False):
    """Re-apply a saved initialisation to the ORIGINAL base model.

    The residual ``W_res = W − s·B0 A0`` is rebuilt from the initial adapter in ``out_dir``; then
    the adapter's weights are the trained ones from ``adapter`` (a PEFT adapter directory
    trained from this initialisation) if given, else the initial ones.

    Args:
        base_model: the model the initialisation was computed from, unmodified.
        out_dir: a directory written by :meth:`FisherLoraResult.save` / ``fisherlora init``.
        adapter: optional trained adapter directory (same LoRA shape).
        is_trainable: ``True`` to train it: the LoRA weights require grad (everything else stays
            frozen), ready for a training loop, ``transformers``' ``Trainer`` or TRL's
            ``SFTTrainer``; ``False`` (default) gives a frozen adapter for inference, on which
            an optimizer finds no parameters.

    Returns:
        ``peft.PeftModel`` on the residual base.

    Raises:
        FileNotFoundError: ``out_dir`` is not a fisherlora output. ValueError: the base model's
            weights do not match the recorded fingerprints (a different base; checked before
            anything is written into it), a target weight fisherlora cannot handle
            (:func:`fisherlora.layers.check_model`), the trained adapter's shapes differ, or its
            model card names another initialisation (:func:`check_lineage`, naming both
            directories; a card that names none warns). The base model is left exactly as it
            was on every error.

    The returned model's base carries the ``fisherlora-init-<id>`` tag of ``out_dir`` in its
    ``model_tags``: an adapter trained from it and saved by PEFT, a Trainer or TRL records its
    initialisation in its README.md (docs/DESIGN.md §9).
    """
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    out = Path(out_dir)
    meta_path = out / MARKER_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{str(out)!r} holds no {MARKER_FILE}: not a fisherlora output directory")
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (out / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(out)!r} is an incomplete fisherlora output: {missing} missing")
    try:
        meta = json.loads(meta_path.read_text())
        kind = meta.get("kind", "initialisation")  # `fisherlora convert`/`merge` write other kinds
        recorded = meta["base_weight_fingerprints"] if kind == "initialisation" else {}
        if not isinstance(recorded, dict):
            raise TypeError("base_weight_fingerprints is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{str(meta_path)!r} is damaged ({type(exc).__name__}: {exc}): "
                         "rerun fisherlora init") from None
    if kind != "initialisation":
        raise ValueError(f"{str(out)!r} is not an initialisation but a {kind} output: load it with "
                         "PeftModel.from_pretrained (a plain LoRA) or transformers (a merged model)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {str(adapter)!r} is not a PEFT adapter directory (no adapter_config.json)")
    init_id = initial_adapter_id(out)
    if adapter is not None:  # trained from this initialisation? (its model card says, §9)
        check_lineage(out, adapter, init_id)
    base_model = unwrap_model(base_model)
    # the base is checked before PEFT writes anything into it
    modules = find_target_modules(base_model, PeftConfig.from_pretrained(str(out)))
    check_model(base_model, modules)
    unrecorded = sorted(set(modules) - set(recorded))
    if unrecorded:
        raise ValueError(f"{str(meta_path)!r} records no base-weight fingerprint for {unrecorded[:3]} "
                         f"(of {len(unrecorded)}): the base cannot be recognised; rerun fisherlora init")
    for name, fingerprint in recorded.items():
        if name not in modules:
            raise ValueError(f"layer {name!r} of the saved initialisation is not a target in this model")
        if not fingerprints_match(fingerprint, module_fingerprint(modules[name])):
            raise ValueError(f"this base model is not the one the adapter was initialised from: the weight "
                             f"of {name!r} differs (another checkpoint, or loaded in another dtype or "
                             f"quantisation? recorded: {fingerprint.get('quantisation', 'not quantised')})")
    with restore_on_error(base_model) as state:
        peft_model = PeftModel.from_pretrained(base_model, str(out), is_trainable=is_trainable)
        # the saved config names the base portably (docs/DESIGN.md §9); in memory the adapter names
        # this base as peft.get_peft_model does, so that PEFT's save_pretrained never looks the
        # portable name up on the Hub (it does for any name that is not a local model folder)
        peft_model.peft_config["default"].base_model_name_or_path = base_model.name_or_path or None
        with torch.no_grad():
            layers = dict(lora_layers(peft_model))
            trained = None
            if adapter is not None:  # read and check the trained weights before any weight is written
                trained = load_peft_weights(str(adapter), device="cpu")
                expected = {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}
                wrong = [k for k, v in trained.items() if k not in expected or expected[k] != v.shape]
                if wrong or len(trained) != len(expected):
                    raise ValueError(f"the adapter {str(adapter)!r} does not match this initialisation "
                                     f"(LoRA shapes or layers differ, e.g. {wrong[:2]})")
            for layer in layers.values():
                base = layer.get_base_layer()
                W_res = residual_weight(weight_view(base), layer.lora_B["default"].weight,
                                        layer.lora_A["default"].weight, layer.scaling["default"])
                for t in weight_storage(base):
                    state.stash(t)
                write_weight(base, W_res)  # a quantised base: requantised as init did, bit for bit (§8)
                del W_res
            if trained is not None:
                set_peft_model_state_dict(peft_model, trained)
        sharded.shard_adapters(peft_model)  # an FSDP2 base: the factors sharded like it (§7)
    mark_lineage(peft_model, init_id)  # what is trained from here and saved names this initialisation
    return peft_model
