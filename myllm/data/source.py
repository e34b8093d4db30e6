"""The contract between data and the training loop.

A :class:`WindowSource` yields fixed-length training windows one at a time and can report and restore its
exact position, so that a resumed run sees exactly the windows an uninterrupted run would have seen.
Implementations: tokenised shards (``myllm.data.shards``), in-memory JSONL for small data
(``myllm.train.data``), ``datasets.Dataset`` adapters.

Each window is a dict of 1-D ``torch.long`` tensors of length ``T`` (``seq_len``):

* ``input_ids [T]``;
* ``labels [T]``: the targets *unshifted* (the model shifts once), ``-100`` where no loss is taken
  (padding; the first token of a document packed after another one, so no document is predicted from
  the previous document's context);
* ``position_ids [T]``: restart at 0 at every document start inside the window. transformers'
  ``create_causal_mask`` turns restarting positions (with no 2-D attention mask and no cache) into a
  block-diagonal causal mask, so packed documents do not attend to each other. HF models build a
  ``DynamicCache`` whenever ``use_cache`` is on (also in training mode), which switches that detection off:
  the training forward must pass ``use_cache=False`` (tests/data/test_windows.py checks both cases);
* optionally ``attention_mask [T]`` (1 = real token) for padded (unpacked) windows.

The training loop stacks windows into batches; a source built with ``rank`` / ``world_size`` yields only
that data-parallel rank's disjoint share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

Window = dict[str, torch.Tensor]


@runtime_checkable
class WindowSource(Protocol):
    """An iterable of training windows whose position is part of the checkpoint."""

    seq_len: int

    def __iter__(self) -> Iterator[Window]:
        """Yield windows from the current position onwards (an epoch boundary reshuffles deterministically)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position (e.g. epoch and windows consumed) from which iteration continues exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position produced by :meth:`state_dict`."""
        ...
