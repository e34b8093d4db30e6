"""Packed and padded window sources, the collator, rank sharding and exact resume of the data position."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_close, max_abs_diff, tiny_hf_model

from myllm.data.source import WindowSource
from myllm.train.data import IGNORE, PackedExamples, PaddedExamples, collate

DOCS = [([5, 6, 7, 2], [5, 6, 7, 2]), ([8, 9, 2], [8, 9, 2]), ([10, 11, 12, 13, 2], [10, 11, 12, 13, 2])]


def _take(source, n):
    return list(itertools.islice(iter(source), n))


def test_sources_satisfy_the_window_source_protocol():
    assert isinstance(PackedExamples(DOCS, seq_len=4, pad_id=0), WindowSource)
    assert isinstance(PaddedExamples(DOCS, seq_len=4), WindowSource)


def test_packing_concatenates_documents_restarts_positions_and_masks_document_starts():
    src = PackedExamples(DOCS, seq_len=5, pad_id=0, shuffle=False)
    windows = _take(src, len(src))
    assert len(src) == 3 and all(len(w["input_ids"]) == 5 for w in windows)
    stream = torch.cat([w["input_ids"] for w in windows]).tolist()
    assert stream == [5, 6, 7, 2, 8, 9, 2, 10, 11, 12, 13, 2, 0, 0, 0]  # EOS-separated, padded at the end
    pos = torch.cat([w["position_ids"] for w in windows]).tolist()
    # doc starts at 0, 4, 7; window starts at 0, 5, 10; padding run at 12
    assert pos == [0, 1, 2, 3, 0, 0, 1, 0, 1, 2, 0, 1, 0, 1, 2]
    labels = torch.cat([w["labels"] for w in windows]).tolist()
    # -100 at document starts after a window's first position (position 0 is never a target: the model shifts)
    assert labels == [5, 6, 7, 2, IGNORE, 9, 2, IGNORE, 11, 12, 13, 2, IGNORE, IGNORE, IGNORE]
    assert "attention_mask" not in collate(windows, pad_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attn):
    """Logits of each document inside a packed window equal the document's logits on its own.

    (With ``use_cache=False``, as the training loop calls the model: a cache turns packed-mask detection off.)"""
    model = tiny_hf_model("llama", attn_implementation=attn, vocab_size=32)
    src = PackedExamples(DOCS, seq_len=12, pad_id=0, shuffle=False)
    batch = collate(_take(src, 1), pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for ids, _ in DOCS:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert_close(packed[offset : offset + len(ids)], alone, atol=1e-5)
            offset += len(ids)
        # non-vacuity: without restarting positions the later documents see the earlier ones
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        assert max_abs_diff(plain[4:7], model(input_ids=torch.tensor([DOCS[1][0]])).logits[0]) > 1e-3


def test_padded_batches_pad_after_batching_and_match_unpadded_logits():
    model = tiny_hf_model("qwen2", vocab_size=32)
    src = PaddedExamples(DOCS, seq_len=4, shuffle=False)
    windows = _take(src, 3)
    assert [len(w["input_ids"]) for w in windows] == [4, 3, 4]  # truncated to seq_len, not padded yet
    batch = collate(windows, pad_id=0)
    assert batch["input_ids"].shape == (3, 4)
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 0]
    assert batch["labels"][1, 3].item() == IGNORE and batch["input_ids"][1, 3].item() == 0
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        alone = model(input_ids=torch.tensor([DOCS[1][0]])).logits[0]
    assert_close(out[1, :3], alone, atol=1e-5)


def _corpus(n=23):
    return [([i + 3] * (1 + i % 4), [i + 3] * (1 + i % 4)) for i in range(n)]


def test_ranks_get_disjoint_equal_shares_and_epochs_reshuffle():
    ex = _corpus()
    shares = [PaddedExamples(ex, seq_len=8, seed=3, rank=r, world_size=2) for r in range(2)]
    firsts = [[w["input_ids"][0].item() for w in _take(s, len(s))] for s in shares]
    assert len(firsts[0]) == len(firsts[1]) == 11
    assert not set(firsts[0]) & set(firsts[1])
    one = PaddedExamples(ex, seq_len=8, seed=3)
    epochs = [w["input_ids"][0].item() for w in _take(one, 2 * len(one))]
    assert sorted(epochs[:23]) == sorted(epochs[23:]) and epochs[:23] != epochs[23:]
    again = PaddedExamples(ex, seq_len=8, seed=3)
    assert [w["input_ids"][0].item() for w in _take(again, 23)] == epochs[:23]
    with pytest.raises(ValueError, match="fewer than the 4 data-parallel ranks"):
        PaddedExamples(ex[:3], seq_len=8, world_size=4)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(0, 60), packed=st.booleans(), world=st.sampled_from([1, 2]))
def test_resume_continues_with_exactly_the_same_windows(k, packed, world):
    def make(rank):
        if packed:
            return PackedExamples(_corpus(), seq_len=5, pad_id=0, seed=7, rank=rank, world_size=world)
        return PaddedExamples(_corpus(), seq_len=5, seed=7, rank=rank, world_size=world)

    src = make(world - 1)
    it = iter(src)
    for _ in range(k):
        next(it)
    state = src.state_dict()
    expected = [next(it) for _ in range(8)]
    resumed = make(world - 1)
    resumed.load_state_dict(state)
    got = _take(resumed, 8)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_position_of_another_dataset_is_refused():
    src = PackedExamples(_corpus(), seq_len=5, pad_id=0)
    state = src.state_dict()
    with pytest.raises(ValueError, match="data or seq_len changed"):
        PackedExamples(_corpus(), seq_len=6, pad_id=0).load_state_dict(state)


def test_packing_keeps_each_examples_own_targets():
    """SFT examples keep their -100 (non-assistant) labels when packed; document starts are masked on top."""
    examples = [([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]), ([5, 6, 7], [IGNORE, 6, IGNORE])]
    (window,) = _take(PackedExamples(examples, seq_len=7, pad_id=0, shuffle=False), 1)
    assert window["labels"].tolist() == [IGNORE, IGNORE, 3, 4, IGNORE, 6, IGNORE]
    assert window["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2]
