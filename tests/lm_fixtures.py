"""Fixtures shared by the eval, generation, plot and command tests: a small trained tokenizer, a tiny MyLLM
whose vocabulary fits it, and both saved together as a model directory.

Import the fixtures into a ``conftest.py`` (``from lm_fixtures import *``); everything is built once per session.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

# Real English text without building the whole stdlib corpus: the docstrings of a few stdlib modules.
_MODULES = ("json", "textwrap", "string", "difflib", "argparse", "collections", "functools", "pathlib", "random")


def stdlib_texts() -> list[str]:
    """Paragraphs of a few stdlib modules' docstrings (deterministic for one Python version)."""
    out: list[str] = []
    for name in _MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        out.extend(p.strip() for p in doc.split("\n\n") if len(p.strip()) > 20)
    return out


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def lm_texts() -> list[str]:
    return stdlib_texts()


@pytest.fixture(scope="session")
def lm_tokenizer(tmp_path_factory, lm_texts):
    from myllm.data.tokenizer import train_tokenizer

    extra = ["Grüße, 世界! naïve café — “quotes” ½ 🙂"] * 3
    return train_tokenizer(lm_texts + extra, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=320)


@pytest.fixture(scope="session")
def lm_model(lm_tokenizer):
    """A tiny random MyLLM (float32, eval mode) with exactly as many logits as the tokenizer has tokens."""
    from utils import tiny_myllm

    return tiny_myllm(vocab_size=len(lm_tokenizer), max_position_embeddings=128)


@pytest.fixture(scope="session")
def lm_model_dir(tmp_path_factory, lm_model, lm_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    lm_model.save_pretrained(out)
    lm_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lm_heldout(tmp_path_factory, lm_texts) -> Path:
    """A held-out JSONL file: 12 documents, a blank line, an empty and a non-ASCII document."""
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    write_jsonl(path, lm_texts[:10] + ["", "Grüße, 世界! naïve café 🙂"])
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"text": lm_texts[-1]}) + "\n")
    return path
