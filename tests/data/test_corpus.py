"""The stdlib docstring corpus: content, determinism, split, no imports, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from myllm.data.corpus import build_corpus, is_heldout, stdlib_docstrings


def _fake_stdlib(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "idlelib").mkdir()
    marker = root.parent / "imported.txt"
    (root / "mod_a.py").write_text(
        f'"""Module A does things with words and more words for the corpus."""\n'
        f"open({str(marker)!r}, 'w').write('side effect')\n"
        'def f():\n    """Return the answer after a long and careful computation of it."""\n'
        'def g():\n    """short"""\n'
    )
    (root / "pkg" / "__init__.py").write_text(
        'class C:\n    """A class whose docstring is long enough to be kept in the corpus."""\n'
        '    def m(self):\n        """Return the answer after a long and careful computation of it."""\n'
    )
    (root / "test" / "test_x.py").write_text('"""A test module docstring that must never be part of the corpus."""\n')
    (root / "idlelib" / "x.py").write_text('"""An IDLE module docstring that must never be part of the corpus."""\n')
    (root / "broken.py").write_text('"""Unparsable file docstring that is long enough to count."""\ndef (:\n')
    return marker


def test_docstrings_parsed_not_imported_and_skips(tmp_path):
    marker = _fake_stdlib(tmp_path / "lib")
    docs = list(stdlib_docstrings(tmp_path / "lib", min_chars=40))
    assert docs == [
        "Module A does things with words and more words for the corpus.",
        "Return the answer after a long and careful computation of it.",  # once: deduplicated
        "A class whose docstring is long enough to be kept in the corpus.",
    ]
    assert len(docs) == len(set(docs)) == 3
    assert not marker.exists()  # parsed with ast, never imported


def test_real_corpus(corpus, corpus_texts):
    held = [json.loads(line)["text"] for line in open(corpus.heldout_path, encoding="utf-8")]
    assert corpus.train_docs == len(corpus_texts) and corpus.heldout_docs == len(held)
    assert corpus.train_docs > 1000 and corpus.heldout_docs > 20 and corpus.bytes > 500_000
    assert not set(held) & set(corpus_texts)
    assert all(len(t) >= 40 for t in corpus_texts + held)
    assert 0.01 < corpus.heldout_docs / (corpus.train_docs + corpus.heldout_docs) < 0.15
    assert all(is_heldout(t, 0.05) for t in held) and not any(is_heldout(t, 0.05) for t in corpus_texts[:500])
    # real English prose from the stdlib, not code or test data
    joined = " ".join(corpus_texts)
    assert joined.count(" the ") > 1000 and "Return" in joined


def test_deterministic(tmp_path):
    _fake_stdlib(tmp_path / "lib")
    a = build_corpus(tmp_path / "a", root=tmp_path / "lib", heldout_fraction=0.5)
    b = build_corpus(tmp_path / "b", root=tmp_path / "lib", heldout_fraction=0.5)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (a.train_docs, a.heldout_docs, a.bytes) == (b.train_docs, b.heldout_docs, b.bytes)
    assert a.train_docs + a.heldout_docs == 3


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        build_corpus(tmp_path / "o", heldout_fraction=1.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without sources"):
        build_corpus(tmp_path / "o", root=tmp_path / "empty")
    assert not (tmp_path / "o" / "train.jsonl").exists()  # nothing written half-way
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="existing file|not writable"):
        build_corpus(tmp_path / "file" / "sub")
