"""Shard validation before training: truncation, a stale index, changed contents, tokenizer mismatch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from myllm.cli import main
from myllm.data.shards import INDEX, PLAN, ShardError, ShardSet, token_dtype, verify_shards
from myllm.data.tokenizer import train_tokenizer
from myllm.data.windows import ShardSource


@pytest.fixture
def copy(tmp_path, shard_dir):
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    return out


def test_valid_directory_passes(copy, tok_dir):
    index = verify_shards(copy, tokenizer=tok_dir, full=True, vocab_size=512)
    assert index["n_tokens"] == ShardSet(copy).n_tokens > 0
    ShardSource(copy, 32, tokenizer=tok_dir, vocab_size=512)


def test_truncated_shard(copy):
    tokens = copy / "shard_00001.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"shard_00001\.tokens: truncated shard"):
        ShardSource(copy, 32)


def test_index_that_does_not_match_its_data(copy):
    index = json.loads((copy / INDEX).read_text())
    index["shards"][0]["n_docs"] += 1
    index["n_docs"] += 1
    (copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"shard_00000\.docs: .* the index says"):
        verify_shards(copy)
    index["shards"][0]["n_docs"] -= 1  # totals that do not add up
    (copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match="do not add up"):
        verify_shards(copy)


def test_offsets_that_do_not_match(copy):
    docs = copy / "shard_00002.docs"
    offsets = np.fromfile(docs, dtype="<i8")
    offsets[-1] -= 1
    offsets.tofile(docs)
    with pytest.raises(ShardError, match="does not match its data"):
        verify_shards(copy)


def test_changed_contents_found_by_full_check(copy):
    tokens = copy / "shard_00000.tokens"
    data = bytearray(tokens.read_bytes())
    data[10] ^= 1
    tokens.write_bytes(bytes(data))
    verify_shards(copy)  # sizes and offsets still agree: the cheap check cannot see it
    with pytest.raises(ShardError, match="contents changed"):
        verify_shards(copy, full=True)


def test_tokenizer_and_vocab_mismatch(copy, tmp_path, corpus_texts):
    other = train_tokenizer(corpus_texts[:200], tmp_path / "other", vocab_size=300)
    with pytest.raises(ShardError, match="tokenizer mismatch"):
        ShardSource(copy, 32, tokenizer=other)
    with pytest.raises(ShardError, match="does not fit a vocabulary of 300"):
        ShardSource(copy, 32, vocab_size=300)


def test_unfinished_and_not_shards(copy, tmp_path):
    (copy / INDEX).unlink()
    with pytest.raises(ShardError, match="did not finish"):
        ShardSource(copy, 32)
    (copy / PLAN).unlink()
    with pytest.raises(ShardError, match="not a shard directory"):
        ShardSource(copy, 32)
    with pytest.raises(ShardError, match="does not exist"):
        ShardSource(tmp_path / "missing", 32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / INDEX).write_text("{broken")
    with pytest.raises(ShardError, match="unreadable shard index"):
        verify_shards(tmp_path / "bad")


def test_missing_shard_file_and_cli(copy, capsys):
    (copy / "shard_00003.docs").unlink()
    assert main(["data", "verify", str(copy)]) == 2
    assert "shard_00003.docs is missing" in capsys.readouterr().err


def test_token_dtype():
    assert token_dtype(512) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    with pytest.raises(ValueError):
        token_dtype(0)


def test_read_across_shard_boundaries(shard_dir):
    shards = ShardSet(shard_dir)
    stream = np.concatenate(shards.documents())
    assert stream.size == shards.n_tokens
    starts = np.cumsum([0] + [d.size for d in shards.documents()])[:-1]
    rng = np.random.default_rng(0)
    for a in rng.integers(0, shards.n_tokens - 500, 50):
        b = int(a) + int(rng.integers(0, 500))
        assert np.array_equal(shards.read(int(a), b), stream[a:b])
        assert np.array_equal(shards.doc_starts(int(a), b), starts[(starts >= a) & (starts < b)])
    with pytest.raises(IndexError):
        shards.read(0, shards.n_tokens + 1)
