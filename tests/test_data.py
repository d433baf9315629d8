"""Calibration data: local formats through `datasets`, label masks, clear errors."""

import json

import pytest
import torch

from fisherlora.data import CalibrationData, calibration_batches, gsm8k_path, load_records, tokenize_records


class CharTokenizer:
    """A minimal tokenizer (one id per character) so data tests need no model files."""

    eos_token_id = 1
    pad_token_id = 0
    padding_side = "right"
    chat_template = None
    model_input_names = ["input_ids", "attention_mask"]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + (ord(c) % 50) for c in text]}


def test_gsm8k_is_embedded():
    recs = load_records("gsm8k", shuffle=False)
    assert len(recs) == 1319 and {"question", "answer"} <= set(recs.column_names)
    assert gsm8k_path().name == "test.jsonl"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "txt"])
def test_local_formats_load_through_datasets(tmp_path, fmt):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(5)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":  # with the byte-order mark some editors write
        path.write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    elif fmt == "csv":
        path.write_text("question,answer\n" + "\n".join(f"{r['question']},{r['answer']}" for r in rows))
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("\n".join(r["question"] for r in rows))
    recs = load_records(path, num_samples=3, seed=1, prompt_field="question", response_field="answer")
    assert len(recs) == 3
    cal = tokenize_records(recs, CharTokenizer(), max_length=16)
    assert len(cal) == 3


def test_supervised_pairs_take_the_loss_on_the_response_only():
    recs = [{"question": "abc", "answer": "xy"}]
    cal = tokenize_records(recs, CharTokenizer(), max_length=32)
    ids, lab = cal.input_ids[0], cal.labels[0]
    n_prompt = len("abc\n")
    assert lab[:n_prompt] == [-100] * n_prompt and lab[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == CharTokenizer.eos_token_id
    text = tokenize_records([{"text": "hello"}], CharTokenizer(), text_field="text")
    assert text.labels[0] == text.input_ids[0]


def test_truncation_and_batches_pad_labels_with_ignore_index():
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (the collator needs a real tokenizer)

    from tests.models import pad_batch

    cal = CalibrationData([[5, 6, 7], [8, 9]], [[-100, 6, 7], [8, 9]])
    ref = pad_batch(cal.input_ids, cal.labels)
    tok = _tiny_fast_tokenizer()
    (batch,) = list(calibration_batches(cal, tok, batch_size=2))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], ref[key]), key


def _tiny_fast_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "x": 1}, unk_token="x")))
    tok.pad_token = "<pad>"
    return tok


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_records(tmp_path / "d.xml")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json")
    with pytest.raises(ValueError, match="broken.jsonl' line 1 is not valid JSON"):
        load_records(tmp_path / "broken.jsonl")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="could not read .*broken.parquet"):
        load_records(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match="field 'prompt' not in the calibration data"):
        tokenize_records([{"question": "a", "answer": "b"}], CharTokenizer(), prompt_field="prompt")


@pytest.mark.parametrize(
    "name, content, where, what",
    [
        # a null field (after a blank line: the line number is the file's, not the record's)
        ("null.jsonl", b'{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": null}\n', "line 3", "null"),
        ("cell.csv", b"question,answer\na,b\nc,\n", "row 2", "null"),
        ("nested.jsonl", b'{"question": "a", "answer": {"x": 1}}\n', "line 1", "not text"),
        # bytes that are not UTF-8
        ("latin1.jsonl", b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "d"}\n', "line 2",
         "not UTF-8"),
        ("latin1.csv", b"question,answer\na,b\nc,caf\xe9\n", "line 3", "not UTF-8"),
        ("latin1.txt", b"one\ntwo\nthr\xffee\n", "line 3", "not UTF-8"),
        # no record at all, only line breaks or blanks
        ("newlines.jsonl", b"\n\n\n", "no records", "no records"),
        ("blank.txt", b"  \n\t\n", "no records", "no records"),
        # a line that is not one JSON object
        ("list.jsonl", b'{"question": "a", "answer": "b"}\n[1, 2]\n', "line 2", "JSON object"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else "",
)
def test_bad_records_are_refused_naming_the_file_and_row(tmp_path, name, content, where, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        recs = load_records(path, shuffle=False, prompt_field="question", response_field="answer")
        tokenize_records(recs, CharTokenizer(), max_length=16)
    message = str(info.value)
    assert str(path) in message and where in message and what in message, message
    # records built in Python name the record
    with pytest.raises(ValueError, match="record 2: field 'answer' is null"):
        tokenize_records([{"question": "a", "answer": "b"}, {"question": "c", "answer": None}], CharTokenizer())


def test_a_file_datasets_cannot_read_is_reported_once(tmp_path, capfd):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"could not read .*x\.parquet.* as parquet"):
        load_records(bad)
    assert "x.parquet" not in capfd.readouterr().err, "datasets logged the failure a second time"
