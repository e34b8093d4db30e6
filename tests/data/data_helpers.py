"""Helpers of the data tests (importable as ``data_helpers``: tests/data is on sys.path under pytest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def read_texts(path: Path, field: str = "text") -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[field] for line in f if line.strip()]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


def run_cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m myllm ARGS`` with this checkout on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "myllm", *args], cwd=cwd, env=env, capture_output=True, text=True, **kw
    )
