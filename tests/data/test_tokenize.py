"""``myllm data tokenize``: round trip, determinism, resume (simulated and a killed worker), bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import REPO_ROOT, read_texts, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from myllm.cli import main
from myllm.data.inputs import discover_inputs, plan_units, unit_segments
from myllm.data.io import JsonlError
from myllm.data.shards import INDEX, ShardError, ShardSet
from myllm.data.tokenize import tokenize_to_shards
from myllm.data.tokenizer import load_tokenizer


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _decode_docs(shards: Path, tok) -> list[str]:
    docs = ShardSet(shards).documents()
    assert all(int(d[-1]) == tok.eos_token_id for d in docs)  # every document ends with eos
    return [tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in docs]


def test_round_trip_jsonl(tmp_path, small_jsonl, tok_dir, shard_dir):
    tok = load_tokenizer(tok_dir)
    texts = read_texts(small_jsonl)
    assert _decode_docs(shard_dir, tok) == texts
    index = json.loads((shard_dir / INDEX).read_text())
    assert index["dtype"] == "uint16" and index["n_docs"] == len(texts) and len(index["shards"]) > 5
    literal = ShardSet(shard_dir).documents()[-1]
    assert tok.eos_token_id not in literal[:-1].tolist()  # "<|im_end|>" inside a text stays text
    special = tokenize_to_shards([small_jsonl], tmp_path / "sp", tok_dir, parse_special=True, progress=False)
    assert special["documents"] == len(texts)
    assert tok.eos_token_id in ShardSet(tmp_path / "sp").documents()[-1][:-1].tolist()


def test_round_trip_text_files_and_dirs(tmp_path, tok_dir, corpus_texts):
    tok = load_tokenizer(tok_dir)
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    long_text = "\n".join(corpus_texts[:40]) + "\nÜnïcödé 世界 🙂 at chunk edges " * 30
    (d / "a.txt").write_text(long_text, encoding="utf-8")
    (d / "sub" / "b.md").write_text("# Title\n\nbody text without final newline", encoding="utf-8")
    write_jsonl(d / "sub" / "c.jsonl", corpus_texts[40:45])
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    (d / ".hidden.txt").write_text("hidden")
    tokenize_to_shards([d], tmp_path / "out", tok_dir, chunk_bytes=97, shard_bytes=5000, progress=False)
    got = _decode_docs(tmp_path / "out", tok)
    assert got == [long_text, "# Title\n\nbody text without final newline", *corpus_texts[40:45]]


def test_deterministic_any_worker_count(tmp_path, small_jsonl, tok_dir, shard_dir):
    two = tokenize_to_shards([small_jsonl], tmp_path / "w2", tok_dir, shard_bytes=20_000, workers=2, progress=False)
    assert two["shards"] > 2 and two["reused_shards"] == 0
    assert _files(tmp_path / "w2") == _files(shard_dir)  # byte-identical: tokens, offsets, markers, index
    again = tokenize_to_shards([small_jsonl], tmp_path / "w2", tok_dir, shard_bytes=20_000, progress=False)
    assert again["reused_shards"] == two["shards"]  # finished directory: nothing redone


def test_resume_after_partial_run(tmp_path, small_jsonl, tok_dir, shard_dir):
    out = tmp_path / "resume"
    shutil.copytree(shard_dir, out)
    (out / INDEX).unlink()
    (out / "shard_00002.json").unlink()  # shard 2 was being written: no marker, half its tokens
    tokens = out / "shard_00002.tokens"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    (out / "shard_00004.tokens").write_bytes(b"")  # marker but wrong size: redone too
    (out / "shard_00005.tokens.tmp").write_bytes(b"junk")  # a worker's unfinished temporary
    with pytest.raises(ShardError, match="did not finish"):
        ShardSet(out)
    kept = {p: p.stat().st_mtime_ns for p in out.glob("shard_0000[0136].tokens")}
    summary = tokenize_to_shards([small_jsonl], out, tok_dir, shard_bytes=20_000, progress=False)
    assert summary["reused_shards"] == summary["shards"] - 2
    assert _files(out) == _files(shard_dir)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished shards were not rewritten


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find worker processes")
def test_resume_after_killed_worker(tmp_path, corpus_texts, tok_dir):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_texts)  # ~1.7 MB, ~85 shards of 20,000 bytes
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [str(src), "-o", str(out), "--tokenizer", str(tok_dir), "--shard-mb", str(20_000 / 2**20)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "myllm", "data", "tokenize", *args, "--workers", "2", "--no-progress"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if list(out.glob("shard_*.json")) and _children(proc.pid):
            killed = _children(proc.pid)[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert killed is not None, "the run finished before a worker could be killed"
    assert proc.returncode == 2 and "worker process died" in err and "resume" in err
    assert not (out / INDEX).exists()
    resumed = tokenize_to_shards([src], out, tok_dir, shard_bytes=20_000, workers=2, progress=False)
    assert 0 < resumed["reused_shards"] < resumed["shards"]
    tokenize_to_shards([src], tmp_path / "ref", tok_dir, shard_bytes=20_000, workers=2, progress=False)
    assert _files(out) == _files(tmp_path / "ref")


def test_cli_tokenize_and_verify(tmp_path, small_jsonl, tok_dir, capsys):
    out = tmp_path / "cli"
    assert (
        main(["data", "tokenize", str(small_jsonl), "-o", str(out), "--tokenizer", str(tok_dir), "--no-progress"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == len(read_texts(small_jsonl)) and summary["tokens"] > 0 and summary["seconds"] > 0
    assert main(["data", "verify", str(out), "--tokenizer", str(tok_dir), "--full"]) == 0
    assert "ok" in capsys.readouterr().out


def test_bad_input(tmp_path, small_jsonl, tok_dir, corpus_texts):
    lines = [json.dumps({"text": t}) for t in corpus_texts[:300]]
    lines[249] = '{"text": "unterminated'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:250: invalid JSON"):
        tokenize_to_shards([bad], tmp_path / "o1", tok_dir, shard_bytes=10_000, workers=2, progress=False)
    assert not (tmp_path / "o1" / INDEX).exists()
    with pytest.raises(JsonlError, match=r":1: no 'body' field"):
        tokenize_to_shards([small_jsonl], tmp_path / "o2", tok_dir, field="body", progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="every input is empty"):
        tokenize_to_shards([tmp_path / "empty.jsonl"], tmp_path / "o3", tok_dir, progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no input files"):
        tokenize_to_shards([tmp_path / "nothing"], tmp_path / "o3", tok_dir, progress=False)
    with pytest.raises(FileNotFoundError):
        tokenize_to_shards([tmp_path / "missing.jsonl"], tmp_path / "o3", tok_dir, progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not writable|existing file"):
        tokenize_to_shards([small_jsonl], tmp_path / "afile" / "out", tok_dir, progress=False)
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        tokenize_to_shards([small_jsonl], tmp_path / "o3", tmp_path / "nothing", progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        tokenize_to_shards([tmp_path / "latin1.txt"], tmp_path / "o4", tok_dir, progress=False)
    with pytest.raises(ValueError, match="workers"):
        tokenize_to_shards([small_jsonl], tmp_path / "o5", tok_dir, workers=0, progress=False)


def test_refuses_other_shards_unless_overwrite(tmp_path, small_jsonl, tok_dir, corpus_texts):
    out = tmp_path / "o"
    tokenize_to_shards([small_jsonl], out, tok_dir, progress=False)
    other = write_jsonl(tmp_path / "other.jsonl", corpus_texts[:10])
    with pytest.raises(ShardError, match="other inputs"):
        tokenize_to_shards([other], out, tok_dir, progress=False)
    assert ShardSet(out).n_docs == len(read_texts(small_jsonl))  # left as it was
    tokenize_to_shards([other], out, tok_dir, overwrite=True, progress=False)
    assert ShardSet(out).n_docs == 10


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(
        tmp_path / "t"
    )
    src = write_jsonl(tmp_path / "in.jsonl", ["w1 w69999 w65536", "w3"])
    tokenize_to_shards([src], tmp_path / "o", tmp_path / "t", progress=False)
    shards = ShardSet(tmp_path / "o")
    assert shards.dtype == np.dtype("<u4")
    assert [d.tolist() for d in shards.documents()] == [[3, 70001, 65538, 1], [5, 1]]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 60), min_size=0, max_size=30), min_size=1, max_size=4),
    st.integers(1, 400),
)
def test_plan_covers_every_line_once(files, shard_bytes):
    """However files are cut into units, every line is read exactly once and in order."""
    with tempfile.TemporaryDirectory() as d:
        expected, sized = [], []
        for k, lengths in enumerate(files):
            texts = [f"{k}-{i}-" + "x" * n for i, n in enumerate(lengths)]
            path = write_jsonl(Path(d) / f"f{k}.jsonl", texts)
            expected += texts
            sized.append((path, "jsonl", path.stat().st_size))
        assert [p for p, _ in discover_inputs([d])] == [p for p, _, _ in sized]
        units = plan_units(sized, shard_bytes)
        got = [seg[0] for unit in units for seg in unit_segments(unit, "text", 1 << 20)]
        assert got == expected
        for unit in units[:-1]:
            assert sum(p["end"] - p["start"] for p in unit) >= shard_bytes
