"""Output side of ``myllm data tokenize``: encode segments and write one shard (tokens, offsets, marker)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from myllm.data.io import write_json_atomic
from myllm.data.shards import (
    DOCS_SUFFIX,
    FORMAT,
    INDEX,
    MARKER_SUFFIX,
    OFFSET_DTYPE,
    TOKENS_SUFFIX,
    VERSION,
    ShardError,
)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker needs to encode like the parent: the backend JSON (fast) or the HF tokenizer."""

    backend_json: str | None
    hf_tokenizer: Any
    parse_special: bool
    eos_id: int | None
    bos_id: int | None


class Encoder:
    """Encodes batches of strings to id lists with no special tokens added (single-threaded in workers)."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        if spec.backend_json is not None:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(spec.backend_json)
            self._fast.encode_special_tokens = not spec.parse_special
        else:
            self._fast = None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch_fast(texts, add_special_tokens=False)]
        out = self.spec.hf_tokenizer(texts, add_special_tokens=False, split_special_tokens=not self.spec.parse_special)
        return out["input_ids"]


def write_shard(
    out_dir: Path,
    name: str,
    batches: Iterable[list[tuple[Any, bool, bool]]],
    encoder: Encoder | None,
    dtype: np.dtype,
    *,
    eos_id: int | None,
    bos_id: int | None,
    marker: dict[str, Any],
) -> dict[str, Any]:
    """Write one shard from batches of segments (strings, or id sequences when ``encoder`` is None).

    Files are written under ``.tmp`` names, renamed, then the marker ``{name}.json`` is written; returns the
    shard's index entry.
    """
    tok_path, doc_path = out_dir / f"{name}{TOKENS_SUFFIX}", out_dir / f"{name}{DOCS_SUFFIX}"
    tok_tmp, doc_tmp = tok_path.with_name(tok_path.name + ".tmp"), doc_path.with_name(doc_path.name + ".tmp")
    hasher = hashlib.blake2b(digest_size=16)
    n_docs = n_tokens = 0
    max_id = -1
    limit = np.iinfo(dtype).max
    bos = np.array([bos_id] if bos_id is not None else [], dtype=np.int64)
    eos = np.array([eos_id] if eos_id is not None else [], dtype=np.int64)
    with open(tok_tmp, "wb") as ft, open(doc_tmp, "wb") as fd:
        fd.write(np.zeros(1, dtype=OFFSET_DTYPE).tobytes())
        for batch in batches:
            ids = encoder([s[0] for s in batch]) if encoder is not None else [s[0] for s in batch]
            parts: list[np.ndarray] = []
            ends: list[int] = []
            pos = n_tokens
            for (_, starts, stops), seq in zip(batch, ids, strict=True):
                arr = np.asarray(seq, dtype=np.int64)
                if starts and bos.size:
                    parts.append(bos)
                    pos += 1
                parts.append(arr)
                pos += arr.size
                if stops:
                    if eos.size:
                        parts.append(eos)
                        pos += 1
                    ends.append(pos)
            flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            if flat.size:
                lo, hi = int(flat.min()), int(flat.max())
                if lo < 0 or hi > limit:
                    raise ShardError(f"token id {hi if hi > limit else lo} does not fit the shard dtype {dtype}")
                max_id = max(max_id, hi)
            data = flat.astype(dtype).tobytes()
            ft.write(data)
            hasher.update(data)
            fd.write(np.asarray(ends, dtype=OFFSET_DTYPE).tobytes())
            n_tokens, n_docs = pos, n_docs + len(ends)
        for f in (ft, fd):
            f.flush()
            os.fsync(f.fileno())
    os.replace(tok_tmp, tok_path)
    os.replace(doc_tmp, doc_path)
    entry = {
        "name": name,
        "n_docs": n_docs,
        "n_tokens": n_tokens,
        "max_token_id": max_id,
        "blake2b": hasher.hexdigest(),
    }
    write_json_atomic(out_dir / f"{name}{MARKER_SUFFIX}", {**entry, **marker})
    return entry


def tokenizer_info(tokenizer: Any, *, parse_special: bool = False) -> tuple[EncoderSpec, dict[str, Any]]:
    """The encoder spec for workers and the tokenizer record of the index (fingerprint, vocab size, ids)."""
    from myllm.data.tokenizer import backend_json, load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(tokenizer)
    raw = backend_json(tok)
    vocab = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)
    spec = EncoderSpec(
        backend_json=raw,
        hf_tokenizer=None if raw is not None else tok,
        parse_special=parse_special,
        eos_id=tok.eos_token_id,
        bos_id=tok.bos_token_id,
    )
    info = {
        "fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": vocab,
        "eos_id": tok.eos_token_id,
        "bos_id": tok.bos_token_id,
    }
    return spec, info


def write_index(
    out: Path,
    shards: list[dict[str, Any]],
    *,
    dtype: np.dtype,
    tokenizer: dict[str, Any],
    options: dict[str, Any],
    plan_hash: str,
    input_bytes: int,
) -> dict[str, Any]:
    """Write ``index.json`` (atomically, last: it marks the directory finished) and return it."""
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "tokenizer": tokenizer,
        "options": options,
        "plan_hash": plan_hash,
        "n_docs": sum(e["n_docs"] for e in shards),
        "n_tokens": sum(e["n_tokens"] for e in shards),
        "max_token_id": max((e["max_token_id"] for e in shards), default=-1),
        "input_bytes": input_bytes,
        "shards": shards,
    }
    write_json_atomic(out / INDEX, index)
    return index
