"""Calibration formats as TRL users have them (messages, prompt/completion, text) from every source
(a Dataset, a save_to_disk folder, a file), through the Python API and `fisherlora init`, with the
label masks checked token by token against a character-level tokenizer."""

import json

import pytest
from datasets import Dataset, DatasetDict

from fisherlora import cli
from fisherlora.data import load_records, tokenize_records
from tests.models import save_tiny_model

#: one character per token; a turn is "<role>content|"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "six"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("chat") / "chat-model")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder, AutoTokenizer.from_pretrained(folder)


def expected(tok, pieces):
    """ids and labels of ``pieces``: (text, labelled) spans, one token per character."""
    ids, labels = [], []
    for text, labelled in pieces:
        chars = tok.convert_tokens_to_ids(list(text))
        ids += chars
        labels += chars if labelled else [-100] * len(chars)
    return ids, labels


def test_messages_are_labelled_on_the_assistant_turns_only(chat_model):
    _, tok = chat_model
    cal = tokenize_records(Dataset.from_list([{"messages": CHAT}]), tok)
    want = expected(tok, [("<system>be brief|<user>2+2?|<assistant>", False), ("4|", True),
                          ("<user>and 3+3?|<assistant>", False), ("six|", True)])
    assert (cal.input_ids[0], cal.labels[0]) == want
    # TRL's conversational prompt-completion: the completion's assistant turns only
    conv = Dataset.from_list([{"prompt": CHAT[:4], "completion": CHAT[4:]}])
    cal = tokenize_records(conv, tok)
    want = expected(tok, [("<system>be brief|<user>2+2?|<assistant>4|<user>and 3+3?|<assistant>", False),
                          ("six|", True)])
    assert (cal.input_ids[0], cal.labels[0]) == want


def test_prompt_completion_and_text_are_labelled_as_trl_does(chat_model):
    _, tok = chat_model
    rows = [{"prompt": "2+2?", "completion": "4"}]
    cal = tokenize_records(Dataset.from_list(rows), tok)  # rendered as one user and one assistant turn
    assert (cal.input_ids[0], cal.labels[0]) == expected(tok, [("<user>2+2?|<assistant>", False), ("4|", True)])
    cal = tokenize_records(Dataset.from_list([{"text": "plain words"}]), tok)
    assert cal.labels[0] == cal.input_ids[0] == expected(tok, [("plain words", True)])[0]


def test_every_source_gives_the_same_records(chat_model, tmp_path):
    _, tok = chat_model
    rows = [{"messages": CHAT[:3]}, {"messages": CHAT}, {"messages": CHAT[1:3]}]
    ds = Dataset.from_list(rows)
    ds.save_to_disk(tmp_path / "saved")
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "saved_dict")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = [tokenize_records(load_records(src, shuffle=False), tok)
           for src in (ds, tmp_path / "saved", str(tmp_path / "saved_dict"), tmp_path / "chat.jsonl")]
    assert all((g.input_ids, g.labels) == (got[0].input_ids, got[0].labels) for g in got)
    assert len(load_records(ds, num_samples=2, seed=1)) == 2


@pytest.mark.parametrize("rows, match", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
    ([{"messages": "hi"}], "not a list of turns"),
    ([{"messages": [{"role": "user", "text": "hi"}]}], "is not {'role': text, 'content': text}"),
    ([{"other": "x"}], "fisherlora reads a prompt/response pair, .messages."),
])
def test_malformed_records_are_named_before_any_work(tmp_path, rows, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=match) as info:
        load_records(path, prompt_field="question", response_field="answer")
    assert "bad.jsonl" in str(info.value) or "columns" in str(info.value)


def test_messages_need_a_chat_template(chat_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "plain"))
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        tokenize_records(Dataset.from_list([{"messages": CHAT}]), tok)


def test_init_reads_a_saved_conversational_dataset(chat_model, tmp_path):
    folder, tok = chat_model
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    Dataset.from_list(rows).save_to_disk(tmp_path / "my-chats")
    assert cli.main(["init", "--model", str(folder), "--data", str(tmp_path / "my-chats"), "-o", str(tmp_path / "out"),
                     "--rank", "2", "--max-length", "128", "--backend", "torch", "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cal = tokenize_records(Dataset.from_list(rows), tok)
    assert report["calibration"]["label_tokens"] == cal.num_label_tokens == 2 + 4 + 2
    assert report["data"] == "my-chats" and report["model"] == "chat-model"


@pytest.mark.parametrize("columns, hint", [
    (["instruction", "input", "output"], "--prompt-field instruction --response-field output"),
    (["Query", "Response"], "--prompt-field Query --response-field Response"),
    (["body", "title"], "fisherlora reads a prompt/response pair"),
])
def test_columns_that_look_like_a_pair_get_the_flags_that_read_them(tmp_path, columns, hint):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({c: "x" for c in columns}) + "\n")
    with pytest.raises(ValueError, match="field 'question' not in the calibration data") as info:
        load_records(path, prompt_field="question", response_field="answer")
    assert hint in str(info.value), str(info.value)
