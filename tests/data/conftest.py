"""Fixtures of the data tests: the stdlib corpus, a tokenizer trained on it and small shard directories.

Everything is built once per session (the corpus takes a few seconds) and only read by the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from myllm.data.corpus import build_corpus
from myllm.data.tokenize import tokenize_to_shards
from myllm.data.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import read_texts, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def corpus_texts(corpus) -> list[str]:
    return read_texts(Path(corpus.train_path))


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory, corpus_texts) -> Path:
    """600 stdlib docstrings (about 150 KB) with a few non-ASCII documents and an empty one."""
    extra = ["Grüße, 世界! naïve café — “quotes” ½ 🙂", "", "x" * 3000 + " <|im_end|> literal"]
    return write_jsonl(tmp_path_factory.mktemp("small") / "small.jsonl", corpus_texts[:600] + extra)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([Path(corpus.train_path)], out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, small_jsonl, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("shards") / "small"
    tokenize_to_shards([small_jsonl], out, tok_dir, shard_bytes=20_000, progress=False)
    return out


@pytest.fixture(scope="session")
def heldout_shard_dir(tmp_path_factory, corpus, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("shards") / "heldout"
    tokenize_to_shards([corpus.heldout_path], out, tok_dir, shard_bytes=20_000, progress=False)
    return out
