"""``myllm demo [--quick] [--out runs/demo]``: the whole library in one command (see :mod:`myllm.demo`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a tokenizer and a small model on stdlib docstrings, upcycle it to MoE, compare, report",
        description="Build a corpus from the Python standard library's docstrings (no download), train a BPE "
        "tokenizer, pretrain a small dense MyLLM, upcycle it to a mixture of experts (logits unchanged), continue "
        "training both, compare held-out perplexity, reload the MoE with transformers and generate. Writes "
        "report.md, results.json and PNG plots into --out. About 10 minutes on 2 CPU cores; --quick: 1-2.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (what CI runs)")
    p.add_argument("--out", default="runs/demo", help="output directory (new, empty or a previous demo run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle cores)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the preset's pretraining steps")
    p.add_argument("--continue-steps", type=int, default=None, help="override the preset's continued steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from myllm.demo import FULL, QUICK, check_out_dir, run_demo

    check_out_dir(args.out)  # a bad --out fails before the heavy imports and any work
    preset = (QUICK if args.quick else FULL).with_steps(args.pretrain_steps, args.continue_steps)
    run_demo(args.out, preset=preset, threads=args.threads, progress=not args.no_progress)
    return 0
