"""A ``datasets.Dataset`` as a window source: written once into the shard format, then read as shards.

Going through the shard format (rather than reading Arrow rows per window) reuses one reading path with its
validation, packing, mixtures and exact resume, and keeps memory bounded: rows are streamed in batches.
``datasets`` is imported lazily; it is only needed by whoever passes a Dataset.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from myllm.data.io import PathLike, ensure_writable_dir, read_json
from myllm.data.shards import INDEX, shard_name, token_dtype
from myllm.data.windows import ShardSource
from myllm.data.writer import Encoder, tokenizer_info, write_index, write_shard


def dataset_to_shards(
    dataset: Any,
    out_dir: PathLike,
    *,
    tokenizer: Any = None,
    column: str | None = None,
    eos_id: int | None = None,
    rows_per_shard: int = 100_000,
    batch_rows: int = 1000,
) -> Path:
    """Write a ``datasets.Dataset`` with a text or ``input_ids`` column as a shard directory (reused if done).

    Args:
        dataset: a ``datasets.Dataset``.
        out_dir: the shard directory.
        tokenizer: needed for a text column; for an ids column it names the tokenizer (fingerprint, eos).
        column: the column to read; default ``"input_ids"`` if present, else ``"text"``.
        eos_id: document separator for an ids column without a tokenizer (default: the tokenizer's eos).
        rows_per_shard, batch_rows: shard size and streaming batch, in rows.

    Raises:
        ValueError: not a Dataset, a missing column, a text column without a tokenizer, no eos id.
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is installed with the train extra
        raise ValueError("reading a datasets.Dataset needs the `datasets` package") from exc
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    if column is None:
        column = "input_ids" if "input_ids" in dataset.column_names else "text"
    if column not in dataset.column_names:
        raise ValueError(f"the dataset has no {column!r} column (columns: {', '.join(dataset.column_names)})")
    feature = dataset.features[column]
    is_text = getattr(feature, "dtype", None) in ("string", "large_string")
    if is_text and tokenizer is None:
        raise ValueError(f"column {column!r} holds text: pass the tokenizer to encode it")
    if tokenizer is not None:
        spec, info = tokenizer_info(tokenizer)
        eos_id = spec.eos_id if eos_id is None else eos_id
    else:
        spec = None
        top = max((max(ids, default=-1) for batch in dataset.iter(batch_rows) for ids in batch[column]), default=-1)
        info = {"fingerprint": "unknown (token ids without a tokenizer)", "vocab_size": top + 1, "eos_id": eos_id}
        info["vocab_size"] = max(info["vocab_size"], (eos_id or 0) + 1)
        info["bos_id"] = None
    if eos_id is None:
        raise ValueError("no eos id to separate documents: pass eos_id= or a tokenizer with an eos token")
    info = {**info, "eos_id": eos_id}
    dtype = token_dtype(info["vocab_size"])
    options = {"column": column, "rows_per_shard": rows_per_shard, "source": "datasets.Dataset"}
    plan = {"dataset": getattr(dataset, "_fingerprint", None), "rows": len(dataset), "tokenizer": info, **options}
    plan_hash = hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()
    out = ensure_writable_dir(out_dir)
    if (out / INDEX).is_file() and plan["dataset"] is not None:
        if read_json(out / INDEX, "shard index").get("plan_hash") == plan_hash:
            return out
    (out / INDEX).unlink(missing_ok=True)  # a crash while rewriting must not leave a valid-looking index
    encoder = Encoder(spec) if is_text and spec is not None else None
    entries = []
    for i, lo in enumerate(range(0, max(len(dataset), 1), rows_per_shard)):
        part = dataset.select(range(lo, min(lo + rows_per_shard, len(dataset))))
        batches = ([(x, True, True) for x in batch[column]] for batch in part.iter(batch_rows))
        entries.append(
            write_shard(
                out, shard_name(i), batches, encoder, dtype, eos_id=eos_id, bos_id=None, marker={"plan": plan_hash}
            )
        )
    write_index(
        out, entries, dtype=np.dtype(dtype), tokenizer=info, options=options, plan_hash=plan_hash, input_bytes=0
    )
    return out


def source_from_dataset(
    dataset: Any,
    seq_len: int,
    *,
    tokenizer: Any = None,
    column: str | None = None,
    eos_id: int | None = None,
    cache_dir: PathLike | None = None,
    **kwargs: Any,
) -> ShardSource:
    """A :class:`~myllm.data.windows.ShardSource` over a ``datasets.Dataset`` (text or ``input_ids`` column).

    The dataset is written to shards in ``cache_dir`` (reused when the same dataset, column and tokenizer were
    written there before), or to a temporary directory removed with the source. ``kwargs`` go to
    :class:`~myllm.data.windows.ShardSource` (rank, world_size, seed, shuffle, num_workers, num_epochs, ...).
    """
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="myllm-dataset-shards-")
        cache_dir = tmp.name
    path = dataset_to_shards(dataset, cache_dir, tokenizer=tokenizer, column=column, eos_id=eos_id)
    source = ShardSource(path, seq_len, tokenizer=tokenizer, **kwargs)
    source._keepalive = tmp  # keeps the temporary shards alive as long as the source
    return source
