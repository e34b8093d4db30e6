"""Near-duplicate detection: MinHash signatures and a banded LSH index, in numpy.

Shingles are character ``n``-grams of the lower-cased, whitespace-collapsed text (language-agnostic: works
for text without spaces, e.g. Chinese), hashed with a vectorised polynomial hash. A signature holds
``num_perm`` minima (one hash per shingle, see :meth:`MinHashLSH.signature`); the share of equal entries of
two signatures estimates the Jaccard similarity of their shingle sets. The index splits signatures into
``bands`` of ``rows`` and keeps one hash table per band; two documents become candidates when a band agrees,
and a candidate is confirmed by its estimated Jaccard.

Memory: the index stores the signatures of kept documents (``4 * num_perm`` bytes each) and one table entry
per band (about 100 bytes each in Python dicts): about 2 KB per kept document with the defaults; never text.
"""

from __future__ import annotations

import re

import numpy as np

_WS = re.compile(r"\s+")
_P = np.uint64(0x100000001B3)  # FNV prime as the polynomial base
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_EMPTY = np.uint64(1 << 32)  # larger than any 32-bit value: marks an empty bin


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the weighted false-positive and
    false-negative probability mass around ``threshold`` (candidate probability ``1 - (1 - s**rows)**bands``)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1), got {threshold}")
    s = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - s**rows) ** bands
            fp = np.where(s < threshold, p, 0.0).mean()  # grid means ~ integrals over [0, 1]
            fn = np.where(s >= threshold, 1.0 - p, 0.0).mean()
            cost = fp_weight * fp + (1.0 - fp_weight) * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


class MinHashLSH:
    """Streaming near-duplicate filter: :meth:`add_if_new` keeps the first of each group of near-duplicates.

    Args:
        threshold: estimated Jaccard similarity at or above which a document is a near-duplicate.
        num_perm: hash functions per signature.
        ngram: characters per shingle.
        seed: seed of the hash functions (same seed, same decisions).
    """

    def __init__(self, threshold: float = 0.8, *, num_perm: int = 128, ngram: int = 5, seed: int = 0) -> None:
        if num_perm < 2 or ngram < 1:
            raise ValueError(f"need num_perm >= 2 and ngram >= 1, got {num_perm}, {ngram}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self._seed = np.uint64(rng.integers(0, 2**63))
        self._probes = rng.integers(0, num_perm, (4 * num_perm, num_perm))  # densification probe sequences
        self._band_mul = rng.integers(1, 2**63, self.rows, dtype=np.uint64) | np.uint64(1)
        self._tables: list[dict[int, int]] = [{} for _ in range(self.bands)]
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def shingles(self, text: str) -> np.ndarray:
        """Hashes of the character n-grams (one n-gram for texts shorter than ``ngram``), uint64 ``[S]``."""
        norm = _WS.sub(" ", text.lower()).strip()
        codes = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = min(self.ngram, codes.size)
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        count = codes.size - n + 1
        h = np.zeros(count, dtype=np.uint64)
        for j in range(n):
            h = h * _P + codes[j : j + count]
        return _mix(h ^ self._seed)

    def signature(self, text: str) -> np.ndarray | None:
        """One-permutation MinHash signature uint32 ``[num_perm]``; None for a text with no shingles (empty).

        Each shingle hash is computed once: its high bits pick one of ``num_perm`` bins, its low 32 bits are
        the value, and each bin keeps its minimum (Li, Owen & Zhang 2012). Empty bins (short texts) borrow the
        value of a bin chosen by a fixed pseudo-random probe sequence ("optimal densification", Shrivastava
        2017), so two texts' signatures agree in a share of bins that estimates their Jaccard similarity.
        """
        sh = self.shingles(text)
        if sh.size == 0:
            return None
        bins = ((sh >> np.uint64(32)) * np.uint64(self.num_perm)) >> np.uint64(32)
        sig = np.full(self.num_perm, _EMPTY, dtype=np.uint64)
        np.minimum.at(sig, bins.astype(np.intp), sh & np.uint64(0xFFFFFFFF))
        empty = np.flatnonzero(sig == _EMPTY)
        for probe in self._probes:
            if empty.size == 0:
                break
            src = sig[probe[empty]]
            found = src != _EMPTY
            sig[empty[found]] = src[found]
            empty = empty[~found]
        if empty.size:  # only possible with very few filled bins: copy the first filled bin
            sig[empty] = sig[np.flatnonzero(sig != _EMPTY)[0]]
        return sig.astype(np.uint32)

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        bands = sig[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        return [int(k) for k in _mix((bands * self._band_mul[None, :]).sum(axis=1, dtype=np.uint64))]

    def query(self, sig: np.ndarray) -> int | None:
        """Index of a stored document whose estimated Jaccard with ``sig`` is >= threshold, else None."""
        seen: set[int] = set()
        for table, key in zip(self._tables, self._band_keys(sig), strict=True):
            cand = table.get(key)
            if cand is not None and cand not in seen:
                seen.add(cand)
                if float(np.mean(self._sigs[cand] == sig)) >= self.threshold:
                    return cand
        return None

    def add_if_new(self, text: str) -> bool:
        """Store ``text``'s signature unless it near-duplicates a stored one; True if it was new.

        Empty texts (no shingles) are always new and not stored.
        """
        sig = self.signature(text)
        if sig is None:
            return True
        if self.query(sig) is not None:
            return False
        if self.size == self._sigs.shape[0]:
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[self.size] = sig
        for table, key in zip(self._tables, self._band_keys(sig), strict=True):
            table.setdefault(key, self.size)
        self.size += 1
        return True
