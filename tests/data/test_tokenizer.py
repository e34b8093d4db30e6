"""Tokenizer training, loading any local HF tokenizer directory, chat template, fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from myllm.data.tokenizer import CHATML_SPECIAL_TOKENS, load_tokenizer, tokenizer_fingerprint, train_tokenizer


def test_trained_tokenizer_loads_with_autotokenizer(tok_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == 512
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == list(CHATML_SPECIAL_TOKENS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.unk_token == "<|endoftext|>"
    text = "Grüße, 世界! naïve café 🙂\n\tindented  code()"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless on any Unicode
    assert 0 not in ids and 1 not in ids and 2 not in ids  # nothing added automatically


def test_chat_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ids.count(tok.eos_token_id) == 2


def test_training_is_deterministic_and_fingerprint(tmp_path, corpus_texts):
    a = train_tokenizer(corpus_texts[:300], tmp_path / "a", vocab_size=300)
    b = train_tokenizer(corpus_texts[:300], tmp_path / "b", vocab_size=300)
    c = train_tokenizer(corpus_texts[:300], tmp_path / "c", vocab_size=320)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) == tokenizer_fingerprint(tmp_path / "a")
    assert tokenizer_fingerprint(c) != tokenizer_fingerprint(a)  # the fingerprint does see a change
    a.backend_tokenizer.enable_truncation(16)  # a call option, not what the tokenizer does to text
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def test_train_from_files_and_retrain_in_place(tmp_path, small_jsonl):
    txt = tmp_path / "plain.txt"
    txt.write_text("plain text file contents for the tokenizer " * 50, encoding="utf-8")
    out = tmp_path / "tok"
    tok = train_tokenizer([Path(small_jsonl), txt], out, vocab_size=300)
    assert len(tok) == 300
    tok2 = train_tokenizer([Path(small_jsonl)], out, vocab_size=280)  # replaces the directory atomically
    assert len(tok2) == 280 and len(load_tokenizer(out)) == 280


def test_other_hf_tokenizer_directories_work(tmp_path):
    """A tokenizer directory not made by myllm (GPT-2 style, no chat template) loads everywhere."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    hf.save_pretrained(tmp_path / "other")
    tok = load_tokenizer(tmp_path / "other")
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [1, 2]
    assert tokenizer_fingerprint(tmp_path / "other").startswith("sha256:")


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    (tmp_path / "broken" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    with pytest.raises(ValueError, match="not a loadable tokenizer directory"):
        load_tokenizer(tmp_path / "broken")
    with pytest.raises(ValueError, match="expected a tokenizer"):
        load_tokenizer(42)


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["text"], tmp_path / "t", vocab_size=100)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], tmp_path / "t", vocab_size=300)
    with pytest.raises(ValueError, match="list of strings"):
        train_tokenizer("a single string", tmp_path / "t", vocab_size=300)
    with pytest.raises(FileNotFoundError):
        train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "t", vocab_size=300)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.bin").write_text("x")
    with pytest.raises(ValueError, match="holds more than a tokenizer"):
        train_tokenizer(["text " * 10], tmp_path / "busy", vocab_size=300)
    assert (tmp_path / "busy" / "data.bin").exists()


def test_cli_train_and_info(tmp_path, small_jsonl, capsys):
    from myllm.cli import main

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(small_jsonl), "-o", str(out), "--vocab-size", "300"]) == 0
    assert "vocab 300" in capsys.readouterr().out
    assert main(["tokenizer", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["eos_token_id"] == 2 and info["chat_template"] and info["fingerprint"] == tokenizer_fingerprint(out)
    assert main(["tokenizer", "info", str(tmp_path)]) == 2
    assert "not a tokenizer directory" in capsys.readouterr().err
