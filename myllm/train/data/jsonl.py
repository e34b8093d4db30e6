"""Reading and validating JSONL training files (small corpora, read into memory).

Every problem is reported with its file and line number before any training starts (through
``myllm.data.io``'s JSONL reader, shared with the data tools): a missing file, a line that is not JSON, a record
without the expected field or with the wrong type, an empty dataset.
"""

from __future__ import annotations

from pathlib import Path

from myllm.data.io import JsonlError, iter_jsonl

Message = dict[str, str]


def _check_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def read_texts(paths: list[str], field: str = "text") -> list[str]:
    """All ``record[field]`` strings of the JSONL files, in order. Empty strings are kept out."""
    texts = [text for p in paths for _, text in iter_jsonl(_check_file(Path(p)), field) if text]
    if not texts:
        raise ValueError(f"empty dataset: no non-empty {field!r} records in {', '.join(map(str, paths))}")
    return texts


def _conversation(record: object, path: Path, lineno: int, field: str) -> list[Message]:
    if not isinstance(record, dict) or field not in record:
        raise JsonlError(path, lineno, f"expected a JSON object with a {field!r} field")
    conv = record[field]
    if not isinstance(conv, list) or not conv:
        raise JsonlError(path, lineno, f"{field!r} must be a non-empty list of messages")
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise JsonlError(path, lineno, f"message {i} needs a string 'role'")
        if not isinstance(msg.get("content"), str):
            raise JsonlError(path, lineno, f"message {i} needs a string 'content'")
    if not any(m["role"] == "assistant" for m in conv):
        raise JsonlError(path, lineno, "conversation has no assistant message (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def read_conversations(paths: list[str], field: str = "conversations") -> list[list[Message]]:
    """All conversations (lists of ``{"role", "content"}`` with at least one assistant turn) of the files."""
    convs = []
    for p in map(Path, paths):
        for lineno, record in iter_jsonl(_check_file(p)):
            convs.append(_conversation(record, p, lineno, field))
    if not convs:
        raise ValueError(f"empty dataset: no conversations in {', '.join(map(str, paths))}")
    return convs
