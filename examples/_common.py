"""Shared set-up of the example scripts: a corpus and a tokenizer built from the Python standard library
(no download), chat data for SFT, and command-line options.

Every example runs as ``python examples/<name>.py [--quick] [--out DIR]``; ``--quick`` is the seconds-long form
that tests/examples runs. Nothing here is part of the library: it is the glue an example needs.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# `python examples/x.py` from a checkout: make the checkout's myllm importable without installing it
_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "myllm").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from myllm.data import build_corpus, load_tokenizer, tokenize_to_shards, train_tokenizer  # noqa: E402
from myllm.data.corpus import stdlib_root, stdlib_source_files  # noqa: E402
from myllm.train.data import IGNORE, chat_examples, collate, pad_id  # noqa: E402


def parse_args(description: str, *, default_out: str, base: bool = False) -> argparse.Namespace:
    """``--quick`` (tiny sizes, a few steps: what the tests run) and ``--out DIR``; with ``base``, also
    ``--base DIR``: a pretrained model directory with its tokenizer (e.g. ``pretrain.py``'s ``final/``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (seconds)")
    p.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    if base:
        p.add_argument(
            "--base",
            default=None,
            help="pretrained model directory with its tokenizer (default: pretrain a small one here first)",
        )
    args = p.parse_args()
    if base and args.base is not None:
        missing = [f for f in ("config.json", "tokenizer_config.json") if not (Path(args.base) / f).is_file()]
        if missing:  # checked before any data is built
            p.error(f"--base {args.base}: not a model directory with its tokenizer (no {', '.join(missing)})")
    return args


@dataclass
class Data:
    """Paths of the example data: JSONL splits (``{"text": ...}``), the training split tokenised into shards
    (``myllm.data.tokenize_to_shards``: what pretraining reads), chat JSONL, and a tokenizer directory."""

    train: Path
    shards: Path
    heldout: Path
    tokenizer: Path
    chat_train: Path
    chat_heldout: Path


def prepare_data(out: Path, *, quick: bool, vocab_size: int | None = None) -> Data:
    """Corpus, tokenizer and chat data under ``out/data`` (built once; reused when already there).

    The quick form reads only the ``email`` and ``json`` packages' docstrings; the full form the whole stdlib.
    """
    data = out / "data"
    tok_dir = data / "tokenizer"
    train, heldout = data / "train.jsonl", data / "heldout.jsonl"
    chat_train, chat_heldout = data / "chat_train.jsonl", data / "chat_heldout.jsonl"
    if not (train.is_file() and tok_dir.is_dir() and chat_train.is_file()):
        root = stdlib_root() / "email" if quick else None
        build_corpus(data, root=root, heldout_fraction=0.1)
        train_tokenizer([train], tok_dir, vocab_size=vocab_size or (384 if quick else 2048))
        write_chat_data(chat_train, chat_heldout, packages=("email", "json") if quick else None)
    shards = data / "shards"  # tokenised once; a rerun of the same plan finds the shards done
    tokenize_to_shards([train], shards, tok_dir, progress=False)
    return Data(train, shards, heldout, tok_dir, chat_train, chat_heldout)


def qa_pairs(packages: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs from the stdlib: "What does ``json.dumps`` do?" -> the first line of its
    docstring. Only public functions with a docstring whose first line is a sentence."""
    root = stdlib_root()
    if packages is None:
        files = stdlib_source_files(root)
    else:
        files = [f for pkg in packages for f in (stdlib_source_files(root / pkg) if (root / pkg).is_dir() else [])]
    pairs = []
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        functions = [(f"{module}.{n.name}", n) for n in tree.body if isinstance(n, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")):
            functions += [(f"{module}.{cls.name}.{n.name}", n) for n in cls.body if isinstance(n, ast.FunctionDef)]
        for name, node in functions:
            doc = ast.get_docstring(node)
            first = doc.strip().splitlines()[0].strip() if doc else ""
            if not node.name.startswith("_") and 12 <= len(first) <= 160 and first.endswith("."):
                pairs.append((f"What does {name} do?", first))
    return pairs


def write_chat_data(train: Path, heldout: Path, *, packages: tuple[str, ...] | None) -> None:
    """Chat JSONL (``{"conversations": [{"role", "content"}, ...]}``) of :func:`qa_pairs`, 10% held out."""
    pairs = qa_pairs(packages)
    random.Random(0).shuffle(pairs)
    cut = max(1, len(pairs) // 10)
    for path, part in ((heldout, pairs[:cut]), (train, pairs[cut:])):
        with open(path, "w", encoding="utf-8") as f:
            for q, a in part:
                conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")


def myllm_config(vocab_size: int, *, quick: bool, **overrides: object) -> dict:
    """An inline ``myllm`` model config for the training loop (``model: {config: ...}``)."""
    sizes = (
        dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if quick
        else dict(
            hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
        )
    )
    return {
        "model_type": "myllm",
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        **sizes,
        **overrides,
    }


def heldout_texts(data: Data, quick: bool) -> list[str]:
    """The held-out documents (the first 40 in the quick form)."""
    texts = [json.loads(line)["text"] for line in data.heldout.read_text(encoding="utf-8").splitlines() if line]
    return texts[:40] if quick else texts


def run_config(
    out: Path,
    data: Data,
    *,
    quick: bool,
    model: dict,
    steps: int,
    lr: float = 3e-3,
    seq_len: int | None = None,
    shards: bool = False,
) -> dict:
    """A run-config dict (``myllm.train``) with the examples' shared settings: CPU, cosine schedule with warmup,
    text data from ``data`` (``shards``: the pre-tokenised shards, for models that use the examples' tokenizer;
    else the JSONL, tokenised by the model's own tokenizer), no progress bar in the quick form. Sections are plain
    dicts, so a script updates them before ``parse_config``/``train``."""
    text = {"kind": "shards", "path": str(data.shards)} if shards else {"kind": "jsonl", "path": str(data.train)}
    return {
        "output_dir": str(out),
        "model": model,
        "data": {**text, "seq_len": seq_len or (64 if quick else 128)},
        "optimizer": {"lr": lr, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1},
        "engine": {"kind": "torch", "device": "cpu"},
        "train": {"max_steps": steps, "micro_batch_size": 8 if quick else 16, "grad_accum": 1, "seed": 0},
        "logging": {"every": 1, "progress": not quick},
    }


def pretrained_base(args: argparse.Namespace, data: Data) -> Path:
    """``--base`` if given, else a small dense MyLLM pretrained here (``out/base/final``, reused when there)."""
    if args.base is not None:
        return Path(args.base)
    from myllm.train import parse_config, train

    out = Path(args.out) / "base"
    if (out / "final" / "config.json").is_file():
        return out / "final"
    vocab = len(load_tokenizer(data.tokenizer))
    model = {"config": myllm_config(vocab, quick=args.quick), "tokenizer": str(data.tokenizer)}
    steps = 40 if args.quick else 300
    print(f"pretraining a base model first ({steps} steps; pass --base DIR to use your own)")
    result = train(parse_config(run_config(out, data, quick=args.quick, model=model, steps=steps, shards=True)))
    return result.final_dir


def write_results(out: Path, results: dict) -> Path:
    """Write ``out/results.json`` (what the tests check) and print it."""
    path = Path(out) / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"results written to {path}")
    return path


def read_chats(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a chat JSONL file."""
    return [json.loads(line)["conversations"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


@torch.no_grad()
def answer_loss(model: torch.nn.Module, tokenizer, convs: list[list[dict[str, str]]], batch_size: int = 32) -> float:
    """Mean cross-entropy (nats) over the assistant tokens of ``convs``, rendered and masked as SFT trains them
    (``myllm.train.data.chat_examples``: the tokenizer's chat template, ChatML by default)."""
    examples = chat_examples(tokenizer, convs, None)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        windows = [
            {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.arange(len(ids))}
            for ids, labels in examples[i : i + batch_size]
        ]
        batch = collate(windows, pad_id(tokenizer))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"
        )
        total += float(nll)
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    return total / count
