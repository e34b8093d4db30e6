"""A small corpus of real English text built at run time from the Python standard library's docstrings.

It is present wherever Python is, so the demo and the tests need no download and ship no data. Source files
are *parsed* with :mod:`ast`, never imported (importing stdlib modules has side effects: ``antigravity``
opens a browser, ``this`` prints). Test suites, IDLE, the turtle demos, bundled third-party packages and the
codec tables (``encodings``, boilerplate) are skipped. Walk order is sorted, so the corpus is identical across
runs on one Python version; the train / held-out split is by a hash of each text, so it does not depend on
order either.

Usage::

    stats = build_corpus("data/corpus")   # data/corpus/train.jsonl, data/corpus/heldout.jsonl
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from myllm.data.io import PathLike, atomic_path, ensure_writable_dir

# Directory names never walked: test suites and their data, GUI demos, third-party packages, codec tables.
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages", "encodings"}
    | {"ensurepip", "__pycache__", "__phello__"}
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class CorpusStats:
    """What :func:`build_corpus` wrote."""

    train_path: str
    heldout_path: str
    files: int  # stdlib source files parsed
    train_docs: int
    heldout_docs: int
    chars: int  # characters over both splits
    bytes: int  # UTF-8 bytes of the texts over both splits
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library sources (the base install's, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: PathLike | None = None) -> list[Path]:
    """Sorted ``.py`` files under the stdlib ``root``, skipping :data:`SKIP_DIRS` and hidden/config dirs."""
    base = Path(root) if root is not None else stdlib_root()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test_"))
    return sorted(out)


def stdlib_docstrings(root: PathLike | None = None, *, min_chars: int = 40) -> Iterator[str]:
    """Yield the docstrings (module, class, function; cleaned of indentation) of the stdlib, deduplicated.

    Args:
        root: stdlib directory (default: this interpreter's).
        min_chars: docstrings shorter than this (``"Return self."``) are skipped.
    """
    seen: set[bytes] = set()
    for path in stdlib_source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # unparsable or unreadable file: not part of the corpus
            continue
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars:
                    key = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
                    if key not in seen:
                        seen.add(key)
                        yield doc


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic split: a text is held out when a hash of it falls in the first ``fraction`` of the range."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def build_corpus(
    out_dir: PathLike, *, heldout_fraction: float = 0.05, min_chars: int = 40, root: PathLike | None = None
) -> CorpusStats:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (lines ``{"text": ...}``) of stdlib docstrings into ``out_dir``.

    Args:
        out_dir: created if needed; both files are written atomically.
        heldout_fraction: expected share of documents in the held-out split, in (0, 1).
        min_chars: minimum docstring length.
        root: stdlib directory to read (default: this interpreter's).

    Raises:
        ValueError: a bad fraction, an unwritable ``out_dir``, or no docstrings found (e.g. a stdlib shipped
            without sources).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    start = time.perf_counter()
    out = ensure_writable_dir(out_dir)
    train_path, heldout_path = out / "train.jsonl", out / "heldout.jsonl"
    counts = {"train": 0, "heldout": 0}
    chars = nbytes = 0
    files = len(stdlib_source_files(root))
    with atomic_path(train_path) as train_tmp, atomic_path(heldout_path) as heldout_tmp:
        with open(train_tmp, "w", encoding="utf-8") as ftrain, open(heldout_tmp, "w", encoding="utf-8") as fheld:
            for doc in stdlib_docstrings(root, min_chars=min_chars):
                split = "heldout" if is_heldout(doc, heldout_fraction) else "train"
                (fheld if split == "heldout" else ftrain).write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                counts[split] += 1
                chars += len(doc)
                nbytes += len(doc.encode("utf-8"))
        if counts["train"] == 0 or counts["heldout"] == 0:
            raise ValueError(
                f"the standard library at {root or stdlib_root()} gave {counts['train']} train and "
                f"{counts['heldout']} held-out docstrings; is it installed without sources?"
            )
    return CorpusStats(
        train_path=str(train_path),
        heldout_path=str(heldout_path),
        files=files,
        train_docs=counts["train"],
        heldout_docs=counts["heldout"],
        chars=chars,
        bytes=nbytes,
        seconds=time.perf_counter() - start,
    )
