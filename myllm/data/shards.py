"""The tokenised-shard format: flat token arrays read through ``numpy.memmap``, validated before training.

A shard directory written by ``myllm data tokenize`` (:mod:`myllm.data.tokenize`) holds::

    index.json            format, dtype, tokenizer (fingerprint, vocab size, eos id), options, totals,
                          one entry per shard (documents, tokens, largest token id, blake2b of the tokens)
    shard_00000.tokens    the documents' tokens back to back, each document followed by eos (uint16 when the
                          vocabulary fits, else uint32; little-endian)
    shard_00000.docs      int64 document offsets into the tokens, n_docs + 1 of them (0 first, n_tokens last)
    shard_00000.json      the shard's entry, written when the shard is finished (resume marker)
    plan.json             the inputs and options the shards were made from (resume checks them)

Document offsets live in binary ``.docs`` files rather than in the JSON index so the index stays small for
corpora of billions of documents; the index holds per-shard counts. The shards of a directory form one token
stream (shard order); :class:`ShardSet` reads any range of it and the document starts inside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from myllm.data.io import PathLike, read_json

FORMAT = "myllm-token-shards"
VERSION = 1
INDEX = "index.json"
PLAN = "plan.json"
TOKENS_SUFFIX, DOCS_SUFFIX, MARKER_SUFFIX = ".tokens", ".docs", ".json"
OFFSET_DTYPE = np.dtype("<i8")


class ShardError(ValueError):
    """A shard directory that cannot be used: missing, unfinished, truncated, inconsistent or mismatched."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32`` (little-endian)."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def tokens_blake2b(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex blake2b (16 bytes) of a file, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_shard_files(root: Path, entry: dict[str, Any], dtype: np.dtype) -> None:
    """Cheap consistency of one shard against its index entry: file sizes and the first / last offset.

    Raises:
        ShardError: a missing or truncated token file, a document-offset file that does not match.
    """
    name = entry["name"]
    tokens, docs = root / f"{name}{TOKENS_SUFFIX}", root / f"{name}{DOCS_SUFFIX}"
    for p in (tokens, docs):
        if not p.is_file():
            raise ShardError(f"{root}: shard file {p.name} is missing")
    want = entry["n_tokens"] * dtype.itemsize
    have = tokens.stat().st_size
    if have != want:
        kind = "truncated" if have < want else "oversized"
        raise ShardError(
            f"{tokens}: {kind} shard: {have} bytes, the index says {entry['n_tokens']} tokens ({want} bytes)"
        )
    want_docs = (entry["n_docs"] + 1) * OFFSET_DTYPE.itemsize
    if docs.stat().st_size != want_docs:
        raise ShardError(
            f"{docs}: {docs.stat().st_size} bytes, the index says {entry['n_docs']} documents ({want_docs} bytes)"
        )
    offsets = np.memmap(docs, dtype=OFFSET_DTYPE, mode="r")
    if offsets[0] != 0 or offsets[-1] != entry["n_tokens"]:
        raise ShardError(
            f"{docs}: document offsets run from {int(offsets[0])} to {int(offsets[-1])}, "
            f"the index says 0 to {entry['n_tokens']}: the index does not match its data"
        )


def check_shard_contents(root: Path, entry: dict[str, Any], dtype: np.dtype, vocab_size: int) -> None:
    """Full check of one shard: token hash, offsets non-decreasing, every id below ``vocab_size``."""
    name = entry["name"]
    tokens = root / f"{name}{TOKENS_SUFFIX}"
    digest = tokens_blake2b(tokens)
    if digest != entry["blake2b"]:
        raise ShardError(f"{tokens}: contents changed (blake2b {digest}, the index says {entry['blake2b']})")
    offsets = np.fromfile(root / f"{name}{DOCS_SUFFIX}", dtype=OFFSET_DTYPE)
    if np.any(np.diff(offsets) < 0):
        raise ShardError(f"{root / (name + DOCS_SUFFIX)}: document offsets decrease")
    if entry["n_tokens"]:
        top = int(np.memmap(tokens, dtype=dtype, mode="r").max())
        if top >= vocab_size or top != entry["max_token_id"]:
            raise ShardError(f"{tokens}: largest token id {top} (index: {entry['max_token_id']}, vocab {vocab_size})")


def read_index(path: PathLike) -> dict[str, Any]:
    """Read and sanity-check a shard directory's ``index.json`` (no data files are touched).

    Raises:
        ShardError: not a shard directory, an unfinished tokenisation, or an index of another format/version.
    """
    root = Path(path)
    if not root.is_dir():
        raise ShardError(f"shard directory {root} does not exist" if not root.exists() else f"{root} is a file")
    index_path = root / INDEX
    if not index_path.is_file():
        if (root / PLAN).is_file():
            raise ShardError(
                f"{root}: tokenisation did not finish (plan.json but no index.json); "
                "run the same `myllm data tokenize` command again to resume"
            )
        raise ShardError(f"{root} is not a shard directory (no {INDEX}); make one with `myllm data tokenize`")
    try:
        index = read_json(index_path, "shard index")
    except ValueError as exc:
        raise ShardError(str(exc)) from exc
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ShardError(
            f"{index_path}: format {index.get('format')!r} v{index.get('version')}, expected {FORMAT} v{VERSION}"
        )
    shards = index.get("shards", [])
    for key in ("n_tokens", "n_docs"):
        if sum(s[key] for s in shards) != index[key]:
            raise ShardError(f"{index_path}: the shards' {key} do not add up to the index total {index[key]}")
    return index


def verify_shards(
    path: PathLike, *, tokenizer: Any = None, full: bool = False, vocab_size: int | None = None
) -> dict[str, Any]:
    """Validate a shard directory before training; return its index.

    Args:
        path: the shard directory.
        tokenizer: a tokenizer or tokenizer directory whose fingerprint must equal the shards'.
        full: also hash every token file and check every id (reads all data; the default checks sizes and
            offsets only, which catches truncation and a stale index without reading the tokens).
        vocab_size: the model's vocabulary; the shards' largest token id must be below it.

    Raises:
        ShardError: with a message that names the directory or file and what is wrong.
    """
    root = Path(path)
    index = read_index(root)
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    if tokenizer is not None:
        from myllm.data.tokenizer import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
        if fp != index["tokenizer"]["fingerprint"]:
            raise ShardError(
                f"{root}: tokenizer mismatch: the shards were made with tokenizer {index['tokenizer']['fingerprint']}"
                f", the given tokenizer is {fp}; re-tokenise with this tokenizer or use the matching one"
            )
    if vocab_size is not None and index["max_token_id"] >= vocab_size:
        raise ShardError(f"{root}: token id {index['max_token_id']} does not fit a vocabulary of {vocab_size}")
    for entry in index["shards"]:
        check_shard_files(root, entry, dtype)
        if full:
            check_shard_contents(root, entry, dtype, index["tokenizer"]["vocab_size"])
    return index


class ShardSet:
    """One shard directory as a single token stream (validated on open; memmaps opened lazily per process).

    Pickles without its memmaps, so it can be handed to DataLoader worker processes.
    """

    def __init__(self, path: PathLike, *, tokenizer: Any = None, vocab_size: int | None = None) -> None:
        self.root = Path(path)
        self.index = verify_shards(self.root, tokenizer=tokenizer, vocab_size=vocab_size)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.fingerprint: str = self.index["tokenizer"]["fingerprint"]
        self.eos_id: int | None = self.index["tokenizer"]["eos_id"]
        entries = [e for e in self.index["shards"] if e["n_tokens"] > 0]
        self._names = [e["name"] for e in entries]
        counts = np.array([e["n_tokens"] for e in entries], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard k: [starts[k], starts[k+1])
        self.n_tokens = int(self._starts[-1])
        self.n_docs = int(self.index["n_docs"])
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            self._maps = {}
        if k not in self._maps:
            name = self._names[k]
            tokens = np.memmap(self.root / f"{name}{TOKENS_SUFFIX}", dtype=self.dtype, mode="r")
            docs = np.memmap(self.root / f"{name}{DOCS_SUFFIX}", dtype=OFFSET_DTYPE, mode="r")
            self._maps[k] = (tokens, docs)
        return self._maps[k]

    def _spans(self, start: int, stop: int):
        """(shard k, local start, local stop, global base) for every shard overlapping [start, stop)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            base = int(self._starts[k])
            end = min(stop, int(self._starts[k + 1]))
            yield k, start - base, end - base, base
            start = end
            k += 1

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as int64 ``[stop - start]``."""
        parts = [self._shard(k)[0][a:b] for k, a, b, _ in self._spans(start, stop)]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)

    def doc_starts(self, start: int, stop: int) -> np.ndarray:
        """Stream positions in ``[start, stop)`` at which a document begins, ascending, int64."""
        out = []
        for k, a, b, base in self._spans(start, stop):
            offsets = self._shard(k)[1]
            lo, hi = np.searchsorted(offsets, [a, b], side="left")
            out.append(np.asarray(offsets[lo:hi], dtype=np.int64) + base)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def documents(self) -> list[np.ndarray]:
        """Every document's tokens (with its eos), in order; for tests and small data only."""
        docs: list[np.ndarray] = []
        for e in self.index["shards"]:
            tokens = np.fromfile(self.root / f"{e['name']}{TOKENS_SUFFIX}", dtype=self.dtype).astype(np.int64)
            offsets = np.fromfile(self.root / f"{e['name']}{DOCS_SUFFIX}", dtype=OFFSET_DTYPE)
            docs.extend(tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True))
        return docs
