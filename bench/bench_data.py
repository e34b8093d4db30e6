"""Data pipeline throughput: ``myllm data tokenize`` vs a bare ``tokenizers`` loop; reader vs training.

1. Tokenisation (tokens/s) on the same text, interleaved rounds, medians:
   * baselines: bare ``Tokenizer.encode_batch`` / ``encode_batch_fast`` loops over the texts already in
     memory, one thread (the shard writer uses ``encode_batch_fast``);
   * ``tokenize_to_shards`` (what ``myllm data tokenize`` runs) with 1 and 2 workers: reading JSONL, encoding,
     writing shards and index. Ratio per worker = tokens/s / workers / baseline (target >= 0.8).
2. Reading (windows/s): ``ShardSource`` packed windows vs the consumption rate of a training step (forward,
   backward, AdamW) of a small ``LlamaForCausalLM`` at the same ``seq_len`` (target >= 20x).

The text is the stdlib docstring corpus repeated to ``--mb`` megabytes; the tokenizer a 6400-token BPE trained
on it (MiniMind's size). Run: ``python bench/bench_data.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # baseline and in-process worker both single-threaded

import torch  # noqa: E402

from myllm.data.corpus import build_corpus  # noqa: E402
from myllm.data.tokenize import tokenize_to_shards  # noqa: E402
from myllm.data.tokenizer import train_tokenizer  # noqa: E402
from myllm.data.windows import ShardSource  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_encode(backend, texts: list[str], fast: bool, batch: int = 1000) -> tuple[int, float, float]:
    """The baseline: ``encode_batch`` (or ``encode_batch_fast``, no offsets) over texts already in memory.

    Returns tokens, wall seconds, CPU seconds.
    """
    encode = backend.encode_batch_fast if fast else backend.encode_batch
    start, cpu = time.perf_counter(), cpu_seconds()
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(e.ids) for e in encode(texts[i : i + batch], add_special_tokens=False))
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def shard_run(src: Path, out: Path, tok: Path, workers: int) -> tuple[int, float, float]:
    """``tokenize_to_shards`` from JSONL on disk to a finished shard directory: tokens, wall s, CPU s."""
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = tokenize_to_shards([src], out, tok, workers=workers, shard_bytes=1 << 20, overwrite=True, progress=False)
    return summary["tokens"], time.perf_counter() - start, cpu_seconds() - cpu


def train_rate(vocab: int, seq_len: int, batch: int, hidden: int, layers: int, steps: int) -> float:
    """Windows per second consumed by fwd + bwd + AdamW of a small LlamaForCausalLM (median step time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 + 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=seq_len,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq_len))
    pos = torch.arange(seq_len).expand(batch, -1)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])  # first step warms up


def read_rate(shards: Path, seq_len: int, n: int, num_workers: int) -> float:
    src = ShardSource(shards, seq_len, seed=0, num_workers=num_workers)
    it = iter(src)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="megabytes of JSONL text to tokenise")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.rounds = 1.0, 1

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus = build_corpus(tmp / "corpus")
        base = Path(corpus.train_path).read_bytes()
        reps = max(1, round(args.mb * 2**20 / len(base)))
        src = tmp / "text.jsonl"
        src.write_bytes(base * reps)
        text_mb = src.stat().st_size / 2**20
        texts = [json.loads(line)["text"] for line in src.read_text(encoding="utf-8").splitlines()]
        tok = train_tokenizer([Path(corpus.train_path)], tmp / "tok", vocab_size=6400)
        backend = tok.backend_tokenizer
        backend.encode_special_tokens = True  # as the shard writer encodes documents

        rates: dict[str, list[float]] = {}  # tokens per wall second
        cpu_rates: dict[str, list[float]] = {}  # tokens per CPU second (robust to other load on the machine)
        for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
            runs = {name: bare_encode(backend, texts, fast) for name, fast in (("bare", False), ("bare_fast", True))}
            runs.update({f"w{w}": shard_run(src, tmp / f"shards{w}", tmp / "tok", w) for w in (1, 2)})
            for name, (n, wall, cpu) in runs.items():
                rates.setdefault(name, []).append(n / wall)
                cpu_rates.setdefault(name, []).append(n / cpu)
        med = {k: statistics.median(v) for k, v in rates.items()}
        cmed = {k: statistics.median(v) for k, v in cpu_rates.items()}

        vocab, T = len(tok), args.seq_len
        train = train_rate(vocab, T, batch=8, hidden=256, layers=4, steps=2 if args.quick else 5)
        reader0 = read_rate(tmp / "shards1", T, 2000 if args.quick else 10000, 0)
        reader2 = read_rate(tmp / "shards1", T, 2000 if args.quick else 10000, 2)

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {os.cpu_count()} CPUs; {load}")
    print(f"text: {text_mb:.1f} MB JSONL, {len(texts)} documents; tokenizer: BPE vocab {vocab}")
    print(
        "\n| tokenisation | tokens/s wall | per worker vs `encode_batch` | vs `encode_batch_fast` "
        "| tokens per CPU-s | vs `encode_batch` | vs `encode_batch_fast` |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    names = {"bare": "bare `encode_batch` loop, 1 thread", "bare_fast": "bare `encode_batch_fast` loop, 1 thread"}
    names.update({f"w{w}": f"`myllm data tokenize`, {w} worker{'s' if w > 1 else ''}" for w in (1, 2)})
    for key, label in names.items():
        w = int(key[1:]) if key.startswith("w") else 1
        r, c = med[key], cmed[key]
        print(
            f"| {label} | {r:,.0f} | {r / w / med['bare']:.2f} | {r / w / med['bare_fast']:.2f} | {c:,.0f} "
            f"| {c / cmed['bare']:.2f} | {c / cmed['bare_fast']:.2f} |"
        )
    print(f"\n| reading, seq_len {T} | windows/s | vs training |")
    print("| --- | --- | --- |")
    print(f"| training step (Llama h256 x4 layers, batch 8, fwd+bwd+AdamW) | {train:,.1f} | 1.0 |")
    print(f"| `ShardSource`, in-process | {reader0:,.0f} | {reader0 / train:,.0f}x |")
    print(f"| `ShardSource`, 2 DataLoader workers | {reader2:,.0f} | {reader2 / train:,.0f}x |")


if __name__ == "__main__":
    main()
