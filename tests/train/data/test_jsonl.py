"""JSONL reading: every bad input is reported with its file and line number before training."""

from __future__ import annotations

import json

import pytest

from myllm.train.data.jsonl import read_conversations, read_texts


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_reads_texts_in_order_and_skips_blank_lines(tmp_path):
    p = _write(tmp_path / "a.jsonl", [json.dumps({"text": "one"}), "", json.dumps({"text": "two", "x": 1})])
    q = _write(tmp_path / "b.jsonl", [json.dumps({"text": "three"})])
    assert read_texts([p, q]) == ["one", "two", "three"]


def test_bad_json_line_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), json.dumps({"text": "ok"}), '{"text": "oops'])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        read_texts([p])


def test_missing_field_and_wrong_type(tmp_path):
    p = _write(tmp_path / "f.jsonl", [json.dumps({"content": "x"})])
    with pytest.raises(ValueError, match=r"f\.jsonl:1: no 'text' field \(fields: content\)"):
        read_texts([p])
    q = _write(tmp_path / "g.jsonl", [json.dumps({"text": "a"}), json.dumps({"text": 3})])
    with pytest.raises(ValueError, match=r"g\.jsonl:2: field 'text' is int, not a string"):
        read_texts([q])
    r = _write(tmp_path / "h.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"h\.jsonl:1: expected a JSON object"):
        read_texts([r])


def test_missing_file_and_empty_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_texts([str(tmp_path / "nope.jsonl")])
    empty = _write(tmp_path / "e.jsonl", ["", json.dumps({"text": ""})])
    with pytest.raises(ValueError, match="empty dataset"):
        read_texts([empty])
    with pytest.raises(ValueError, match="empty dataset"):
        read_conversations([_write(tmp_path / "e2.jsonl", [""])])


def test_conversations_are_validated(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p = _write(tmp_path / "c.jsonl", [json.dumps({"conversations": good})])
    assert read_conversations([p]) == [good]
    cases = {
        "message 1 needs a string 'content'": [{"role": "user", "content": "hi"}, {"role": "assistant"}],
        "no assistant message": [{"role": "user", "content": "hi"}],
        "must be a non-empty list": [],
        "message 0 needs a string 'role'": [{"content": "x"}],
    }
    for i, (msg, conv) in enumerate(cases.items()):
        q = _write(
            tmp_path / f"bad{i}.jsonl", [json.dumps({"conversations": good}), json.dumps({"conversations": conv})]
        )
        with pytest.raises(ValueError, match=rf"bad{i}\.jsonl:2: .*{msg}"):
            read_conversations([q])
