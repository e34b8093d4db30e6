"""Perplexity and bits-per-byte: float64 references, HF's sliding-window loop, windows, bytes and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import tiny_hf_model, tiny_myllm

from myllm.eval import JsonlTexts, perplexity, window_bounds
from myllm.eval.perplexity import token_bytes


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def model64(lm_model):
    return copy.deepcopy(lm_model).double()


def reference_nll(model64, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Per scored token, one float64 forward over exactly its context, with window placement derived from the
    definition: token ``i`` belongs to the first window ``[k * stride, k * stride + max_length)`` that contains
    it, and is scored when it is not that window's first token."""
    total, count = 0.0, 0
    for i in range(1, len(ids)):
        begin = max(0, -(-(i - max_length + 1) // stride)) * stride  # first k with k*stride + max_length > i
        if i == begin:
            continue
        x = torch.tensor([ids[begin : i + 1]])
        with torch.no_grad():
            logp = torch.log_softmax(model64(x).logits[0, -2], -1)
        total -= logp[ids[i]].item()
        count += 1
    return total, count


# ------------------------------------------------------------------------------------- references
def test_short_documents_match_float64_reference(lm_model, model64, lm_tokenizer, lm_texts):
    texts = [t for t in lm_texts if len(encode(lm_tokenizer, t)) <= 128][:6]
    assert len(texts) == 6
    res = perplexity(lm_model, lm_tokenizer, texts, max_length=128, batch_size=3)
    ref_sum, ref_n = 0.0, 0
    for t in texts:
        ids = encode(lm_tokenizer, t)
        assert len(ids) <= 128  # every document fits one window
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model64(x).logits[0, :-1], -1)
        ref_sum -= logp.gather(-1, x[0, 1:, None]).sum().item()
        ref_n += len(ids) - 1
    assert res["tokens"] == ref_n and res["windows"] == len(texts)
    assert math.isclose(res["nll_sum"], ref_sum, rel_tol=1e-5)
    assert math.isclose(res["ppl"], math.exp(ref_sum / ref_n), rel_tol=1e-5)
    # non-vacuity: a model with other weights gets another perplexity
    other = perplexity(tiny_myllm(seed=7, vocab_size=len(lm_tokenizer)), lm_tokenizer, texts, max_length=128)
    assert abs(other["nll"] - res["nll"]) > 1e-3


@pytest.mark.parametrize("stride", [5, 12, 16])
def test_long_document_sliding_windows_match_per_token_reference(lm_model, model64, lm_tokenizer, lm_texts, stride):
    text = " ".join(lm_texts[:3])
    ids = encode(lm_tokenizer, text)[:90]
    text = lm_tokenizer.decode(ids)
    ids = encode(lm_tokenizer, text)
    res = perplexity(lm_model, lm_tokenizer, [text], max_length=16, stride=stride, batch_size=4)
    ref_sum, ref_n = reference_nll(model64, ids, 16, stride)
    assert res["tokens"] == ref_n
    assert math.isclose(res["nll_sum"], ref_sum, rel_tol=1e-5)
    if stride < 16:
        assert ref_n == len(ids) - 1  # overlapping windows score every token but the first
    else:
        assert ref_n == len(ids) - 1 - (res["windows"] - 1)  # disjoint windows: their first tokens are context


def hf_guide_loop(model, input_ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int, int]:
    """transformers' documented procedure ("Perplexity of fixed-length models"), written as the guide does:
    labels are the inputs with context positions set to -100, and ``model(..., labels=...)`` returns the mean
    NLL over the scored targets. Returns (NLL summed with the true target counts, true count, the guide's count
    ``num_valid_tokens - batch_size``)."""
    seq_len = input_ids.size(1)
    nll_sum, n_true, n_guide, prev_end = 0.0, 0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        ids = input_ids[:, begin:end]
        target = ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=target).loss
        scored = int((target[:, 1:] != -100).sum())  # the targets the shifted loss averages over
        if scored:  # a last window of one token scores nothing (the guide's loop would add NaN * 0 here)
            nll_sum += loss.item() * scored
        n_true += scored
        n_guide += int((target != -100).sum()) - target.size(0)
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_true, n_guide


@pytest.mark.parametrize("arch", ["myllm", "llama"])
@pytest.mark.parametrize("stride", [8, 24])
def test_matches_hf_guide_sliding_window_loop(lm_model, lm_tokenizer, lm_texts, arch, stride):
    model = lm_model if arch == "myllm" else tiny_hf_model("llama", vocab_size=len(lm_tokenizer))
    text = "\n\n".join(lm_texts[:4])  # the guide joins the test set into one sequence
    text = lm_tokenizer.decode(encode(lm_tokenizer, text)[:200])
    ids = torch.tensor([encode(lm_tokenizer, text)])
    res = perplexity(model, lm_tokenizer, [text], max_length=24, stride=stride, batch_size=8)
    nll_sum, n_true, n_guide = hf_guide_loop(model, ids, 24, stride)
    assert res["tokens"] == n_true
    assert math.isclose(res["nll_sum"], nll_sum, rel_tol=1e-5)
    # The guide weights each window's mean by (valid labels - 1): exact for disjoint windows; for overlapping
    # ones a later window's first target has context, so it under-counts by one per later window.
    assert n_guide == n_true - (0 if stride == 24 else res["windows"] - 1)


def test_batch_size_and_chunking_do_not_change_the_result(lm_model, lm_tokenizer, lm_texts):
    texts = lm_texts[:8]  # mixed lengths: batches are right-padded
    one = perplexity(lm_model, lm_tokenizer, texts, max_length=32, stride=16, batch_size=1)
    five = perplexity(lm_model, lm_tokenizer, iter(texts), max_length=32, stride=16, batch_size=5)
    assert one["tokens"] == five["tokens"] and one["bytes"] == five["bytes"] and one["windows"] == five["windows"]
    assert math.isclose(one["nll_sum"], five["nll_sum"], rel_tol=1e-6)


def test_hf_model_with_padding_batches(lm_tokenizer, lm_texts):
    model = tiny_hf_model("qwen2", vocab_size=len(lm_tokenizer))
    a = perplexity(model, lm_tokenizer, lm_texts[:8], max_length=40, batch_size=1)
    b = perplexity(model, lm_tokenizer, lm_texts[:8], max_length=40, batch_size=8)
    assert math.isclose(a["nll_sum"], b["nll_sum"], rel_tol=1e-6)


# ------------------------------------------------------------------------------------------ bytes
def test_bits_per_byte_counts_the_scored_text(lm_model, lm_tokenizer, lm_texts):
    short = [t for t in lm_texts if len(encode(lm_tokenizer, t)) <= 128]
    texts = [short[0], "Grüße, 世界! naïve café 🙂", short[1]]
    with_bos = perplexity(lm_model, lm_tokenizer, texts, max_length=128, add_bos=True)
    assert with_bos["bytes"] == sum(len(t.encode("utf-8")) for t in texts)  # every token scored
    assert with_bos["tokens"] == sum(len(encode(lm_tokenizer, t)) for t in texts)
    assert math.isclose(with_bos["bits_per_byte"], with_bos["nll_sum"] / (math.log(2) * with_bos["bytes"]))
    plain = perplexity(lm_model, lm_tokenizer, texts, max_length=128)
    first = [
        token_bytes(t, lm_tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])[0]
        for t in texts
    ]
    assert plain["tokens"] == with_bos["tokens"] - len(texts)
    assert plain["bytes"] == with_bos["bytes"] - sum(first)  # the first token of a document is context only
    assert first[0] == len(lm_tokenizer.decode(encode(lm_tokenizer, texts[0])[:1]).encode())
    # add_eos scores one more token per document, which owns no bytes
    eos = perplexity(lm_model, lm_tokenizer, texts, max_length=128, add_eos=True)
    assert eos["tokens"] == plain["tokens"] + len(texts) and eos["bytes"] == plain["bytes"]


def test_token_bytes_of_first_token_ascii(lm_tokenizer):
    text = "Return the number of items."
    enc = lm_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owned = token_bytes(text, enc["offset_mapping"])
    pieces = [lm_tokenizer.decode([i]) for i in enc["input_ids"]]
    assert owned.tolist() == [len(p.encode()) for p in pieces]


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=0, max_size=60))
def test_token_bytes_sum_to_the_document_size(lm_tokenizer, text):
    enc = lm_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owned = token_bytes(text, enc["offset_mapping"])
    assert owned.shape == (len(enc["input_ids"]),) and (owned >= 0).all()
    if enc["input_ids"]:
        assert int(owned.sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------- windows
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 80), st.integers(2, 20), st.data())
def test_window_bounds_score_each_token_once(n, max_length, data):
    stride = data.draw(st.integers(1, max_length))
    wins = window_bounds(n, max_length, stride)
    scored = np.zeros(max(n, 1), dtype=int)
    for begin, end, first in wins:
        assert 0 <= begin < first < end <= n and end - begin <= max_length
        scored[first:end] += 1
    assert (scored <= 1).all() and scored[0] == 0
    if n < 2:
        assert wins == []
    elif stride < max_length:
        assert scored[1:n].all()
    else:  # disjoint: window starts are context only
        assert sorted(set(range(1, n)) - set(np.flatnonzero(scored))) == list(range(stride, n, stride))


def test_edge_cases_short_empty_and_bad_sizes(lm_model, lm_tokenizer):
    one_token = lm_tokenizer.decode(encode(lm_tokenizer, "the")[:1])
    res = perplexity(lm_model, lm_tokenizer, ["", one_token, "a short one"], max_length=64)
    assert res["skipped_documents"] == 2 and res["documents"] == 1
    assert res["tokens"] == len(encode(lm_tokenizer, "a short one")) - 1
    with pytest.raises(ValueError, match="no tokens to score"):
        perplexity(lm_model, lm_tokenizer, ["", ""], max_length=64)
    with pytest.raises(ValueError, match="stride"):
        perplexity(lm_model, lm_tokenizer, ["x y"], max_length=8, stride=9)
    with pytest.raises(ValueError, match="max_length"):
        perplexity(lm_model, lm_tokenizer, ["x y"], max_length=1)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(lm_model, lm_tokenizer, ["x y"], max_length=8, batch_size=0)


def test_mismatched_tokenizer_is_refused(lm_tokenizer):
    small = tiny_myllm(vocab_size=128)
    with pytest.raises(ValueError, match="does not match the model"):
        perplexity(small, lm_tokenizer, ["some text"], max_length=16)


def test_training_mode_is_restored(lm_tokenizer):
    model = tiny_myllm(vocab_size=len(lm_tokenizer)).train()
    perplexity(model, lm_tokenizer, ["some text here"], max_length=16)
    assert model.training


# ------------------------------------------------------------------------------------------ JSONL
def test_jsonl_texts(tmp_path, lm_heldout):
    texts = JsonlTexts(lm_heldout)
    assert len(texts) == 13 and list(texts)[10] == "" and len(list(texts)) == 13  # blank line skipped
    assert list(JsonlTexts(lm_heldout, limit=3)) == list(texts)[:3]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        JsonlTexts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' is int"):
        JsonlTexts(bad)
    with pytest.raises(ValueError, match=r":1: no 'body' field"):
        JsonlTexts(lm_heldout, field="body")
    with pytest.raises(FileNotFoundError):
        JsonlTexts(tmp_path / "missing.jsonl")
