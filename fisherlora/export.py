"""After training: a trained adapter exported as a plain LoRA for the ORIGINAL base (PEFT's own
conversion, made safe), or merged into a full ``transformers`` model. docs/DESIGN.md §9.

A fisherlora adapter lives on a residual base ``W_res = W − s·B₀A₀``. Training moves ``B₀, A₀`` to
``B, A``, so the trained model computes ``W_res + s·BA = W + s·(BA − B₀A₀)``. The plain LoRA of
:func:`convert` is that difference on the original ``W``: ``B' = [B | −B₀]``, ``A' = [A ; A₀]``,
rank ``2r`` and ``lora_alpha`` doubled (``√2·alpha`` with rsLoRA) so that the scaling ``s`` stays.
PEFT computes it (``save_pretrained(path_initial_model_for_weight_conversion=...)``), from a copy of
the initial adapter in a scratch folder: PEFT names the initial adapter after the path's last
component (a trailing slash gives an empty name) and rewrites that folder's ``adapter_config.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from torch import nn

from fisherlora.adapter import load, save_plain_model
from fisherlora.card import finish_adapter_config, plain_lora_card
from fisherlora.outdir import MARKER_FILE, atomic_output_dir, check_output_dir

__all__ = ["recorded_base", "check_output", "convert", "merge"]


def recorded_base(init_dir) -> tuple[str | None, str]:
    """``(model name, dtype)`` recorded in ``init_dir/fisherlora.json`` (portable names; dtype
    ``"float32"`` for outputs that predate it).

    Raises:
        FileNotFoundError: ``init_dir`` is not a fisherlora output directory.
    """
    path = Path(init_dir) / MARKER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(Path(init_dir))!r} holds no {MARKER_FILE}: not a fisherlora output directory")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} is damaged ({exc}): rerun fisherlora init") from None
    return meta.get("base_model"), meta.get("dtype") or "float32"


def check_output(out_dir, overwrite: bool, *inputs) -> None:
    """``out_dir`` may be written (:func:`fisherlora.outdir.check_output_dir`) and is none of the
    folders read (``--overwrite`` would replace the initialisation or the adapter it reads)."""
    target = check_output_dir(out_dir, overwrite=overwrite)
    for folder in inputs:
        if folder is not None and Path(folder).resolve() == target:
            raise ValueError(f"the output {str(out_dir)!r} is the folder {str(folder)!r} that is read: choose another")


def _check_convertible(init_dir: Path, adapter_dir: Path) -> dict:
    for folder in (init_dir, adapter_dir):
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_rslora") and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        raise ValueError("PEFT cannot convert an rsLoRA adapter with rank_pattern/alpha_pattern to a plain LoRA")
    return cfg


def _mark(folder: Path, kind: str, base_name, init_dir: Path, adapter_dir, **extra) -> None:
    """fisherlora's marker file in an exported folder: ``--overwrite`` may replace it, and
    :func:`fisherlora.load` names it instead of loading it as an initialisation."""
    from fisherlora import __version__

    meta = {"fisherlora_version": __version__, "kind": kind, "base_model": base_name,
            "initialisation": init_dir.name, "adapter": adapter_dir.name if adapter_dir else None, **extra}
    (folder / MARKER_FILE).write_text(json.dumps(meta, indent=1))


def convert(base_model: nn.Module, init_dir, adapter_dir, out_dir, *, overwrite: bool = False) -> Path:
    """Write the trained adapter ``adapter_dir`` (trained from the initialisation ``init_dir``) as
    a plain LoRA of rank ``2r`` for the ORIGINAL base into ``out_dir`` (module docstring).

    ``init_dir`` is only read; ``out_dir`` is written atomically (nothing is left on failure), with
    a portable ``adapter_config.json`` and a model card. ``base_model`` (the original base,
    unmodified) is wrapped in place by :func:`fisherlora.load`; use a fresh copy afterwards.

    Returns:
        ``Path(out_dir)``; load it with ``PeftModel.from_pretrained(original_base, out_dir)``.

    Raises:
        FileNotFoundError: a folder is not an adapter. FileExistsError: ``out_dir`` (checked first,
            :func:`fisherlora.outdir.check_output_dir`). ValueError: ``out_dir`` is a folder that is
            read, another base, an adapter that does not match the initialisation, rsLoRA with
            rank/alpha patterns (PEFT's limit).
    """
    init_dir, adapter_dir = Path(init_dir), Path(adapter_dir)  # Path drops a trailing slash
    check_output(out_dir, overwrite, init_dir, adapter_dir)
    trained = _check_convertible(init_dir, adapter_dir)
    base_name, _ = recorded_base(init_dir)
    model = load(base_model, init_dir, adapter=adapter_dir)
    with tempfile.TemporaryDirectory(prefix="fisherlora-convert-") as scratch, \
            atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        initial = Path(scratch) / "fisherlora_initial"  # a named copy: PEFT rewrites its config
        initial.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(init_dir / name, initial / name)
        model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(initial),
                              save_embedding_layers=False)
        cfg = finish_adapter_config(tmp, base_name)
        rank = str(cfg["r"]) + (f" (patterns {sorted(set(cfg['rank_pattern'].values()))})"
                                if cfg.get("rank_pattern") else "")
        (tmp / "README.md").write_text(plain_lora_card(base_name, rank, adapter_dir.name))
        _mark(tmp, "plain_lora", base_name, init_dir, adapter_dir, trained_rank=trained.get("r"), plain_rank=cfg["r"])
    return Path(out_dir)


def merge(base_model: nn.Module, init_dir, out_dir, *, adapter_dir=None, tokenizer=None,
          overwrite: bool = False) -> Path:
    """Write the model with the adapter merged in (``W_res + s·BA``, the trained adapter
    ``adapter_dir`` if given, else the initial one, which gives the base back) as a plain
    ``transformers`` folder ``out_dir``, written atomically, with ``tokenizer`` if given.
    ``base_model`` is consumed (wrapped and merged in place).

    Raises:
        as :func:`fisherlora.load`; FileExistsError: ``out_dir`` (checked first); ValueError:
            ``out_dir`` is a folder that is read.
    """
    check_output(out_dir, overwrite, init_dir, adapter_dir)
    model = load(base_model, Path(init_dir), adapter=None if adapter_dir is None else Path(adapter_dir))
    merged = model.merge_and_unload()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_plain_model(merged, tmp, tokenizer=tokenizer)
        _mark(tmp, "merged", recorded_base(init_dir)[0], Path(init_dir), adapter_dir and Path(adapter_dir))
    return Path(out_dir)
