"""The embedded model's cache: the de-quantised SmolLM2 and its tokenizer, saved as a
``transformers`` folder per dtype on its first load from the GGUF file, with the file's own config
in a record (docs/DESIGN.md §5). :mod:`fisherlora.models` reads and writes it; a cache that cannot
be written or read is skipped, never an error."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: environment variable naming the folder of fisherlora's cache (:func:`cache_root`); ``off`` turns it off
CACHE_ENV = "FISHERLORA_CACHE"
FORMAT = 2  # bump when what a cache folder holds changes
MARK = "fisherlora-cache.json"  # written last: a folder without it is no cache


def cache_root() -> Path | None:
    """The folder fisherlora caches the de-quantised embedded model in: ``$FISHERLORA_CACHE``,
    else ``$XDG_CACHE_HOME/fisherlora``, else ``~/.cache/fisherlora``; ``None`` when
    ``FISHERLORA_CACHE`` is ``off``, ``0``, ``no``, ``false`` or empty (no cache is read or written)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    try:
        if value:
            return Path(value).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fisherlora"
    except RuntimeError as exc:  # "~user" of no user, or no home directory at all: no cache
        log.info("fisherlora: no cache folder (%s)", exc)
        return None


def identity_of(path: Path) -> list:
    """What the cache of a GGUF file is made from: the file (path, size, modification time) and the
    libraries that de-quantise, tokenise and save it (torch, transformers, gguf, tokenizers). A
    cache folder adds the dtype it was loaded as."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    stat = path.stat()
    return [FORMAT, str(path.resolve()), stat.st_size, stat.st_mtime_ns, torch.__version__,
            *(installed(name) for name in ("transformers", "gguf", "tokenizers"))]


def prefix_of(path: Path) -> tuple[Path, list] | None:
    """``(<root>/embedded/<stem>-<hash>, identity)``, every dtype's folder is the prefix plus ``-<dtype>``;
    ``None`` when the cache is off."""
    root = cache_root()
    if root is None:
        return None
    identity = identity_of(path)
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return root / "embedded" / f"{path.stem}-{key}", identity


def folder_for(path: Path, dtype: torch.dtype) -> tuple[Path, list] | None:
    """``(folder, identity)`` of the cache of ``path`` loaded as ``dtype``; ``None`` when the cache is off."""
    prefix = prefix_of(path)
    if prefix is None:
        return None
    name = str(dtype).removeprefix("torch.")
    return prefix[0].with_name(f"{prefix[0].name}-{name}"), prefix[1] + [str(dtype)]


def read_record(folder: Path, identity: list, any_dtype: bool = False) -> dict | None:
    """The record of the cache ``folder`` if it is complete and was made from ``identity`` (the
    GGUF file's, with the dtype left out when ``any_dtype``)."""
    try:
        record = json.loads((folder / MARK).read_text())
        made_from = record["identity"][:-1] if any_dtype else record["identity"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return record if made_from == identity else None


def any_folder(path: Path) -> tuple[Path, dict] | None:
    """A complete cache folder of the GGUF ``path``, of any dtype (its config and tokenizer are
    the same in every one), with its record; ``None`` when there is none."""
    prefix = prefix_of(path)
    if prefix is None or not prefix[0].parent.is_dir():
        return None
    for folder in sorted(prefix[0].parent.glob(f"{prefix[0].name}-*")):
        record = read_record(folder, prefix[1], any_dtype=True)
        if record is not None:
            return folder, record
    return None


def load(folder: Path, identity: list, path: Path, kwargs: dict, tokenizer: bool):
    """``(model, tokenizer or None)`` from the cache ``folder``, as the GGUF load gives them; ``(None, None)``
    when there is no complete cache there or it cannot be read."""
    from transformers import AutoModelForCausalLM

    record = read_record(folder, identity)
    if record is None:
        return None, None
    try:
        tok = load_tokenizer(folder, path) if tokenizer else None
        lm = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        restore_config(lm.config, record["config"])
    except Exception as exc:  # noqa: BLE001 - a damaged cache (a truncated file, another library's error) is skipped
        log.info("fisherlora: the cached embedded model in %s cannot be read (%s); loading the GGUF file", folder, exc)
        discard(folder)  # so that this load's write replaces it
        return None, None
    lm.config.name_or_path = str(path.parent)  # what the GGUF load records
    lm.name_or_path = ""  # as _as_float_model leaves it
    lm.is_quantized = False  # as the quantizer's remove_quantization_config leaves it
    return lm, tok


def load_tokenizer(folder: Path, path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tok.name_or_path = str(path.parent)  # what the GGUF load records
    return tok


def config_json(config) -> dict:
    return json.loads(config.to_json_string(use_diff=False))  # as JSON has it: id2label's keys are strings


def restore_config(config, fields: dict) -> None:
    """Set back the config fields that ``save_pretrained`` changes (``architectures``: ``None`` in a GGUF
    config), so the cached model's config is the GGUF-loaded one's."""
    now = config_json(config)
    for key, value in fields.items():
        if now.get(key) != value:
            setattr(config, key, value)


def discard(folder: Path) -> None:
    """Remove a damaged cache ``folder``: renamed away first (atomic), so no reader sees it half removed."""
    gone = folder.with_name(f".{folder.name}.{os.getpid()}-{threading.get_ident()}.damaged")
    try:
        os.rename(folder, gone)
    except OSError:
        return  # already gone (another process discarded or replaced it)
    shutil.rmtree(gone, ignore_errors=True)


def remove_abandoned(parent: Path) -> None:
    """Remove the ``.partial`` folders in ``parent`` whose writer process no longer runs (killed mid-write)."""
    for partial in parent.glob(".*.partial"):
        try:
            pid = int(partial.name.rsplit(".", 2)[-2].split("-")[0])
            os.kill(pid, 0)  # raises ProcessLookupError when no such process runs
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, OSError):  # not ours, or a process we may not signal: kept
            continue


def write(folder: Path, identity: list, lm, tok, read_config) -> None:
    """Save the just-loaded embedded model and its tokenizer as the cache ``folder``, with the GGUF
    file's own config (``read_config()``, what :func:`fisherlora.models.load_config` reads; parsed
    once more here): written beside it and renamed into place, so a reader sees a whole cache or
    none (a process that loses the race to another keeps the other's)."""
    tmp = folder.parent / f".{folder.name}.{os.getpid()}-{threading.get_ident()}.partial"
    loaded = config_json(lm.config)
    try:
        gguf_config = read_config()
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(folder.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = {"identity": identity, "config": loaded, "gguf_config": config_json(gguf_config)}
        (tmp / MARK).write_text(json.dumps(record))
        os.rename(tmp, folder)  # refused when another process's cache is already there: it is kept
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written leaves the load as it was
        log.info("fisherlora: the embedded model is not cached in %s (%s)", folder, exc)
    finally:
        restore_config(lm.config, loaded)
        shutil.rmtree(tmp, ignore_errors=True)
