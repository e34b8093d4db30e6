"""Input side of ``myllm data tokenize``: find input files, cut them into units, stream their documents.

A *unit* is a list of pieces ``{"path", "kind", "start", "end"}`` of about ``shard_bytes`` input bytes and
becomes one shard. A JSONL file is split at byte offsets (a line belongs to the piece in which it starts, so
planning never scans a file); small files are grouped; a plain-text file is one document and never split.
Documents are streamed as *segments* ``(text, starts_document, ends_document)``.
"""

from __future__ import annotations

import codecs
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from myllm.data.io import JsonlError, PathLike, line_number_at, parse_jsonl_line

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")

# A segment of text to encode: (text, starts a document, ends a document). JSONL lines are one segment each;
# a plain-text file is cut into segments at line breaks and encoded piece by piece.
Segment = tuple[str, bool, bool]


def discover_inputs(inputs: Sequence[PathLike], fmt: str = "auto") -> list[tuple[Path, str]]:
    """Expand files and directories into a sorted list of ``(path, kind)``, kind "jsonl" or "text".

    Directories are walked recursively for files with a JSONL or text suffix (hidden entries skipped); files
    named explicitly are JSONL by suffix, else text (``fmt`` forces one kind for all).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an unknown ``fmt``, or no input files at all.
    """
    if fmt not in ("auto", "jsonl", "text"):
        raise ValueError(f"format must be auto, jsonl or text, got {fmt!r}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if f.startswith("."):
                        continue
                    if f.endswith(JSONL_SUFFIXES) or f.endswith(TEXT_SUFFIXES):
                        found.append((Path(dirpath, f), _kind(f, fmt)))
        elif p.is_file():
            found.append((p, _kind(p.name, fmt)))
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    if not found:
        raise ValueError(
            f"no input files in {', '.join(map(str, inputs))} (JSONL: {JSONL_SUFFIXES}, text: {TEXT_SUFFIXES})"
        )
    return found


def _kind(name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if name.endswith(JSONL_SUFFIXES) or name.endswith(".json") else "text"


def plan_units(files: Sequence[tuple[Path, str, int]], shard_bytes: int) -> list[list[dict[str, Any]]]:
    """Cut ``(path, kind, size)`` files into units of about ``shard_bytes``; a unit is a list of pieces.

    A piece is ``{"path", "kind", "start", "end"}`` (byte range; a JSONL line belongs to the piece in which it
    starts). Text files are whole pieces. Deterministic in the file list and sizes.
    """
    units: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    cur_bytes = 0
    for path, kind, size in files:
        if kind == "text":
            if cur and cur_bytes + size > shard_bytes:
                units.append(cur)
                cur, cur_bytes = [], 0
            cur.append({"path": str(path), "kind": kind, "start": 0, "end": size})
            cur_bytes += size
        else:
            pos = 0
            while True:
                end = min(size, pos + max(1, shard_bytes - cur_bytes))
                cur.append({"path": str(path), "kind": kind, "start": pos, "end": end})
                cur_bytes += end - pos
                pos = end
                if cur_bytes >= shard_bytes:
                    units.append(cur)
                    cur, cur_bytes = [], 0
                if pos >= size:
                    break
        if cur_bytes >= shard_bytes:
            units.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        units.append(cur)
    return units


def _jsonl_segments(piece: dict[str, Any], field: str) -> Iterator[Segment]:
    path, start, end = piece["path"], piece["start"], piece["end"]
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line running through `start` belongs to the previous piece
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                text = parse_jsonl_line(line, path, 0, field)
            except JsonlError as exc:
                raise JsonlError(path, line_number_at(path, line_start), exc.reason) from None
            yield text, True, True


def _text_segments(piece: dict[str, Any], chunk_bytes: int) -> Iterator[Segment]:
    """A plain-text file as one document, decoded incrementally and cut after line breaks into chunks."""
    path = piece["path"]
    decoder = codecs.getincrementaldecoder("utf-8")()
    first, offset, carry = True, 0, ""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            last = not block
            try:
                text = carry + decoder.decode(block, final=last)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text (near byte {offset + max(exc.start, 0)})") from None
            offset += len(block)
            cut = len(text) if last else (text.rfind("\n") + 1 or len(text))  # no line break: one long line
            seg, carry = text[:cut], text[cut:]
            if seg or first or last:
                yield seg, first, last
                first = False
            if last:
                return


def unit_segments(unit: list[dict[str, Any]], field: str, chunk_bytes: int) -> Iterator[Segment]:
    """The segments of every piece of ``unit`` in order."""
    for piece in unit:
        if piece["kind"] == "jsonl":
            yield from _jsonl_segments(piece, field)
        else:
            yield from _text_segments(piece, chunk_bytes)


def batched(segments: Iterable[Segment], chunk_bytes: int, max_items: int = 4096) -> Iterator[list[Segment]]:
    batch: list[Segment] = []
    size = 0
    for seg in segments:
        batch.append(seg)
        size += len(seg[0])
        if size >= chunk_bytes or len(batch) >= max_items:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def unit_bytes(unit: list[dict[str, Any]]) -> int:
    """Input bytes covered by a unit."""
    return sum(p["end"] - p["start"] for p in unit)


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead (exceptions re-raised here).

    The tokenizer releases the GIL while encoding, so reading and parsing the next batch overlaps with it.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(_Raised(exc))

    thread = threading.Thread(target=produce, name="myllm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
