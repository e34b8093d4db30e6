"""Reading and validating JSONL training files (small corpora, read into memory).

Every problem is reported with its file and line number before any training starts: a missing file, a line
that is not JSON, a record without the expected field or with the wrong type, an empty dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Message = dict[str, str]


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed record)`` for every non-blank line of a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _record_field(path: Path, lineno: int, record: Any, field: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"{path}:{lineno}: missing field {field!r} (keys: {', '.join(sorted(record)) or 'none'})")
    return record[field]


def read_texts(paths: list[str], field: str = "text") -> list[str]:
    """All ``record[field]`` strings of the JSONL files, in order. Empty strings are kept out."""
    texts: list[str] = []
    for p in map(Path, paths):
        for lineno, record in _records(p):
            value = _record_field(p, lineno, record, field)
            if not isinstance(value, str):
                raise ValueError(f"{p}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
            if value:
                texts.append(value)
    if not texts:
        raise ValueError(f"empty dataset: no non-empty {field!r} records in {', '.join(paths)}")
    return texts


def read_conversations(paths: list[str], field: str = "conversations") -> list[list[Message]]:
    """All conversations (lists of ``{"role", "content"}`` with at least one assistant turn) of the files."""
    convs: list[list[Message]] = []
    for p in map(Path, paths):
        for lineno, record in _records(p):
            conv = _record_field(p, lineno, record, field)
            where = f"{p}:{lineno}"
            if not isinstance(conv, list) or not conv:
                raise ValueError(f"{where}: {field!r} must be a non-empty list of messages")
            for i, msg in enumerate(conv):
                if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                    raise ValueError(f"{where}: message {i} needs a string 'role'")
                if not isinstance(msg.get("content"), str):
                    raise ValueError(f"{where}: message {i} needs a string 'content'")
            if not any(m["role"] == "assistant" for m in conv):
                raise ValueError(f"{where}: conversation has no assistant message (nothing to train on)")
            convs.append([{"role": m["role"], "content": m["content"]} for m in conv])
    if not convs:
        raise ValueError(f"empty dataset: no conversations in {', '.join(paths)}")
    return convs
