"""MinHash + LSH: estimates track the true Jaccard similarity, LSH parameters, streaming near-dedup."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from myllm.data.minhash import MinHashLSH, lsh_params


def _jaccard(m: MinHashLSH, a: str, b: str) -> float:
    sa, sb = set(m.shingles(a).tolist()), set(m.shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


def _edit(text: str, n: int, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(n):
        i = rng.randrange(len(words))
        words[i] = words[i][::-1] + "q"
    return " ".join(words)


def test_signature_estimates_jaccard(corpus_texts):
    m = MinHashLSH(0.8, num_perm=256)
    rng = random.Random(0)
    long = [t for t in corpus_texts if len(t) > 600][:60]
    errors = []
    for i, text in enumerate(long):
        other = _edit(text, 1 + i % 12, rng) if i % 2 else long[i - 1]
        est = float(np.mean(m.signature(text) == m.signature(other)))
        errors.append(est - _jaccard(m, text, other))
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.03 and np.abs(errors).max() < 0.15


def test_lsh_params():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        p = lambda s, r=rows, b=bands: 1 - (1 - s**r) ** b  # noqa: E731
        assert p(threshold + 0.1) > 0.5 > p(threshold - 0.25)


def test_streaming_near_dedup(corpus_texts):
    rng = random.Random(1)
    m = MinHashLSH(0.8)
    long: list[str] = []
    for t in (t for t in corpus_texts if len(t) > 500):  # docstrings far from each other (true Jaccard < 0.5)
        if all(_jaccard(m, t, u) < 0.5 for u in long):
            long.append(t)
        if len(long) == 100:
            break
    assert all(m.add_if_new(t) for t in long)  # distinct docstrings are kept
    assert sum(not m.add_if_new(_edit(t, 1, rng)) for t in long) >= 95  # one-word edits are near-duplicates
    assert sum(m.add_if_new(t[: len(t) // 3]) for t in long) >= 95  # a third of a text is not
    assert m.add_if_new("") and m.add_if_new("")  # empty texts are never duplicates of each other


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=300), st.integers(0, 2**31))
def test_identity_and_determinism(text, seed):
    a = MinHashLSH(0.8, num_perm=64, seed=seed)
    b = MinHashLSH(0.8, num_perm=64, seed=seed)
    sig = a.signature(text)
    if not text.strip():
        assert sig is None or sig.shape == (64,)
        return
    assert np.array_equal(sig, b.signature(text))
    assert a.add_if_new(text) and not a.add_if_new(text)  # a text is a near-duplicate of itself
