"""The training loop (torch engine) against a bare hand-written loop: tokens/s on the same model and batches.

One process. Both start from the same weights and see the same packed windows (``input_ids``, ``labels``,
``position_ids``; batch ``B x T``): the bare loop is ``loss = model(**batch).loss; loss.backward();
opt.step(); opt.zero_grad()`` with the same AdamW, the loop is ``Trainer.fit`` (collating windows, counting
target tokens, the objective, the engine, metrics every step, the progress bar off). Measurements are
interleaved (the order flips every repeat), ``--steps`` optimizer steps per measurement, medians. Overhead =
1 - loop / bare (target <= 5%). Wall-clock and process CPU time are both reported (the machine is shared).

Two loop variants: ``loop`` with ``grad_clip: null`` (the same arithmetic as the bare loop) and ``loop+clip``
with the default clipping at 1.0 (one extra gradient-norm pass).

    python bench/bench_train.py --threads 1          # Llama h256 x 4 layers, 8 x 256 tokens, 5 steps x 5 repeats
    python bench/bench_train.py --quick --threads 1  # smaller and shorter
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from bench_model import timed  # (wall, CPU) seconds of one call; bench/ is on sys.path when run as a script

from myllm.data import train_tokenizer
from myllm.train import Trainer, parse_config
from myllm.train.data import PackedExamples, collate


def make_model_dir(root: Path, args: argparse.Namespace) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    return root / "model"


def make_source(args: argparse.Namespace) -> Callable[[], PackedExamples]:
    rng = random.Random(0)
    docs = [[rng.randrange(3, args.vocab) for _ in range(rng.randint(20, 400))] for _ in range(2000)]
    examples = [(d, d) for d in docs]
    return lambda: PackedExamples(examples, seq_len=args.seq, pad_id=0, seed=0)


def make_trainer(root: Path, model_dir: Path, tok_dir: Path, source: PackedExamples, args, clip: float | None):
    cfg = parse_config(
        {
            "output_dir": str(root / f"run-{clip}"),
            "model": {"path": str(model_dir), "tokenizer": str(tok_dir)},
            "data": {"path": "unused", "seq_len": args.seq},
            "train": {"max_steps": 10**6, "micro_batch_size": args.batch, "grad_clip": clip},
            "optimizer": {"lr": 1e-4, "weight_decay": 0.1},
            "schedule": {"kind": "constant"},
            "engine": {"device": args.device},
            "checkpoint": {"resume": "never", "save_final": False},
            "logging": {"every": 1, "progress": False},
        }
    )
    return Trainer(cfg, source=source)


def bare_loop(model_dir: Path, source: PackedExamples, args: argparse.Namespace) -> Callable[[], None]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(args.device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95)
    )
    windows = iter(source)
    batches = [
        {k: v.to(args.device) for k, v in collate([next(windows) for _ in range(args.batch)], 0).items()}
        for _ in range(64)
    ]
    state = {"i": 0}

    def steps() -> None:
        for _ in range(args.steps):
            batch = batches[state["i"] % len(batches)]
            state["i"] += 1
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, 4 x 128 tokens, 3 repeats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per measurement")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.hidden = args.hidden or (128 if args.quick else 256)
    args.layers = args.layers or (2 if args.quick else 4)
    args.batch = args.batch or (4 if args.quick else 8)
    args.seq = args.seq or (128 if args.quick else 256)
    args.repeats = args.repeats or (3 if args.quick else 5)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(root, args)
        tok_dir = root / "tok"
        train_tokenizer([f"sample text {i}" for i in range(200)], tok_dir, vocab_size=300, min_frequency=1)
        source = make_source(args)
        runs: dict[str, Callable[[], None]] = {"bare": bare_loop(model_dir, source(), args)}
        for name, clip in (("loop", None), ("loop+clip", 1.0)):
            trainer = make_trainer(root, model_dir, tok_dir, source(), args, clip)
            runs[name] = lambda t=trainer: t.fit(steps=args.steps)
        tokens = args.steps * args.batch * args.seq
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__},"
            f" threads {torch.get_num_threads()}, device {args.device}"
        )
        print(
            f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x "
            f"{args.seq}, {args.steps} steps per measurement, {args.repeats} repeats; load before: "
            f"{os.getloadavg()[0]:.2f}"
        )
        names = list(runs)
        for name in names:  # warm-up
            runs[name]()
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for rep in range(args.repeats):
            for name in names if rep % 2 == 0 else list(reversed(names)):
                times[name].append(timed(runs[name], args.device))
        med = {n: [statistics.median(t[i] for t in ts) for i in range(2)] for n, ts in times.items()}
        print(f"{'run':10s} {'clock':5s} {'tokens/s':>10s} {'vs bare':>8s} {'overhead':>9s}")
        for name in names:
            for i, clock in enumerate(("wall", "cpu")):
                rate, base = tokens / med[name][i], tokens / med["bare"][i]
                print(f"{name:10s} {clock:5s} {rate:10.1f} {rate / base:8.3f} {100 * (1 - rate / base):8.1f}%")
        print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
