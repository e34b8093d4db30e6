"""``myllm data clean``: streaming JSONL cleaning (the seed's ``clean_data.py``), with a report of every drop.

Per record, in order: parse (a bad line is reported with file and line number and skipped), Unicode
normalisation (NFKC by default), length filters, character-ratio filters, exact deduplication (a hash of the
normalised text), near-duplicate removal (MinHash + LSH, :mod:`myllm.data.minhash`). The first record of a
duplicate group is kept. Records are streamed: memory holds hashes and signatures, never the texts, so files
larger than memory work. The output (and the JSON report) are written atomically: a failed run leaves the
output path as it was.

Usage::

    report = clean_jsonl(["raw.jsonl"], "clean.jsonl", CleanConfig(min_chars=50))
    report["dropped"]   # {"too_short": 12, "exact_duplicate": 3, "near_duplicate": 5, ...}
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from myllm.data.io import (
    JsonlError,
    PathLike,
    atomic_path,
    ensure_writable_dir,
    parse_jsonl_line,
    text_field,
    write_json_atomic,
)
from myllm.data.minhash import MinHashLSH

REASONS = (
    "bad_json",
    "no_text",
    "too_short",
    "too_long",
    "low_alpha_ratio",
    "high_digit_ratio",
    "exact_duplicate",
    "near_duplicate",
)
_MAX_BAD_LINES_LISTED = 100


@dataclass(frozen=True)
class CleanConfig:
    """Cleaning options (every filter can be switched off: ``min_chars=0``, ``max_chars=None``, ratios 0/1).

    ``alpha ratio`` = letters / non-whitespace characters (CJK characters count as letters);
    ``digit ratio`` = digits / non-whitespace characters (see :func:`char_ratios`).
    """

    field: str = "text"
    normalize: str | None = "NFKC"
    min_chars: int = 20
    max_chars: int | None = None
    min_alpha_ratio: float = 0.25
    max_digit_ratio: float = 0.5
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 0
    strict: bool = False  # stop at the first malformed line (nothing is written)

    def __post_init__(self) -> None:
        if self.normalize not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalize must be NFC, NFKC, NFD, NFKD or None, got {self.normalize!r}")
        if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < self.min_chars):
            raise ValueError(f"need 0 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        for name in ("min_alpha_ratio", "max_digit_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.near_threshold < 1.0:
            raise ValueError(f"near_threshold must be in (0, 1), got {self.near_threshold}")


def _char_class(ch: str) -> int:
    return 1 if ch.isalpha() else 2 if ch.isdigit() else 3 if ch.isspace() else 0


_ASCII_CLASS = np.array([_char_class(chr(c)) for c in range(128)], dtype=np.int8)
_CLASS_CACHE: dict[int, int] = {}  # non-ASCII code point -> class (0 other, 1 letter, 2 digit, 3 space)


def char_ratios(text: str) -> tuple[float, float]:
    """(letters, digits) as shares of the non-whitespace characters; (0, 0) for blank text.

    Letters are ``str.isalpha`` characters (CJK included), digits ``str.isdigit``; counted with numpy over
    the code points (ASCII by table, other characters once per distinct code point).
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ascii_mask = codes < 128
    counts = np.bincount(_ASCII_CLASS[codes[ascii_mask]], minlength=4)
    rest = codes[~ascii_mask]
    if rest.size:
        uniq, n = np.unique(rest, return_counts=True)
        for code, k in zip(uniq.tolist(), n.tolist(), strict=True):
            cls = _CLASS_CACHE.get(code)
            if cls is None:
                cls = _CLASS_CACHE[code] = _char_class(chr(code))
            counts[cls] += k
    visible = int(codes.size - counts[3])
    if visible == 0:
        return 0.0, 0.0
    return int(counts[1]) / visible, int(counts[2]) / visible


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """The first length / ratio filter ``text`` fails, or None."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    alpha, digits = char_ratios(text)
    if alpha < cfg.min_alpha_ratio:
        return "low_alpha_ratio"
    if digits > cfg.max_digit_ratio:
        return "high_digit_ratio"
    return None


def clean_jsonl(
    inputs: Sequence[PathLike] | PathLike,
    output: PathLike,
    config: CleanConfig | None = None,
    *,
    report_path: PathLike | None = None,
) -> dict[str, Any]:
    """Clean JSONL files into one JSONL file; return (and write) the report.

    Args:
        inputs: JSONL files, read in the given order.
        output: the cleaned JSONL (records keep their other fields; ``field`` holds the normalised text).
        config: the filters (default :class:`CleanConfig`).
        report_path: where the JSON report goes (default ``<output>.report.json``).

    Returns:
        The report: ``read``, ``kept``, ``dropped`` (count per reason), ``bad_lines`` (first 100 as
        ``{"file", "line", "error"}``), ``lsh`` (bands, rows), ``seconds``, ``config``.

    Raises:
        FileNotFoundError: a missing input.
        ValueError: no inputs, empty inputs, output equal to an input, an unwritable output directory, or (with
            ``strict``) a malformed line (``JsonlError`` with file and line).
    """
    cfg = config or CleanConfig()
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files to clean")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input {p} does not exist" if not p.exists() else f"input {p} is not a file")
    out = Path(output)
    if any(out.resolve() == p.resolve() for p in paths):
        raise ValueError(f"output {out} is also an input; write the cleaned data elsewhere")
    if all(p.stat().st_size == 0 for p in paths):
        raise ValueError(f"every input is empty: {', '.join(map(str, paths))}")
    ensure_writable_dir(out.parent if str(out.parent) else ".")
    report_file = Path(report_path) if report_path is not None else out.with_name(out.name + ".report.json")

    start = time.perf_counter()
    dropped = dict.fromkeys(REASONS, 0)
    bad_lines: list[dict[str, Any]] = []
    read = kept = 0
    exact: set[bytes] = set()
    lsh = (
        MinHashLSH(cfg.near_threshold, num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed)
        if cfg.near_dedup
        else None
    )

    def drop(reason: str) -> None:
        dropped[reason] += 1

    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fout:
        for path in paths:
            with open(path, "rb") as fin:
                for lineno, line in enumerate(fin, start=1):
                    if not line.strip():
                        continue
                    read += 1
                    reason = "bad_json"
                    try:
                        record = parse_jsonl_line(line, path, lineno, None)
                        reason = "no_text"
                        text = text_field(record, path, lineno, cfg.field)
                    except JsonlError as exc:
                        if cfg.strict:
                            raise
                        drop(reason)
                        if len(bad_lines) < _MAX_BAD_LINES_LISTED:
                            bad_lines.append({"file": str(path), "line": lineno, "error": exc.reason})
                        continue
                    if cfg.normalize:
                        text = unicodedata.normalize(cfg.normalize, text)
                    reason = filter_reason(text, cfg)
                    if reason is None and cfg.exact_dedup:
                        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                        if key in exact:
                            reason = "exact_duplicate"
                        else:
                            exact.add(key)
                    if reason is None and lsh is not None and not lsh.add_if_new(text):
                        reason = "near_duplicate"
                    if reason is not None:
                        drop(reason)
                        continue
                    record[cfg.field] = text
                    fout.write(json.dumps(record, ensure_ascii=False) + "\n")
                    kept += 1
    report = {
        "inputs": [str(p) for p in paths],
        "output": str(out),
        "read": read,
        "kept": kept,
        "dropped": dropped,
        "bad_lines": bad_lines,
        "bad_lines_total": dropped["bad_json"] + dropped["no_text"],
        "lsh": {"bands": lsh.bands, "rows": lsh.rows} if lsh is not None else None,
        "seconds": round(time.perf_counter() - start, 3),
        "config": asdict(cfg),
    }
    write_json_atomic(report_file, report)
    return report
