"""``myllm data tokenize``: JSONL / plain-text inputs -> tokenised shards (format: :mod:`myllm.data.shards`).

How it scales:

* **Plan.** Inputs are cut into *units* of about ``shard_bytes`` input bytes: a JSONL file is split at byte
  offsets (a line belongs to the unit in which it starts, so no file is scanned to plan), small files are
  grouped, a plain-text file (one document) is never split. The plan depends only on the inputs' sizes and the
  options, never on the number of workers, and each unit becomes one shard: the output is byte-identical
  whatever ``workers`` is.
* **Stream.** A worker reads its unit a batch at a time (``chunk_bytes``), encodes it and appends to the
  shard's files, so memory stays bounded by the batch, not by the input.
* **Resume.** A shard is written under ``*.tmp`` names, renamed when complete, and then marked done
  (``shard_XXXXX.json``). Running the same command again keeps marked shards, redoes the rest, and writes
  ``index.json`` last; a different input, tokenizer or option is refused unless ``overwrite=True``.
* **Parallel.** Units run in worker processes (``fork`` where available: no re-import of torch per worker),
  each encoding single-threaded; ``workers=1`` runs in-process.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from myllm.data.inputs import batched, discover_inputs, plan_units, prefetch, unit_bytes, unit_segments
from myllm.data.io import PathLike, ensure_writable_dir, read_json, write_json_atomic
from myllm.data.shards import (
    DOCS_SUFFIX,
    FORMAT,
    INDEX,
    MARKER_SUFFIX,
    OFFSET_DTYPE,
    PLAN,
    TOKENS_SUFFIX,
    VERSION,
    ShardError,
    shard_name,
    token_dtype,
)
from myllm.data.writer import Encoder, EncoderSpec, tokenizer_info, write_index, write_shard


@dataclass(frozen=True)
class TokenizeOptions:
    """What decides the shards' bytes (recorded in the plan; a resume with other options is refused)."""

    field: str = "text"
    append_eos: bool = True
    add_bos: bool = False
    parse_special: bool = False  # False: "<|im_end|>" inside a document is plain text, not the special token
    shard_bytes: int = 64 << 20
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.shard_bytes < 1 or self.chunk_bytes < 1:
            raise ValueError(
                f"shard_bytes and chunk_bytes must be positive, got {self.shard_bytes}, {self.chunk_bytes}"
            )


_WORKER: dict[str, Any] = {}


def _init_worker(spec: EncoderSpec) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process; read by tokenizers per call
    _WORKER["encoder"] = Encoder(spec)


def _run_unit(
    out_dir: str,
    name: str,
    unit: list[dict[str, Any]],
    opts: TokenizeOptions,
    spec: EncoderSpec,
    dtype: str,
    plan_hash: str,
    encoder: Encoder | None = None,
) -> dict[str, Any]:
    encoder = encoder or _WORKER.get("encoder") or Encoder(spec)
    return write_shard(
        Path(out_dir),
        name,
        prefetch(batched(unit_segments(unit, opts.field, opts.chunk_bytes), opts.chunk_bytes)),
        encoder,
        np.dtype(dtype),
        eos_id=spec.eos_id if opts.append_eos else None,
        bos_id=spec.bos_id if opts.add_bos else None,
        marker={"plan": plan_hash, "input_bytes": unit_bytes(unit)},
    )


# ------------------------------------------------------------------------------------------------ orchestration
def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _our_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("shard_*") if p.is_file()) + [p for p in (out / INDEX, out / PLAN) if p.exists()]


def _prepare_dir(out: Path, plan_hash: str, overwrite: bool) -> dict[str, Any] | None:
    """Return the finished index if ``out`` already holds this plan's shards; clear or refuse other states."""
    index_path, plan_path = out / INDEX, out / PLAN
    old_hash = None
    if index_path.is_file():
        old_hash = read_json(index_path, "shard index").get("plan_hash")
        if old_hash == plan_hash and not overwrite:
            return read_json(index_path, "shard index")
    elif plan_path.is_file():
        old_hash = read_json(plan_path, "tokenisation plan").get("plan_hash")
    if old_hash is not None and old_hash != plan_hash and not overwrite:
        state = "finished" if index_path.is_file() else "unfinished"
        raise ShardError(
            f"{out} holds {state} shards made from other inputs, tokenizer or options; "
            "pass overwrite=True (--overwrite) to replace them, or choose another directory"
        )
    if overwrite:
        index_path.unlink(missing_ok=True)  # first: a crash while clearing must not leave a valid-looking index
        for p in _our_files(out):
            p.unlink(missing_ok=True)
    return None


def _finished(out: Path, name: str, plan_hash: str, dtype: np.dtype) -> dict[str, Any] | None:
    """The index entry of a shard finished under this plan (marker present, file sizes right), else None."""
    marker = out / f"{name}{MARKER_SUFFIX}"
    if not marker.is_file():
        return None
    try:
        meta = read_json(marker, "shard marker")
        if meta.get("plan") != plan_hash:
            return None
        tokens, docs = out / f"{name}{TOKENS_SUFFIX}", out / f"{name}{DOCS_SUFFIX}"
        if tokens.stat().st_size != meta["n_tokens"] * dtype.itemsize:
            return None
        if docs.stat().st_size != (meta["n_docs"] + 1) * OFFSET_DTYPE.itemsize:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return {k: meta[k] for k in ("name", "n_docs", "n_tokens", "max_token_id", "blake2b")}


def _execute(
    out: Path,
    todo: list[tuple[str, list[dict[str, Any]]]],
    args: tuple[TokenizeOptions, EncoderSpec, str, str],
    workers: int,
    bar: Any,
) -> dict[str, dict[str, Any]]:
    """Run the units of ``todo`` in-process (workers == 1) or in a process pool; return entries by name."""
    results: dict[str, dict[str, Any]] = {}
    if workers == 1 or len(todo) <= 1:
        encoder = Encoder(args[1])
        for name, unit in todo:
            results[name] = _run_unit(str(out), name, unit, *args, encoder=encoder)
            bar.update(unit_bytes(unit))
            bar.set_postfix(tokens=sum(e["n_tokens"] for e in results.values()), refresh=False)
        return results
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers at fork/spawn; restored below
    pending: dict[Future, tuple[str, int]] = {}
    queue = iter(todo)
    try:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(args[1],)
        ) as pool:

            def submit_next() -> None:
                item = next(queue, None)
                if item is not None:
                    fut = pool.submit(_run_unit, str(out), item[0], item[1], *args)
                    pending[fut] = (item[0], unit_bytes(item[1]))

            for _ in range(2 * workers):  # bounded in-flight work: memory does not grow with the input
                submit_next()
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        name, nbytes = pending.pop(fut)
                        results[name] = fut.result()
                        bar.update(nbytes)
                        bar.set_postfix(tokens=sum(e["n_tokens"] for e in results.values()), refresh=False)
                        submit_next()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    except BrokenProcessPool as exc:
        raise ShardError(
            f"a tokenizer worker process died (killed, or out of memory) while writing {out}; finished shards "
            "are kept: run the same command again to resume"
        ) from exc
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return results


def tokenize_to_shards(
    inputs: Sequence[PathLike] | PathLike,
    out_dir: PathLike,
    tokenizer: Any,
    *,
    field: str = "text",
    fmt: str = "auto",
    workers: int = 1,
    shard_bytes: int = 64 << 20,
    chunk_bytes: int = 1 << 20,
    append_eos: bool = True,
    add_bos: bool = False,
    parse_special: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise JSONL / plain-text files and directories into a shard directory (see the module docstring).

    Args:
        inputs: files and/or directories (walked recursively for ``*.jsonl`` and ``*.txt``-like files).
        out_dir: the shard directory (created; resumed if it holds an unfinished run of the same plan).
        tokenizer: a tokenizer or a local HF tokenizer directory.
        field: JSONL field holding the text.
        fmt: "auto" (by suffix), "jsonl" or "text" for every file.
        workers: worker processes (1: in-process).
        shard_bytes: input bytes per shard (the unit of parallelism and of resume).
        chunk_bytes: bytes encoded per batch (bounds a worker's memory).
        append_eos: end every document with the tokenizer's eos token.
        add_bos: start every document with the tokenizer's bos token.
        parse_special: encode special-token strings found in documents as the special tokens.
        overwrite: replace whatever shards ``out_dir`` holds.
        progress: show a tqdm progress bar (bytes).

    Returns:
        A summary: documents, tokens, input_bytes, output_bytes, shards, reused_shards, seconds, tokens_per_s.

    Raises:
        FileNotFoundError: a missing input.
        ValueError: no input, empty inputs, bad options, an unwritable ``out_dir``, a tokenizer without the
            needed eos/bos token, malformed JSONL (``JsonlError`` names file and line), non-UTF-8 text, or
            ``ShardError`` for an ``out_dir`` holding other shards / a worker that died.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    opts = TokenizeOptions(field, append_eos, add_bos, parse_special, shard_bytes, chunk_bytes)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    spec, tok_info = tokenizer_info(tokenizer, parse_special=parse_special)
    if append_eos and spec.eos_id is None:
        raise ValueError("the tokenizer has no eos token to end documents with; set one or pass append_eos=False")
    if add_bos and spec.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos token")
    dtype = token_dtype(tok_info["vocab_size"])
    files = discover_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs, fmt)
    stats = [(p.resolve(), kind, p.stat()) for p, kind in files]
    if all(st.st_size == 0 for _, _, st in stats):
        raise ValueError(f"every input is empty: {', '.join(str(p) for p, _, _ in stats)}")
    out = ensure_writable_dir(out_dir)
    units = plan_units([(p, kind, st.st_size) for p, kind, st in stats], opts.shard_bytes)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "tokenizer": tok_info,
        "options": asdict(opts),
        "inputs": [{"path": str(p), "kind": k, "size": st.st_size, "mtime_ns": st.st_mtime_ns} for p, k, st in stats],
        "units": units,
    }
    plan_hash = _canonical_hash(plan)
    finished = _prepare_dir(out, plan_hash, overwrite)
    if finished is not None:
        return _summary(out, finished, reused=len(finished["shards"]), seconds=time.perf_counter() - start)
    write_json_atomic(out / PLAN, {**plan, "plan_hash": plan_hash})
    names = [shard_name(i) for i in range(len(units))]
    entries = {n: e for n in names if (e := _finished(out, n, plan_hash, dtype)) is not None}
    todo = [(n, u) for n, u in zip(names, units, strict=True) if n not in entries]
    with tqdm(
        total=sum(unit_bytes(u) for _, u in todo), unit="B", unit_scale=True, desc="tokenize", disable=not progress
    ) as bar:
        entries.update(_execute(out, todo, (opts, spec, dtype.name, plan_hash), workers, bar))
    index = write_index(
        out,
        [entries[n] for n in names],
        dtype=dtype,
        tokenizer=tok_info,
        options=asdict(opts),
        plan_hash=plan_hash,
        input_bytes=sum(unit_bytes(u) for u in units),
    )
    for pattern in ("shard_*.tmp", ".shard_*.tmp", f".{INDEX}.*.tmp", f".{PLAN}.*.tmp"):  # left by killed runs
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    return _summary(out, index, reused=len(units) - len(todo), seconds=time.perf_counter() - start)


def _summary(out: Path, index: dict[str, Any], *, reused: int, seconds: float) -> dict[str, Any]:
    itemsize = np.dtype(index["dtype"]).itemsize
    return {
        "out_dir": str(out),
        "documents": index["n_docs"],
        "tokens": index["n_tokens"],
        "input_bytes": index["input_bytes"],
        "output_bytes": index["n_tokens"] * itemsize
        + (index["n_docs"] + len(index["shards"])) * OFFSET_DTYPE.itemsize,
        "shards": len(index["shards"]),
        "reused_shards": reused,
        "dtype": index["dtype"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(index["n_tokens"] / seconds, 1) if seconds > 0 else None,
    }
