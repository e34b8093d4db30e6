"""Bounded memory: tokenising and cleaning an input several times larger than the process may allocate.

A subprocess imports everything, warms up, then caps its address space (``RLIMIT_AS``) at what it uses plus
``HEADROOM``, and processes a JSONL file of ``INPUT = 4 * HEADROOM`` bytes. Reading that file into memory
under the same cap fails (the non-vacuity check). A word-level tokenizer keeps the test to seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from data_helpers import REPO_ROOT

HEADROOM_MB = 32
INPUT_MB = 4 * HEADROOM_MB

CHILD = textwrap.dedent(
    """
    import json, random, resource, sys, time
    from pathlib import Path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from myllm.data.clean import CleanConfig, clean_jsonl
    from myllm.data.shards import ShardSet
    from myllm.data.tokenize import tokenize_to_shards

    tmp, headroom, size = Path(sys.argv[1]), int(sys.argv[2]) << 20, int(sys.argv[3]) << 20
    words = [f"w{i:03d}" * 8 for i in range(200)]
    backend = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]").save_pretrained(tmp / "tok")
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(500))}) + "\\n" for _ in range(300)]
    n_docs, written = 0, 0
    with open(tmp / "big.jsonl", "w") as f:
        while written < size:
            f.write(lines[n_docs % len(lines)])
            written += len(lines[n_docs % len(lines)])
            n_docs += 1
    (tmp / "warm.jsonl").write_text("".join(lines[:20]))
    tokenize_to_shards([tmp / "warm.jsonl"], tmp / "warm", tmp / "tok", progress=False)
    clean_jsonl([tmp / "warm.jsonl"], tmp / "warm.clean.jsonl")

    def vm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))

    limit = vm() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    t0 = time.perf_counter()
    summary = tokenize_to_shards([tmp / "big.jsonl"], tmp / "shards", tmp / "tok", shard_bytes=16 << 20, progress=False)
    t1 = time.perf_counter()
    report = clean_jsonl([tmp / "big.jsonl"], tmp / "clean.jsonl", CleanConfig(min_alpha_ratio=0, max_digit_ratio=1))
    t2 = time.perf_counter()
    ok = ShardSet(tmp / "shards").n_docs == n_docs == summary["documents"]
    try:
        data = (tmp / "big.jsonl").read_text()
        naive = "fits"
    except MemoryError:
        naive = "MemoryError"
    print(json.dumps({"ok": ok, "kept": report["kept"], "dup": report["dropped"]["exact_duplicate"],
                      "near": report["dropped"]["near_duplicate"],
                      "n_docs": n_docs, "input": written, "limit_over_use": headroom, "naive": naive,
                      "seconds": [round(t1 - t0, 2), round(t2 - t1, 2)]}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures VmSize in /proc")
def test_tokenize_and_clean_in_bounded_memory(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "TOKENIZERS_PARALLELISM": "false",  # no extra threads (and their stacks) after the cap
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per extra arena
    }
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(HEADROOM_MB), str(INPUT_MB)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["input"] >= 4 * out["limit_over_use"]
    assert out["ok"] and out["dup"] == out["n_docs"] - 300 and out["kept"] + out["near"] == 300
    assert out["naive"] == "MemoryError"  # the cap is real: the input does not fit in it
