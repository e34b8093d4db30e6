"""``myllm`` command line: one sub-command per module in :mod:`myllm.commands`.

Each command module exposes ``add_parser(subparsers)``, which adds its sub-parser and sets
``func(args) -> int`` as the handler. Heavy imports happen inside the handlers, so ``myllm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command modules under myllm.commands, in the order `myllm --help` lists them.
COMMANDS: tuple[str, ...] = ("demo", "data", "tokenizer", "surgery", "train", "eval", "generate", "plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="myllm", description="Model surgery for decoder-only LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"myllm.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # user errors: one clear line, no traceback
        print(f"myllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
