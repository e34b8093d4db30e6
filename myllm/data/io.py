"""Small file helpers shared by the data tools: atomic writes, writable-directory checks, JSONL reading.

Everything that writes a result goes through :func:`atomic_path` (write to a temporary name in the same
directory, then ``os.replace``), so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


class JsonlError(ValueError):
    """A malformed JSONL line; the message names the file and the 1-based line number."""

    def __init__(self, path: PathLike, line: int, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, int, str]]:  # picklable: raised in worker processes
        return (JsonlError, (self.path, self.line, self.reason))


def ensure_writable_dir(path: PathLike) -> Path:
    """Create ``path`` (and parents) if needed and check that files can be created in it.

    Raises:
        ValueError: if ``path`` is a file, cannot be created, or is not writable.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output directory {p} is an existing file")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"output directory {p} is not writable: {exc.strerror or exc}") from exc
    return p


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def replace_dir(src: PathLike, dst: PathLike) -> None:
    """Put the finished directory ``src`` in place of ``dst`` (a previous ``dst`` is replaced as a whole).

    Both must be in the same parent directory: the swap is two renames, so ``dst`` is never half-written.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object from ``path``; errors name ``what`` the file is supposed to be."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable {what}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {what} is not a JSON object")
    return obj


def parse_jsonl_line(line: bytes | str, path: PathLike, lineno: int, field: str | None) -> Any:
    """Parse one JSONL line; with ``field`` return that string field of the object.

    Raises:
        JsonlError: invalid JSON, not an object, a missing field or a non-string field.
    """
    try:
        obj = json.loads(line)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
        raise JsonlError(path, lineno, f"invalid JSON ({exc})") from None
    return obj if field is None else text_field(obj, path, lineno, field)


def text_field(obj: Any, path: PathLike, lineno: int, field: str) -> str:
    """The string ``field`` of a parsed JSONL record.

    Raises:
        JsonlError: not an object, a missing field or a non-string field.
    """
    if not isinstance(obj, dict):
        raise JsonlError(path, lineno, f"expected a JSON object with a {field!r} field, got {type(obj).__name__}")
    if field not in obj:
        raise JsonlError(path, lineno, f"no {field!r} field (fields: {', '.join(sorted(obj)) or 'none'})")
    value = obj[field]
    if not isinstance(value, str):
        raise JsonlError(path, lineno, f"field {field!r} is {type(value).__name__}, not a string")
    return value


def iter_jsonl(path: PathLike, field: str | None = None) -> Iterator[tuple[int, Any]]:
    """Stream ``(line_number, value)`` from a JSONL file, skipping blank lines; see :func:`parse_jsonl_line`."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, parse_jsonl_line(line, path, lineno, field)


def line_number_at(path: PathLike, offset: int) -> int:
    """1-based number of the line that starts at byte ``offset`` (counts newlines before it; for error messages)."""
    count, pos = 0, 0
    with open(path, "rb") as f:
        while pos < offset:
            chunk = f.read(min(1 << 20, offset - pos))
            if not chunk:
                break
            count += chunk.count(b"\n")
            pos += len(chunk)
    return count + 1
