"""A ``datasets.Dataset`` as a window source (text or input_ids column)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from data_helpers import write_jsonl

from myllm.data.hf_dataset import dataset_to_shards, source_from_dataset
from myllm.data.shards import ShardSet
from myllm.data.tokenize import tokenize_to_shards
from myllm.data.windows import ShardSource


def test_text_column_matches_the_shard_path(tmp_path, corpus_texts, tok_dir):
    texts = corpus_texts[:120]
    ds = datasets.Dataset.from_dict({"text": texts, "other": list(range(len(texts)))})
    src = source_from_dataset(ds, 32, tokenizer=tok_dir, shuffle=False, num_epochs=1)
    tokenize_to_shards([write_jsonl(tmp_path / "t.jsonl", texts)], tmp_path / "ref", tok_dir, progress=False)
    ref = ShardSource(tmp_path / "ref", 32, shuffle=False, num_epochs=1, tokenizer=tok_dir)
    got, want = list(src), list(ref)
    assert len(got) == len(want) > 10
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, want, strict=True) for k in a)


def test_input_ids_column_and_cache(tmp_path):
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 10
    ds = datasets.Dataset.from_dict({"input_ids": ids})
    out = dataset_to_shards(ds, tmp_path / "cache", eos_id=2, rows_per_shard=7)
    docs = ShardSet(out).documents()
    assert [d.tolist() for d in docs] == [x + [2] for x in ids]
    mtime = (out / "index.json").stat().st_mtime_ns
    dataset_to_shards(ds, tmp_path / "cache", eos_id=2, rows_per_shard=7)  # same dataset: reused
    assert (out / "index.json").stat().st_mtime_ns == mtime
    src = source_from_dataset(ds, 8, eos_id=2, cache_dir=tmp_path / "cache2", seed=1)
    window = next(iter(src))
    assert window["input_ids"].shape == (8,) and set(window) == {"input_ids", "labels", "position_ids"}
    assert np.isin(window["input_ids"].numpy(), [2, *range(5, 14)]).all()


def test_temporary_shards_live_with_the_source(tok_dir):
    ds = datasets.Dataset.from_dict({"text": ["some text to read " * 20] * 5})
    src = source_from_dataset(ds, 16, tokenizer=tok_dir)
    root = src.stores[0].root
    assert root.is_dir()
    del src
    import gc

    gc.collect()
    assert not root.exists()


def test_errors(tmp_path, tok_dir):
    ds = datasets.Dataset.from_dict({"text": ["a b c"]})
    with pytest.raises(ValueError, match="pass the tokenizer"):
        source_from_dataset(ds, 4)
    with pytest.raises(ValueError, match="no 'body' column"):
        source_from_dataset(ds, 4, tokenizer=tok_dir, column="body")
    with pytest.raises(ValueError, match="no eos id"):
        source_from_dataset(datasets.Dataset.from_dict({"input_ids": [[1, 2]]}), 2)
    with pytest.raises(ValueError, match="expected a datasets.Dataset"):
        source_from_dataset([{"text": "x"}], 4, tokenizer=tok_dir)
