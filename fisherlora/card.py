"""What travels with an output directory: the portable names written in place of this machine's
paths, a stable ``adapter_config.json``, and the model card ``README.md`` (how the adapter was
made, how to load, train, convert and merge it). docs/DESIGN.md §9.

**Portable names** (:func:`portable_name`), the one rule for every file fisherlora writes that
names a model or a data set (``adapter_config.json``'s ``base_model_name_or_path``,
``fisherlora.json``, ``report.json``/``report.md``, the model card):

- the embedded model (its name ``smollm2-135m`` or the path of its GGUF file) is ``smollm2-135m``,
  the name :func:`fisherlora.data.load_model_and_tokenizer` takes, and the embedded data ``gsm8k``;
- a local path (absolute or relative, existing or not) is its last component: the folder's or the
  file's name (``/data/models/my-llama/`` -> ``my-llama``), which the receiver resolves locally;
- anything else (a hub id such as ``org/name``) is kept as given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["portable_name", "finish_adapter_config", "base_loading_code", "model_card", "plain_lora_card"]


def _embedded_gguf() -> Path | None:
    from fisherlora.models import embedded_model_path

    try:
        return embedded_model_path().resolve()
    except (FileNotFoundError, ImportError, ModuleNotFoundError):
        return None


def portable_name(source) -> str | None:
    """The name of a model or data source that holds no path of this machine (module docstring).

    Args:
        source: a name, a path (``str`` or ``os.PathLike``) or ``None``.

    Returns:
        ``None`` for ``None`` or an empty name, else the portable name (a ``str``).
    """
    from fisherlora.models import EMBEDDED_MODEL

    if source is None or not str(source).strip():
        return None
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    if text in (EMBEDDED_MODEL, "gsm8k"):
        return text
    path = Path(text).expanduser()
    if path.exists():
        embedded = _embedded_gguf()
        if embedded is not None and path.resolve() == embedded:
            return EMBEDDED_MODEL
        return path.resolve().name
    trimmed = text.rstrip("/\\")
    if path.is_absolute() or text.startswith((".", "~")) or trimmed.count("/") > 1 or "\\" in trimmed:
        return Path(trimmed).name or text  # a path that does not exist (here)
    return text  # a name, or a hub id ``org/name``


def finish_adapter_config(folder, base_model: str | None) -> dict:
    """Rewrite ``folder/adapter_config.json`` so that it travels: ``base_model_name_or_path`` set
    to ``base_model`` (a portable name), ``target_modules`` sorted when it is a list (PEFT saves a
    set, in no fixed order). Returns the config written."""
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = dict(sorted(cfg[key].items()))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def base_loading_code(model: str | None, dtype: str = "float32") -> str:
    """The Python lines that load the ORIGINAL base the adapter belongs to, as ``base``: fisherlora's
    loader for the embedded model and GGUF files (de-quantised to ``dtype``), ``transformers``'
    for a folder or a hub id."""
    from fisherlora.models import EMBEDDED_MODEL

    model = model or "<the base model>"
    if model == EMBEDDED_MODEL or model.endswith(".gguf"):
        return (f'from fisherlora.data import load_model_and_tokenizer\n'
                f'base, tok = load_model_and_tokenizer("{model}", dtype=torch.{dtype})')
    return (f'from transformers import AutoModelForCausalLM\n'
            f'base = AutoModelForCausalLM.from_pretrained("{model}", dtype=torch.{dtype})')


def _rank_allocation(report: dict) -> str:
    from fisherlora.layers import layer_kind

    kinds: dict[str, set] = {}
    for e in report.get("layers", []):
        kinds.setdefault(layer_kind(e["name"]), set()).add(e["rank"])
    return ", ".join(f"{k}: r={'/'.join(map(str, sorted(v)))}" for k, v in sorted(kinds.items())) or "none"


def model_card(report: dict, base_model: str | None, data: str | None, dtype: str = "float32",
               tags: tuple[str, ...] = ()) -> str:
    """The ``README.md`` of an output directory of ``fisherlora init``, from its report dict, with
    ``tags`` added to its own (the initial adapter's lineage tag, docs/DESIGN.md §9)."""
    cfg, cal = report.get("config", {}), report.get("calibration", {})
    front = ["---", "library_name: peft", "tags:", "- fisherlora", "- lora", "- peft", *(f"- {t}" for t in tags)]
    if base_model:
        front.insert(1, f"base_model: {base_model}")
    start = cfg.get("init", "filet")
    if start == "filet":
        how = ("each target weight's singular directions were ranked by their Fisher energy (uᵀGu)(vᵀAv) on the "
               "calibration data, the top r became the LoRA factors")
        made = (f"- Fisher: {cfg.get('fisher_type')} (score `{cfg.get('score')}`, magnitude `{cfg.get('magnitude')}`, "
                f"damping {cfg.get('damping')})")
        figures = (f"- Fisher energy captured (mean over layers): {report.get('mean_energy_captured', 0):.1%}; overlap "
                   f"with PiSSA's top-r: {report.get('mean_pissa_overlap', 0):.1%} (report.md explains both)")
    else:  # a gradient start: score and magnitude do not apply, and the selection is of the gradient's spectrum
        natural = start == "natural_gradient"
        how = ("the loss gradient of each target weight, ∇W = Σ g aᵀ over the calibration data"
               + (", whitened by the damped K-FAC factors (the natural gradient (G+λI)⁻¹ ∇W (A+λI)⁻¹)" if natural
                  else "") + ", gave the LoRA factors in LoRA-GA's split (A its first r singular directions, "
               "B the next r)")
        made = f"- start: `init={start}`" + (
            f" ({cfg.get('fisher_type')} Fisher, damping {cfg.get('damping')}; 0: automatic)" if natural else "")
        figures = (f"- the {'whitened ' if natural else ''}gradient's top-r share of Σσ² (mean over layers): "
                   f"{report.get('mean_energy_captured', 0):.1%} (report.md explains it)")
    lines = front + ["---", "", "# fisherlora initial adapter", "",
        "An initial LoRA adapter made by fisherlora (the Python package `fisherlora`; FILet, arXiv 2605.01046): "
        f"{how}, "
        "and the rest stays in a residual base weight W − s·BA that `fisherlora.load` rebuilds from the original "
        "base. At step 0 the model computes what the base computes. Plain `PeftModel.from_pretrained` on the "
        "original base W would compute W + s·BA, not W (the adapter belongs to the residual base): use "
        "`fisherlora.load`, or `convert` below.",
        "", "## How it was made", "",
        f"- model: `{base_model}` ({dtype})",
        f"- data: `{data or 'calibration batches passed from Python'}`",
        f"- calibration: {cal.get('sequences', 0)} sequences, {cal.get('tokens', 0):,} tokens "
        f"({cal.get('label_tokens', 0):,} with loss)",
        made,
        f"- rank allocation: {_rank_allocation(report)}; alpha {cfg.get('alpha')}"
        f"{', rsLoRA' if cfg.get('use_rslora') else ''}; {report.get('num_layers', 0)} layers "
        f"(targets `{cfg.get('target_modules')}`)",
        figures,
        "", "## Load, train, convert", "",
        "```python", "import torch", "import fisherlora", base_loading_code(base_model, dtype),
        'model = fisherlora.load(base, "<this folder>", is_trainable=True)   # a PeftModel, LoRA weights trainable',
        "# ... train `model` with transformers' Trainer or TRL's SFTTrainer, then:",
        'model.save_pretrained("trained")', "```", "",
        "Then, on the command line:", "", "```bash",
        "fisherlora convert <this folder> trained -o plain     # a plain LoRA (rank 2r) for the ORIGINAL base",
        "fisherlora merge <this folder> --adapter trained -o merged   # a full model with the adapter merged in",
        "```", "",
        "The plain LoRA of `convert` has twice the rank: it holds the trained factors and minus the initial ones, "
        "so that on the original base W it adds exactly s·(BA − B₀A₀) and gives the trained model. "
        "Load it with `PeftModel.from_pretrained(base, \"plain\")`, no fisherlora needed.", ""]
    return "\n".join(lines)


def plain_lora_card(base_model: str | None, rank: str, source: str) -> str:
    """The ``README.md`` of a plain LoRA written by ``fisherlora convert``."""
    front = ["---", "library_name: peft", "tags:", "- fisherlora", "- lora", "- peft", "---"]
    if base_model:
        front.insert(1, f"base_model: {base_model}")
    return "\n".join(front + ["", "# plain LoRA converted from a fisherlora adapter", "",
        f"Converted by `fisherlora convert` from the trained adapter `{source}`. Rank {rank}: twice the trained "
        "adapter's, because it holds the trained factors [B, −B₀] and [A; A₀] side by side, so that on the ORIGINAL "
        "base W it adds s·(BA − B₀A₀), which is what training changed (PEFT's "
        "`path_initial_model_for_weight_conversion`, as for PiSSA).", "",
        "```python", "from peft import PeftModel", "model = PeftModel.from_pretrained(base, \"<this folder>\")",
        "```", ""])
