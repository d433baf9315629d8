"""Quantised target layers (docs/DESIGN.md §8): which quantised layers fisherlora supports, one
weight dequantised to float32, a residual requantised in place with the layer's own settings
(through bitsandbytes' own functions), and the error measures of that requantisation.

Supported: bitsandbytes ``Linear4bit`` (NF4 and FP4, with or without double quantisation, any
``bnb_4bit_quant_storage``) and ``Linear8bitLt`` with int8 weights, as ``transformers`` loads
them with a ``BitsAndBytesConfig``. Every other quantised layer kind (GPTQ, AWQ, HQQ, EETQ,
torchao tensor subclasses, GGUF weights kept quantised) is named by :func:`unsupported_kind` so
that :mod:`fisherlora.layers` refuses it up front.

This module imports nothing of the package but :mod:`fisherlora.models` (the embedded model's
name, for the command line); bitsandbytes is imported only when a model holds one of its layers
(it is then already imported).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = [
    "SUPPORTED",
    "is_quantised",
    "unsupported_kind",
    "check_layouts",
    "shape",
    "settings",
    "dequantise",
    "requantise_",
    "storage",
    "quantisation_error",
    "requantisation_error",
    "quantisation_summary",
    "planned_weight_bytes",
    "add_flags",
    "settings_from_flags",
    "bitsandbytes_config",
]

#: the quantised layer kinds fisherlora decomposes and writes back, for error messages
SUPPORTED = ("bitsandbytes Linear4bit (nf4/fp4, double quantisation, any quant_storage) and "
             "Linear8bitLt (int8 weights)")

# class-name markers of quantised layers and weights fisherlora does not handle, by kind
_UNSUPPORTED_LAYERS = {
    "QuantLinear": "GPTQ (auto-gptq / gptqmodel QuantLinear)",
    "WQLinear": "AWQ (autoawq WQLinear)",
    "HQQLinear": "HQQ",
    "EetqLinear": "EETQ",
    "QLinear": "optimum-quanto",
    "FP8Linear": "FP8 (fbgemm/finegrained fp8)",
}
_UNSUPPORTED_WEIGHTS = {
    "AffineQuantizedTensor": "torchao (AffineQuantizedTensor)",
    "LinearActivationQuantizedTensor": "torchao (LinearActivationQuantizedTensor)",
    "Float8Tensor": "torchao (Float8Tensor)",
    "GGUFParameter": "GGUF weights kept quantised (GGUFParameter)",
    "QBytesTensor": "optimum-quanto",
}


def _bnb_kind(module: nn.Module) -> str | None:
    """``"4bit"``, ``"8bit"`` or None, without importing bitsandbytes."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit) and isinstance(module.weight, bnb.nn.Params4bit):
        qs = getattr(module.weight, "quant_state", None)
        return "4bit" if qs is not None and _layout_problem(module) is None else None
    if isinstance(module, bnb.nn.Linear8bitLt) and isinstance(module.weight, bnb.nn.Int8Params):
        return "8bit" if module.weight.dtype == torch.int8 else None
    return None


def _repacked_for_cpu(module: nn.Module) -> bool:
    """bitsandbytes repacks a ``Linear4bit`` for CPU inference on its first forward in eval mode
    without gradients on a CPU with AVX512-BF16 (``packing_format_for_cpu``), rounding its scales
    to bfloat16: its original quantisation is then lost."""
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def _layout_problem(module: nn.Module) -> str | None:
    """How a ``Linear4bit``'s stored layout differs from the one bitsandbytes quantises to, or None.

    That layout: packed data of ``ceil(n/2)`` bytes for ``n = d_out·d_in`` entries; scales
    (``absmax``) 1-D, one per block of ``blocksize`` entries, float32, or with double
    quantisation uint8 with float32 nested scales. A layer repacked for CPU inference
    (``packing_format_for_cpu``), and one unpacked again by ``state_dict()`` (scales left
    bfloat16 in the repacked ``(d_in/blocksize, d_out)`` shape), hold another."""
    if _repacked_for_cpu(module):
        return ("was repacked for CPU inference (packing_format_for_cpu: bitsandbytes does this on a forward in eval "
                "mode without gradients on the CPU, and rounds the scales to bfloat16, so the model's own "
                "quantisation is lost)")
    w, qs = module.weight, module.weight.quant_state
    n = int(module.out_features) * int(module.in_features)
    blocks = -(-n // int(qs.blocksize))
    scale_dtype = torch.uint8 if qs.nested else torch.float32
    absmax = qs.absmax
    if absmax.dim() != 1 or absmax.numel() != blocks or absmax.dtype != scale_dtype:
        return (f"holds scales (absmax) of {str(absmax.dtype).removeprefix('torch.')} and shape "
                f"{tuple(absmax.shape)} where bitsandbytes quantises to {str(scale_dtype).removeprefix('torch.')} "
                f"of shape ({blocks},): a layer once repacked for CPU inference (a forward in eval mode without "
                f"gradients on an AVX512-BF16 CPU) and unpacked again by state_dict(), its scales rounded to bfloat16")
    if w.data.numel() * w.data.element_size() != -(-n // 2):
        return (f"holds {w.data.numel() * w.data.element_size()} bytes of packed data where {n} 4-bit entries "
                f"take {-(-n // 2)}")
    if qs.nested and (qs.state2 is None or qs.state2.absmax.dtype != torch.float32):
        return "holds double-quantised scales without float32 nested scales"
    return None


def is_quantised(module: nn.Module) -> bool:
    """True for a supported quantised layer (:data:`SUPPORTED`) whose weight is quantised."""
    return _bnb_kind(module) is not None


def unsupported_kind(module: nn.Module) -> str | None:
    """The kind of quantisation of a layer fisherlora cannot handle (``"GPTQ (...)"``), or None.

    Recognised by the class names of the layer and of its weight, without importing any
    quantisation library; a bitsandbytes layer that is not quantised the supported way
    (``Linear8bitLt`` with ``has_fp16_weights``, a ``Linear4bit`` not yet quantised) is one too.
    """
    if is_quantised(module):
        return None
    names = [c.__name__ for c in type(module).__mro__]
    for marker, kind in _UNSUPPORTED_LAYERS.items():
        if marker in names:
            return kind
    w = getattr(module, "weight", None)
    for c in type(w).__mro__ if w is not None else ():
        if c.__name__ in _UNSUPPORTED_WEIGHTS:
            return _UNSUPPORTED_WEIGHTS[c.__name__]
    problem = _bad_4bit_layout(module)
    if problem is not None:
        return (f"bitsandbytes Linear4bit that {problem}; reload the model and run no forward in eval mode "
                "without gradients on the CPU before fisherlora")
    if type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear):
        return f"bitsandbytes {type(module).__name__} with a {type(w).__name__} weight not quantised as supported"
    return None


def _bad_4bit_layout(module: nn.Module) -> str | None:
    """:func:`_layout_problem` of a quantised bitsandbytes ``Linear4bit``; None for any other module."""
    if "bitsandbytes" not in sys.modules or not type(module).__module__.startswith("bitsandbytes"):
        return None
    import bitsandbytes as bnb

    if not (isinstance(module, bnb.nn.Linear4bit) and isinstance(module.weight, bnb.nn.Params4bit)
            and getattr(module.weight, "quant_state", None) is not None):
        return None
    return _layout_problem(module)


def check_layouts(model: nn.Module) -> None:
    """Refuse, by kind, every quantised layer of ``model`` (a target or not: the passes read them
    all) whose stored layout is not the one its library quantises to (:func:`_layout_problem`).

    Raises:
        ValueError: naming the first such layer, what it holds and what was expected.
    """
    for name, module in model.named_modules():
        problem = _bad_4bit_layout(module)
        if problem is not None:
            raise ValueError(f"quantised layer {name!r} ({type(module).__name__}) {problem}: fisherlora would compute "
                             "and write on another quantisation than the model's; reload the model and run no "
                             "forward in eval mode without gradients on the CPU before fisherlora (it supports, "
                             f"quantised, {SUPPORTED} in the layout they quantise to)")


def shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported quantised layer, without dequantising."""
    return (module.out_features, module.in_features)


def settings(module: nn.Module) -> dict:
    """The layer's quantisation settings, JSON-ready (recorded with the base fingerprints: a
    residual is rebuilt bit-identically only under the same settings)."""
    kind = _bnb_kind(module)
    if kind == "8bit":
        return {"method": "bitsandbytes", "bits": 8, "quant_type": "int8_vectorwise"}
    qs = module.weight.quant_state
    return {"method": "bitsandbytes", "bits": 4, "quant_type": qs.quant_type, "blocksize": int(qs.blocksize),
            "double_quant": bool(qs.nested), "quant_storage": str(module.weight.dtype).removeprefix("torch."),
            "dtype": str(qs.dtype).removeprefix("torch.")}


def _scb(module: nn.Module) -> torch.Tensor:
    """The int8 layer's row scales (on the weight before the first forward, then on its state)."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def dequantise(module: nn.Module) -> torch.Tensor:
    """A new float32 ``(d_out, d_in)`` tensor: the layer's weight dequantised by bitsandbytes."""
    import bitsandbytes.functional as F

    w = module.weight
    if _bnb_kind(module) == "8bit":
        return F.int8_vectorwise_dequant(w.data, _scb(module)).to(torch.float32)
    return F.dequantize_4bit(w.data, w.quant_state).to(torch.float32)


def storage(module: nn.Module) -> list[torch.Tensor]:
    """The plain tensors that hold the quantised weight (packed data, scales, nested scales and
    offset), as byte views (a scalar as itself): what :func:`requantise_` overwrites bit for bit,
    to stash before writing. Packed bits stored in a float dtype are never converted as floats."""
    w = module.weight
    if _bnb_kind(module) == "8bit":
        out = [w.data, _scb(module)]
    else:
        qs = w.quant_state
        out = [w.data, qs.absmax] + ([qs.offset, qs.state2.absmax] if qs.nested else [])
    return [t.view(torch.uint8) if t.dim() else t for t in out]


def requantise_(module: nn.Module, W: torch.Tensor) -> None:
    """Quantise the float ``(d_out, d_in)`` matrix ``W`` with the layer's own settings and write
    it IN PLACE into the layer's existing tensors (:func:`storage`), so every alias of them (the
    int8 layer's state, PEFT's base layer) sees the new weight.

    4-bit: ``bitsandbytes.functional.quantize_4bit`` with the layer's block size, quant type,
    double quantisation and storage dtype, on ``W`` cast to the dtype the layer was quantised
    from. 8-bit: ``int8_vectorwise_quant`` of ``W`` in float16, as ``Int8Params`` quantises.
    Deterministic: the same ``W`` gives the same bits.

    Raises:
        ValueError: ``W`` is not of the layer's shape.
    """
    import bitsandbytes.functional as F

    if tuple(W.shape) != shape(module):
        raise ValueError(f"cannot requantise a {tuple(W.shape)} matrix into a {shape(module)} layer")
    w = module.weight
    with torch.no_grad():
        if _bnb_kind(module) == "8bit":
            CB, SCB, _ = F.int8_vectorwise_quant(W.detach().to(w.device, torch.float16).contiguous())
            new = [CB, SCB]
        else:
            qs = w.quant_state
            packed, nqs = F.quantize_4bit(W.detach().to(w.device, qs.dtype).contiguous(), blocksize=qs.blocksize,
                                          compress_statistics=qs.nested, quant_type=qs.quant_type,
                                          quant_storage=w.dtype)
            new = [packed, nqs.absmax] + ([nqs.offset, nqs.state2.absmax] if qs.nested else [])
        for old, value in zip(storage(module), new, strict=True):
            old.copy_(value.view(torch.uint8).reshape(old.shape) if value.dim() else value)


def _cell_widths(code: torch.Tensor) -> torch.Tensor:
    """Width of each 4-bit code's rounding cell on ``[-1, 1]`` (between midpoints to its
    neighbours), in the code's own order."""
    values, order = code.double().sort()
    mids = (values[1:] + values[:-1]) / 2
    lo = torch.cat([values.new_tensor([-1.0]), mids])
    hi = torch.cat([mids, values.new_tensor([1.0])])
    widths = torch.empty_like(values)
    widths[order] = (hi - lo).clamp_min(0)
    return widths


def quantisation_error(module: nn.Module, W_deq: torch.Tensor | None = None) -> float:
    """An estimate, from the quantised weight alone, of the plain quantisation error of the
    layer's float weight ``W``: ``‖W − deq(Q(W))‖ / ‖deq(Q(W))‖``.

    Each entry is taken to lie uniformly in its rounding cell (width ``w`` times its block's
    absmax for 4-bit; one step ``SCB/127`` of its row for 8-bit), i.e. an error variance of
    ``w²/12``. The float weights the base was quantised from are not at hand; tests check this
    estimate against them. ``W_deq`` (:func:`dequantise`) saves dequantising again.
    """
    import bitsandbytes.functional as F

    W_deq = dequantise(module) if W_deq is None else W_deq
    norm = float(W_deq.norm())
    if _bnb_kind(module) == "8bit":
        step = _scb(module).double() / 127
        return float((step.square().sum() * module.in_features / 12).sqrt()) / max(norm, 1e-30)
    w = module.weight
    qs = w.quant_state
    absmax = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if qs.nested else qs.absmax
    sq = _cell_widths(qs.code.cpu()).square()
    packed = w.data.view(torch.uint8).flatten()  # two entries a byte, blocks of blocksize entries in order
    per_block = qs.blocksize // 2
    absmax = absmax.flatten().cpu().double()
    total = 0.0
    for b0 in range(0, absmax.numel(), 4096):  # a last, partial block is summed over its bytes
        p = packed[b0 * per_block:(b0 + 4096) * per_block].cpu().long()
        cells = torch.nn.functional.pad(sq[p >> 4] + sq[p & 15], (0, (-p.numel()) % per_block))
        total += float((cells.reshape(-1, per_block).sum(1) * absmax[b0:b0 + 4096].square()).sum())
    return (total / 12) ** 0.5 / max(norm, 1e-30)


def requantisation_error(module: nn.Module, W_res: torch.Tensor, norm: float) -> float:
    """``‖deq(Q(W_res)) − W_res‖ / norm`` for the residual ``W_res`` just written into the layer
    (:func:`requantise_`); with ``W_res = deq(W) − s·BA`` and ``norm = ‖deq(W)‖`` this is the
    requantisation error ``‖deq(Q(W_res)) + s·BA − deq(W)‖ / ‖deq(W)‖`` of docs/DESIGN.md §8."""
    back = dequantise(module)
    return float(back.sub_(W_res.to(back.dtype)).norm()) / max(norm, 1e-30)


def quantisation_summary(modules: dict[str, nn.Module], errors: dict[str, dict]) -> dict:
    """The report's ``"quantisation"`` entry: the settings of the quantised targets, the note that
    outputs at step 0 are no longer exactly those of the base, and per layer the requantisation
    error beside the (estimated) plain quantisation error of ``W`` (docs/DESIGN.md §8)."""
    layers = {n: {k: float(v) for k, v in e.items()} for n, e in errors.items()}
    ratio = [e["requant_error"] / e["quant_error"] for e in layers.values() if e["quant_error"] > 0]
    return {
        "settings": sorted({json_key(settings(modules[n])) for n in errors}),
        "step0_outputs": "changed: the residual W - s*BA is requantised, so at step 0 the model computes "
                         "deq(Q(W_res)) + s*BA, not deq(W); requant_error is that change per layer",
        "max_requant_error": max(e["requant_error"] for e in layers.values()),
        "mean_requant_over_quant_error": sum(ratio) / len(ratio) if ratio else None,
        "layers": layers,
    }


def json_key(d: dict) -> str:
    """A settings dict as one sorted ``key=value`` string."""
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()))


# ----------------------------------------------------------------------------- planning and the command line
def planned_weight_bytes(d_out: int, d_in: int, settings: dict) -> int:
    """Bytes a ``(d_out, d_in)`` weight takes quantised with ``settings`` (``{"bits": 4,
    "blocksize", "double_quant"}`` or ``{"bits": 8}``): 4-bit packs two entries a byte plus one
    float32 absmax per block, or with double quantisation one byte per block plus a float32
    absmax per 256 blocks; 8-bit is one byte an entry plus a float32 scale per row."""
    n = d_out * d_in
    if settings["bits"] == 8:
        return n + 4 * d_out
    blocks = -(-n // settings.get("blocksize", 64))
    scales = blocks + 4 * -(-blocks // 256) + 4 if settings.get("double_quant") else 4 * blocks
    return -(-n // 2) + scales


def add_flags(parser) -> None:
    """``--load-in-4bit`` / ``--load-in-8bit``, ``--bnb-4bit-quant-type``, ``--bnb-4bit-double-quant``:
    load (``init``) or plan (``plan``) the base quantised by bitsandbytes (docs/DESIGN.md §8)."""
    group = parser.add_argument_group("quantised base (bitsandbytes, docs/DESIGN.md §8)")
    bits = group.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true", help="the base in 4-bit (QLoRA)")
    bits.add_argument("--load-in-8bit", action="store_true", help="the base in 8-bit (LLM.int8)")
    group.add_argument("--bnb-4bit-quant-type", choices=["nf4", "fp4"], default="nf4",
                       help="4-bit data type (default: %(default)s)")
    group.add_argument("--bnb-4bit-double-quant", action="store_true",
                       help="quantise the 4-bit block scales too (bnb_4bit_use_double_quant)")


def settings_from_flags(args) -> dict | None:
    """The settings :func:`planned_weight_bytes` reads, from :func:`add_flags`' flags; None for a float base."""
    if getattr(args, "load_in_8bit", False):
        return {"bits": 8}
    if getattr(args, "load_in_4bit", False):
        return {"bits": 4, "quant_type": args.bnb_4bit_quant_type, "blocksize": 64,
                "double_quant": args.bnb_4bit_double_quant}
    return None


def bitsandbytes_config(args, compute_dtype: torch.dtype):
    """A ``transformers.BitsAndBytesConfig`` from :func:`add_flags`' flags, or None for a float base.

    Raises:
        ValueError: a GGUF model (``args.model``: a ``.gguf`` file or the embedded model), which
            ``transformers`` cannot quantise on load (it refuses a ``quantization_config`` with a
            ``gguf_file``); checked before anything is loaded.
    """
    from fisherlora.models import EMBEDDED_MODEL

    settings = settings_from_flags(args)
    if settings is None:
        return None
    model = str(getattr(args, "model", ""))
    if model == EMBEDDED_MODEL or model.endswith(".gguf"):
        raise ValueError(f"--load-in-{settings['bits']}bit with the GGUF model {model!r}: transformers cannot quantise "
                         "a GGUF file on load (it refuses a quantization_config with a gguf_file). Save it as a "
                         "transformers folder first (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)"
                         ".save_pretrained(folder)) and pass --model folder")
    from transformers import BitsAndBytesConfig

    if settings["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings["quant_type"],
                              bnb_4bit_use_double_quant=settings["double_quant"], bnb_4bit_compute_dtype=compute_dtype)
