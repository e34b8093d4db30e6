"""``myllm tokenizer``: train a byte-level BPE tokenizer (ChatML special tokens), inspect a tokenizer directory."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer")
    cmds = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = cmds.add_parser("train", help="train a byte-level BPE tokenizer into a HF tokenizer directory")
    t.add_argument("inputs", nargs="+", help="JSONL (--field) or plain-text files")
    t.add_argument("-o", "--output", required=True, help="tokenizer directory")
    t.add_argument("--vocab-size", type=int, default=6400)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--field", default="text")
    t.set_defaults(func=run_train)

    i = cmds.add_parser("info", help="load a tokenizer directory and print its special tokens and fingerprint")
    i.add_argument("path")
    i.set_defaults(func=run_info)


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from myllm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [Path(p) for p in args.inputs],
        args.output,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        field=args.field,
    )
    print(
        f"wrote {args.output}: vocab {len(tok)}, eos {tok.eos_token!r}, pad {tok.pad_token!r}, bos {tok.bos_token!r}"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from myllm.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(args.path)
    info = {
        "class": type(tok).__name__,
        "vocab": len(tok),
        "special_tokens": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "chat_template": bool(tok.chat_template),
        "fingerprint": tokenizer_fingerprint(tok),
    }
    print(json.dumps(info, indent=1))
    return 0
