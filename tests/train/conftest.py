"""Fixtures of the training tests (helpers live in train_helpers.py, importable from every test folder here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import build_tokenizer, make_conversations, make_texts, save_tiny_model, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": t} for t in make_texts(64)])


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    convs = make_conversations(48)
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", [{"conversations": c} for c in convs])


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> str:
    """One fresh TORCH_EXTENSIONS_DIR per test session (unless the CI script already set one): DeepSpeed's CPU
    comm extension is built once and a stale lock of a killed build can never hang a later run."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one intra-op thread; on a shared, loaded 2-core machine two threads that spin
    against each other made these tests ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
