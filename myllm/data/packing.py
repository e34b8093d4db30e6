"""Pure pieces of packed-window reading: the window format, a memory-free shuffle, the mixture schedule.

Legend: ``T`` = seq_len (tokens per window), ``N`` = windows of one component per epoch, ``C`` = components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
_M64 = (1 << 64) - 1


def pack_arrays(tokens: np.ndarray, doc_starts: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`pack_window` as int64 numpy arrays (what DataLoader workers send back)."""
    T = int(tokens.shape[0])
    starts = np.asarray(doc_starts, dtype=np.int64)
    is_start = np.zeros(T, dtype=bool)
    is_start[starts] = True
    is_start[0] = True
    seg_start = np.flatnonzero(is_start)  # ascending
    seg_id = np.cumsum(is_start) - 1
    positions = np.arange(T, dtype=np.int64) - seg_start[seg_id]
    input_ids = np.array(tokens, dtype=np.int64)
    labels = input_ids.copy()
    labels[seg_start[1:]] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def pack_window(tokens: np.ndarray, doc_starts: np.ndarray) -> dict[str, torch.Tensor]:
    """Build one training window from ``T`` consecutive stream tokens (the format of ``myllm.data.source``).

    Args:
        tokens: ``[T]`` token ids.
        doc_starts: positions in ``[0, T)`` where a document begins (any order, duplicates allowed).

    Returns:
        ``input_ids [T]``; ``labels [T]`` (= input_ids, ``-100`` at each document start after position 0, so no
        document is predicted from the one before it); ``position_ids [T]`` restarting at 0 at every document
        start and at the window start. All ``torch.long``.
    """
    return {k: torch.from_numpy(v) for k, v in pack_arrays(tokens, doc_starts).items()}


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-mixing 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A pseudo-random bijection of ``[0, n)`` computed per index with no table (so it works for any ``n``).

    A 4-round Feistel network over the smallest even-bit domain ``>= n``, with cycle walking back into
    ``[0, n)``; the round keys come from ``(seed, *key)``. Memory O(1), a few microseconds per index.
    """

    def __init__(self, n: int, seed: int, *key: int) -> None:
        if n < 1:
            raise ValueError(f"permutation size must be >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = (1 << self._half) - 1
        state = np.random.SeedSequence([seed, *key]).generate_state(4, dtype=np.uint64)
        self._keys = [int(k) for k in state]

    def _round_trip(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside [0, {self.n})")
        y = self._round_trip(i)
        while y >= self.n:  # cycle walking: stays a bijection on [0, n)
            y = self._round_trip(y)
        return y


class MixtureCursor:
    """Which component each global step draws from, and how many draws each component has had.

    Deterministic greedy interleave (as Megatron's blended datasets): step ``s`` draws from the component
    whose share is furthest behind its weight, ``argmax_c(w_c * (s + 1) - count_c)``, ties to the lowest
    index. No component ever runs 1 draw or more ahead of ``w_c * s`` (it is picked only while behind), so
    none falls more than ``C - 1`` behind; in practice every count stays within about 1. The cursor is
    ``(step, counts)``, so a resumed run continues the same sequence.
    """

    def __init__(self, weights: Sequence[float], step: int = 0, counts: Sequence[int] | None = None) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative, finite and not all zero, got {list(weights)}")
        self.weights = w / w.sum()
        self.step = step
        self.counts = [0] * w.size if counts is None else [int(c) for c in counts]
        if len(self.counts) != w.size or sum(self.counts) != step:
            raise ValueError(f"mixture counts {self.counts} do not add up to step {step}")

    def pick(self) -> int:
        """The component that the current step draws from."""
        if self.weights.size == 1:
            return 0
        deficit = self.weights * (self.step + 1) - np.asarray(self.counts, dtype=np.float64)
        # ties (exact in real numbers, e.g. weights 9 : 9 : 3.6) must not depend on float rounding, which differs
        # between weights normalised once or twice (a resumed vs a copied cursor): lowest index within 1e-9
        return int(np.flatnonzero(deficit >= deficit.max() - 1e-9)[0])

    def advance(self, steps: int = 1) -> None:
        """Move forward ``steps`` global steps."""
        if self.weights.size == 1:
            self.step += steps
            self.counts[0] += steps
            return
        for _ in range(steps):
            self.counts[self.pick()] += 1
            self.step += 1

    def copy(self) -> MixtureCursor:
        return MixtureCursor(self.weights, self.step, self.counts)
