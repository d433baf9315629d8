"""The record formats of a calibration set and the sources it may come from, as TRL and
``datasets`` users already have them (docs/DESIGN.md §9).

Sources (:func:`read_dataset`, besides the files :func:`fisherlora.data.load_records` reads): a
``datasets.Dataset`` passed from Python, or a folder written by ``save_to_disk`` (read with
``datasets.load_from_disk``; of a ``DatasetDict`` its ``train`` split, or its only split).

Formats (:func:`record_format`, one rule, first match wins):

1. ``text_field`` given: plain text, the loss on every token;
2. ``prompt_field`` and ``response_field`` both columns: a supervised pair (GSM8K's
   ``question``/``answer``, the command's default), the loss on the response only;
3. a ``messages`` column: TRL's conversational format, a list of ``{"role", "content"}`` turns
   rendered with the tokenizer's chat template, the loss on the assistant turns only;
4. ``prompt`` and ``completion`` columns: TRL's prompt-completion format, a pair (strings), or
   conversational when they hold lists of turns (the loss on the completion's assistant turns);
5. a ``text`` column (a ``.txt`` file, TRL's language-modelling format): plain text.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_dataset", "record_format", "check_messages", "render_messages"]

TEXT, PAIR, MESSAGES = "text", "pair", "messages"


def read_dataset(source):
    """The ``datasets.Dataset`` that ``source`` is or names (module docstring), or ``None`` when
    it is neither a ``Dataset`` nor a folder (a file, ``"gsm8k"``).

    Raises:
        ValueError: a folder that ``load_from_disk`` cannot read, or a ``DatasetDict`` with
            several splits and none named ``train``.
    """
    from datasets import Dataset, DatasetDict

    if isinstance(source, DatasetDict):
        return _one_split(source, "the DatasetDict")
    if isinstance(source, Dataset):
        return source
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(source))
    except Exception as exc:  # FileNotFoundError and others: not a saved dataset
        raise ValueError(f"the folder {str(source)!r} is not a dataset saved with save_to_disk "
                         f"({type(exc).__name__}: {exc})") from None
    return _one_split(ds, repr(str(source))) if isinstance(ds, DatasetDict) else ds


def _one_split(dd, what: str):
    if "train" in dd:
        return dd["train"]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise ValueError(f"{what} has the splits {sorted(dd)} and none named 'train': pass one split")


def record_format(columns, prompt_field: str | None, response_field: str | None,
                  text_field: str | None) -> tuple[str, list[str]]:
    """``(format, the fields read)`` by the rule of the module docstring; ``format`` is
    ``"text"``, ``"pair"`` or ``"messages"`` (``"pair"`` fields may hold lists of turns).

    Raises:
        ValueError: nothing matches (a named field missing: the message lists the columns and
            the formats).
    """
    columns = list(columns)
    if text_field:
        if text_field not in columns:
            raise ValueError(f"field {text_field!r} not in the calibration data; its columns are {columns}")
        return TEXT, [text_field]
    if prompt_field in columns and response_field in columns:
        return PAIR, [prompt_field, response_field]
    if "messages" in columns:
        return MESSAGES, ["messages"]
    if "prompt" in columns and "completion" in columns:
        return PAIR, ["prompt", "completion"]
    if "text" in columns:
        return TEXT, ["text"]
    missing = [f for f in (prompt_field, response_field) if f and f not in columns]
    pair = likely_pair(columns)
    hint = (f"; they look like a prompt/response pair: pass --prompt-field {pair[0]} --response-field {pair[1]} "
            f"(prompt_field={pair[0]!r}, response_field={pair[1]!r} in Python)" if pair else
            " (fisherlora reads a prompt/response pair, 'messages', 'prompt'/'completion' or 'text')")
    raise ValueError(f"field {missing[0]!r} not in the calibration data; its columns are {columns}{hint}" if missing
                     else f"no calibration format matches the columns {columns}{hint}")


#: column names that common instruction data sets give the prompt and the response (Alpaca's
#: instruction/output, Dolly's instruction/response, question/answer, query/response, ...), best first
PROMPT_NAMES = ("instruction", "question", "prompt", "query", "problem", "input")
RESPONSE_NAMES = ("output", "response", "answer", "completion", "solution", "target")


def likely_pair(columns) -> tuple[str, str] | None:
    """The ``(prompt, response)`` columns among ``columns`` that look like a prompt/response pair
    (:data:`PROMPT_NAMES`, :data:`RESPONSE_NAMES`, case as in the data), or ``None``."""
    by_lower = {str(c).lower(): c for c in columns}
    prompt = next((by_lower[n] for n in PROMPT_NAMES if n in by_lower), None)
    response = next((by_lower[n] for n in RESPONSE_NAMES if n in by_lower and by_lower[n] != prompt), None)
    return (prompt, response) if prompt is not None and response is not None else None


def check_messages(values, where, need_assistant: bool = True) -> None:
    """Every value is a non-empty list of ``{"role": str, "content": str}`` with an assistant turn
    (unless not ``need_assistant``: a conversational prompt).

    Raises:
        ValueError: naming ``where(i)`` for the ``i``-th record and what is wrong.
    """
    for i, turns in enumerate(values):
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where(i)}: 'messages' is not a list of turns but {type(turns).__name__}")
        for t in turns:
            if not (isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)):
                raise ValueError(f"{where(i)}: a turn of 'messages' is not {{'role': text, 'content': text}}: {t!r}")
        if need_assistant and not any(t["role"] == "assistant" for t in turns):
            raise ValueError(f"{where(i)}: 'messages' has no assistant turn, so nothing carries a loss")


def _ids(out) -> list[int]:
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def render_messages(tokenizer, messages: list[dict], first_labelled: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the tokenizer's chat template, and labels that
    are the ids on the assistant turns from turn ``first_labelled`` on (a conversational
    prompt-completion labels its completion only; each turn's tokens as the template closes
    them, e.g. with an end-of-turn token) and -100 elsewhere.

    Turn ``i`` spans from the rendering of ``messages[:i]`` with the generation prompt to the
    rendering of ``messages[:i+1]``; each must be a prefix of the whole rendering.

    Raises:
        ValueError: the tokenizer has no chat template, or its renderings are not prefixes of one
            another (a template that rewrites earlier turns).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the 'messages' format needs a tokenizer with a chat template; this one has none")

    def render(turns, gen=False):
        if not turns:
            return []
        return _ids(tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=gen))

    ids = render(messages)
    labels = [-100] * len(ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < first_labelled:
            continue
        start, end = render(messages[:i], gen=True), render(messages[: i + 1])
        if ids[: len(start)] != start or ids[: len(end)] != end:
            raise ValueError("the chat template renders a conversation's turns differently from the whole "
                             "conversation, so the assistant turns cannot be located; pass prompt/completion pairs")
        labels[len(start): len(end)] = ids[len(start): len(end)]
    return ids, labels
