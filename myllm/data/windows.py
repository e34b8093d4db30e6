"""Packed training windows from token stores (shard directories), with mixtures, rank splits and exact resume.

The data a run sees is one deterministic *global sequence* of windows, fixed by the components, their
weights, ``seq_len`` and ``seed`` only:

* each component (a shard directory: one token stream) is cut into ``N = n_tokens // T`` consecutive windows;
  its ``k``-th draw is window ``perm_epoch(k % N)`` of epoch ``k // N`` (a fresh shuffle every epoch);
* global step ``s`` draws from the component chosen by :class:`~myllm.data.packing.MixtureCursor`;
* data-parallel rank ``r`` of ``W`` takes the global steps ``s = r, r + W, r + 2W, ...`` (disjoint shares);
* DataLoader worker ``w`` of ``K`` builds the rank's windows in blocks ``w, w + K, ...`` of :data:`BLOCK`
  windows and the main process takes them back in order, so the rank's sequence does not depend on ``K``.

The position (``state_dict``) is the number of global steps consumed, ``s = j * W`` after ``j`` windows per
rank, plus the per-component draw counts at ``s``: it names no worker and no rank, so a run resumes exactly
with any number of DataLoader workers, and with another world size (each rank then starts at ``s + r``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from myllm.data.io import PathLike
from myllm.data.packing import MixtureCursor, Permutation, pack_arrays
from myllm.data.shards import ShardError, ShardSet
from myllm.data.source import Window

BLOCK = 64  # windows a DataLoader worker builds and sends back at a time (does not change the sequence)


class TokenStore(Protocol):
    """A token stream with known document starts (:class:`~myllm.data.shards.ShardSet` is one)."""

    n_tokens: int
    fingerprint: str

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def doc_starts(self, start: int, stop: int) -> np.ndarray: ...


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if on else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class PackedSource(IterableDataset):
    """A :class:`~myllm.data.source.WindowSource` over one or more token stores (see the module docstring).

    Args:
        stores: the components (token streams); at least one.
        seq_len: ``T``, tokens per window.
        weights: mixture weights per component (normalised); default proportional to their window counts.
        rank, world_size: this data-parallel rank; default from ``torch.distributed`` when initialised, else 0/1.
        seed: shuffling seed (per component and epoch).
        shuffle: shuffle windows each epoch; False reads every component in order.
        num_workers: DataLoader worker processes that build windows ahead (0: in this process).
        num_epochs: end after ``num_epochs * sum(N_c)`` global steps (each rank gets an equal share);
            None: never end (the training loop stops by step count).
    """

    def __init__(
        self,
        stores: Sequence[TokenStore],
        seq_len: int,
        *,
        weights: Sequence[float] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        num_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if not stores:
            raise ValueError("PackedSource needs at least one token store")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if num_workers < 0 or (num_epochs is not None and num_epochs < 1):
            raise ValueError(f"need num_workers >= 0 and num_epochs >= 1 or None, got {num_workers}, {num_epochs}")
        fingerprints = {s.fingerprint for s in stores}
        if len(fingerprints) > 1:
            raise ShardError(
                f"the mixture's components were tokenised with different tokenizers: {sorted(fingerprints)}"
            )
        self.stores = list(stores)
        self.seq_len = seq_len
        self.n_windows = [s.n_tokens // seq_len for s in self.stores]
        for store, n in zip(self.stores, self.n_windows, strict=True):
            if n == 0:
                raise ValueError(
                    f"{getattr(store, 'root', store)}: {store.n_tokens} tokens, fewer than seq_len={seq_len}"
                )
        if weights is None:
            weights = [float(n) for n in self.n_windows]
        if len(weights) != len(self.stores):
            raise ValueError(f"{len(weights)} weights for {len(self.stores)} components")
        self.weights = [float(w) for w in MixtureCursor(weights).weights]
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.num_epochs = num_epochs
        self.fingerprint = next(iter(fingerprints))
        self._cursor = MixtureCursor(self.weights)  # position: global steps consumed and draws per component
        self._perms: dict[tuple[int, int], Permutation] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_keepalive", None)  # e.g. a TemporaryDirectory owned by the main process
        return state

    # ------------------------------------------------------------------------------------------ addressing
    @property
    def end_step(self) -> int | None:
        """The global step at which a finite source ends for this world size (None: endless)."""
        if self.num_epochs is None:
            return None
        total = self.num_epochs * sum(self.n_windows)
        return total - total % self.world_size

    def window_range(self, component: int, draw: int) -> tuple[int, int]:
        """Token range ``[start, start + T)`` of a component's ``draw``-th window (epoch = draw // N)."""
        n = self.n_windows[component]
        epoch, i = divmod(draw, n)
        if self.shuffle:
            perm = self._perms.get((component, epoch))
            if perm is None:
                if len(self._perms) > 4 * len(self.stores):
                    self._perms.clear()
                perm = self._perms[(component, epoch)] = Permutation(n, self.seed, component, epoch)
            i = perm(i)
        return i * self.seq_len, (i + 1) * self.seq_len

    def window_arrays(self, component: int, draw: int) -> dict[str, np.ndarray]:
        """The window of a component's ``draw``-th draw, as int64 numpy arrays ``[T]``."""
        start, stop = self.window_range(component, draw)
        store = self.stores[component]
        return pack_arrays(store.read(start, stop), store.doc_starts(start, stop) - start)

    def window(self, component: int, draw: int) -> Window:
        """The window of a component's ``draw``-th draw (``torch.long`` tensors ``[T]``)."""
        return {k: torch.from_numpy(v) for k, v in self.window_arrays(component, draw).items()}

    def _rank_steps(
        self, cursor: MixtureCursor, *, worker: int = 0, num_workers: int = 1
    ) -> Iterator[tuple[int, int, MixtureCursor]]:
        """This rank's draws ``(component, draw, cursor after it)`` from ``cursor`` on.

        The rank's ``j``-th window (counted from ``cursor``) is global step ``cursor.step + j * W + rank``;
        with ``num_workers > 1`` only the windows of blocks ``j // BLOCK = worker (mod num_workers)`` are
        yielded (the others are stepped over without reading data).
        """
        cur = cursor.copy()
        end = self.end_step
        j = 0
        while end is None or cur.step + self.world_size <= end:
            if (j // BLOCK) % num_workers == worker:
                probe = cur.copy()
                probe.advance(self.rank)
                comp = probe.pick()
                draw = probe.counts[comp]
                cur.advance(self.world_size)
                yield comp, draw, cur
            else:
                cur.advance(self.world_size)
            j += 1

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Window]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "PackedSource is being read by DataLoader worker processes that it cannot track; wrap it in a "
                "DataLoader with num_workers=0 and pass num_workers= to the source instead"
            )
        if self.num_workers == 0:
            for comp, draw, after in self._rank_steps(self._cursor):
                window = self.window(comp, draw)
                self._cursor = after.copy()  # committed before handing out: state_dict() counts this window
                yield window
            return
        loader = DataLoader(
            _WorkerStream(self, self._cursor.copy()),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_keep_numpy,
        )
        steps = self._rank_steps(self._cursor)
        for block in loader:  # blocks of BLOCK windows, in order; workers take turns
            for i in range(block["input_ids"].shape[0]):
                _, _, after = next(steps)
                window = {k: torch.from_numpy(v[i]) for k, v in block.items()}
                self._cursor = after.copy()
                yield window

    # ---------------------------------------------------------------------------------------------- state
    def _identity(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "weights": [round(w, 12) for w in self.weights],
            "components": [[s.fingerprint, s.n_tokens] for s in self.stores],
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: global steps consumed, draws per component, epochs, and what data it is."""
        return {
            "step": self._cursor.step,
            "counts": list(self._cursor.counts),
            "epochs": [c // n for c, n in zip(self._cursor.counts, self.n_windows, strict=True)],
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict` (any rank, world size or worker count).

        Raises:
            ValueError: the state belongs to other data (components, seq_len, seed, shuffle or weights differ).
        """
        mine = self._identity()
        diffs = [k for k in mine if _as_json(state.get(k)) != _as_json(mine[k])]
        if diffs:
            raise ValueError(
                f"cannot resume: the saved data position is for other data ({', '.join(diffs)} differ: saved "
                f"{[state.get(k) for k in diffs]}, now {[mine[k] for k in diffs]})"
            )
        self._cursor = MixtureCursor(self.weights, int(state["step"]), state["counts"])


def _as_json(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_as_json(v) for v in x]
    if isinstance(x, float):
        return round(x, 12)
    return x


def _keep_numpy(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DataLoader collate that sends a worker's numpy block as is (one pickle, no per-tensor shared memory)."""
    return block


class _WorkerStream(IterableDataset):
    """What a DataLoader worker runs: its blocks of :data:`BLOCK` windows of the rank's sequence, stacked."""

    def __init__(self, source: PackedSource, cursor: MixtureCursor) -> None:
        super().__init__()
        self.source, self.cursor = source, cursor

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        wid, k = (info.id, info.num_workers) if info is not None else (0, 1)
        block: list[dict[str, np.ndarray]] = []
        for comp, draw, _ in self.source._rank_steps(self.cursor, worker=wid, num_workers=k):
            block.append(self.source.window_arrays(comp, draw))
            if len(block) == BLOCK:
                yield {key: np.stack([w[key] for w in block]) for key in block[0]}
                block = []
        if block:
            yield {key: np.stack([w[key] for w in block]) for key in block[0]}


class ShardSource(PackedSource):
    """Packed windows over shard directories written by ``myllm data tokenize``; validated before training.

    Args:
        paths: one shard directory, a list of them (mixed by size unless ``weights`` is given), or a mapping
            ``{directory: weight}`` (e.g. ``{"web": 0.7, "code": 0.3}``).
        seq_len: tokens per window.
        tokenizer: the model's tokenizer (or its directory): its fingerprint must match the shards'.
        vocab_size: the model's vocabulary size: every token id must be below it.
        weights, rank, world_size, seed, shuffle, num_workers, num_epochs: see :class:`PackedSource`.

    Raises:
        ShardError: a missing / unfinished / truncated / inconsistent shard directory or a tokenizer mismatch.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike] | Mapping[PathLike, float],
        seq_len: int,
        *,
        weights: Sequence[float] | None = None,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        num_epochs: int | None = None,
    ) -> None:
        if isinstance(paths, Mapping):
            if weights is not None:
                raise ValueError("give weights either in the mapping or as weights=, not both")
            weights = [float(w) for w in paths.values()]
            paths = list(paths.keys())
        elif isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
            paths = [paths]
        stores = [ShardSet(p, tokenizer=tokenizer, vocab_size=vocab_size) for p in paths]
        super().__init__(
            stores,
            seq_len,
            weights=weights,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=shuffle,
            num_workers=num_workers,
            num_epochs=num_epochs,
        )
        self.paths = [str(p) for p in paths]
