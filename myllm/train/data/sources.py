"""In-memory window sources (``myllm.data.source.WindowSource``) over tokenised examples, and the batch collator.

For corpora larger than memory use tokenised shards (``myllm.data.ShardSource``, ``data.kind: shards``); these
sources serve small JSONL data, chat data with per-token targets, and padded (unpacked) batches.

An *example* is a pair ``(input_ids, labels)`` of equal-length integer lists; labels are unshifted targets with
``-100`` where no loss is taken. Two ways to turn examples into windows:

* :class:`PackedExamples`: examples concatenated into one stream cut into ``seq_len`` windows. Position ids restart
  at every document start (and at the window start), and the first token of every document gets label ``-100``
  (``myllm.data.packing.pack_arrays``, the shard reader's window format), so with no attention mask transformers'
  ``create_causal_mask`` builds a block-diagonal causal mask and no document is predicted from another's context. A short last window is filled with padding (label ``-100``,
  its own position run).
* :class:`PaddedExamples`: one example per window, truncated to ``seq_len`` and *not* padded; :func:`collate` pads a
  batch to its longest window (right padding, ``attention_mask`` 0, label ``-100``).

Both shuffle deterministically per epoch (seed, epoch), give each data-parallel rank a disjoint equal share, and
report their position (epoch, windows consumed) for exact resume. Iteration runs over epochs without end; the
training loop decides when to stop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from myllm.data.packing import IGNORE_INDEX, pack_arrays
from myllm.data.source import Window

IGNORE = IGNORE_INDEX
Example = tuple[Sequence[int], Sequence[int]]


class _EpochSource(ABC):
    """Shared epoch/rank/position logic; subclasses define ``_count`` items and ``_window(item_index)``."""

    seq_len: int

    def __init__(self, count: int, *, seed: int, shuffle: bool, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if count < world_size:
            raise ValueError(f"the dataset gives {count} windows, fewer than the {world_size} data-parallel ranks")
        self._count, self.seed, self.shuffle, self.rank, self.world_size = count, seed, shuffle, rank, world_size
        self.per_rank = count // world_size
        self._epoch, self._index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's item indices for ``epoch``: a seeded permutation, strided across ranks."""
        order = np.arange(self._count)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self._count)
        return order[self.rank :: self.world_size][: self.per_rank]

    def __len__(self) -> int:
        """Windows per epoch on this rank."""
        return self.per_rank

    def __iter__(self) -> Iterator[Window]:
        while True:
            order = self._order(self._epoch)
            while self._index < self.per_rank:
                i = int(order[self._index])
                self._index += 1  # the position moves as the window is handed out
                yield self._window(i)
            self._epoch, self._index = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index, "windows": self._count, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("windows") != self._count or state.get("world_size") != self.world_size:
            raise ValueError(
                f"data position was saved for {state.get('windows')} windows on {state.get('world_size')} ranks; "
                f"this dataset gives {self._count} windows on {self.world_size} ranks (data or seq_len changed?)"
            )
        self._epoch, self._index = int(state["epoch"]), int(state["index"])

    @abstractmethod
    def _window(self, i: int) -> Window:
        """The window of item ``i`` (an index into the whole dataset, not this rank's share)."""


class PackedExamples(_EpochSource):
    """Examples packed back to back into ``seq_len`` windows (see the module docstring)."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not examples:
            raise ValueError("empty dataset: no examples to pack")
        order = np.random.default_rng(seed).permutation(len(examples)) if shuffle else np.arange(len(examples))
        ids = [np.asarray(examples[i][0], dtype=np.int64) for i in order]
        labels = [np.asarray(examples[i][1], dtype=np.int64) for i in order]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        total = int(lengths.sum())
        n_windows = -(-total // seq_len)
        fill = n_windows * seq_len - total
        if fill:  # the padding run is one more "document" whose targets are all ignored
            ids.append(np.full(fill, pad_id, dtype=np.int64))
            labels.append(np.full(fill, IGNORE, dtype=np.int64))
            lengths = np.append(lengths, fill)
        self._ids, self._labels = np.concatenate(ids), np.concatenate(labels)
        self._doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # sorted stream offsets
        self.seq_len = seq_len
        super().__init__(n_windows, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)

    def _window(self, i: int) -> Window:
        start, stop = i * self.seq_len, (i + 1) * self.seq_len
        lo, hi = np.searchsorted(self._doc_starts, [start, stop])
        packed = pack_arrays(self._ids[start:stop], self._doc_starts[lo:hi] - start)
        # the example's own targets (SFT masks), and -100 wherever packing masks a document start
        packed["labels"] = np.where(packed["labels"] == IGNORE, IGNORE, self._labels[start:stop])
        return {k: torch.from_numpy(v) for k, v in packed.items()}


class PaddedExamples(_EpochSource):
    """One example per window, truncated to ``seq_len``; :func:`collate` pads each batch."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not examples:
            raise ValueError("empty dataset: no examples")
        self._examples = [
            (np.asarray(ids[:seq_len], dtype=np.int64), np.asarray(lab[:seq_len], dtype=np.int64))
            for ids, lab in examples
        ]
        self.seq_len = seq_len
        super().__init__(len(self._examples), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)

    def _window(self, i: int) -> Window:
        ids, labels = self._examples[i]
        n = len(ids)
        return {
            "input_ids": torch.from_numpy(ids.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "position_ids": torch.arange(n),
            "attention_mask": torch.ones(n, dtype=torch.long),
        }


def collate(windows: Sequence[Window], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack windows into a batch ``[B, T]``, padding on the right to the longest window.

    An ``attention_mask`` is produced when any window has one or lengths differ; packed windows of equal length
    stay maskless so the packed-document mask is derived from their position ids.
    """
    longest = max(len(w["input_ids"]) for w in windows)
    needs_mask = any("attention_mask" in w for w in windows) or any(len(w["input_ids"]) != longest for w in windows)
    fills = {"input_ids": pad_id, "labels": IGNORE, "position_ids": 0, "attention_mask": 0}
    keys = ["input_ids", "labels", "position_ids"] + (["attention_mask"] if needs_mask else [])
    batch = {}
    for key in keys:
        rows = []
        for w in windows:
            n = len(w["input_ids"])
            row = w.get(key, torch.ones(n, dtype=torch.long)) if key == "attention_mask" else w[key]
            rows.append(torch.nn.functional.pad(row.long(), (0, longest - n), value=fills[key]))
        batch[key] = torch.stack(rows)
    return batch
