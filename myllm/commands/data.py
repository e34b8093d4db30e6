"""``myllm data``: build the stdlib corpus, clean JSONL, tokenise into shards, verify shards."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="corpus, cleaning, tokenised shards")
    cmds = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = cmds.add_parser("corpus", help="write train/held-out JSONL of the Python stdlib's docstrings")
    c.add_argument("out_dir")
    c.add_argument("--heldout-fraction", type=float, default=0.05)
    c.add_argument("--min-chars", type=int, default=40)
    c.set_defaults(func=run_corpus)

    k = cmds.add_parser("clean", help="normalise, filter and deduplicate JSONL (streaming)")
    k.add_argument("inputs", nargs="+", help="JSONL files")
    k.add_argument("-o", "--output", required=True, help="cleaned JSONL file")
    k.add_argument("--report", help="JSON report path (default: OUTPUT.report.json)")
    k.add_argument("--field", default="text")
    k.add_argument("--normalize", default="NFKC", help="NFC, NFKC, NFD, NFKD or none")
    k.add_argument("--min-chars", type=int, default=20)
    k.add_argument("--max-chars", type=int, default=None)
    k.add_argument("--min-alpha-ratio", type=float, default=0.25)
    k.add_argument("--max-digit-ratio", type=float, default=0.5)
    k.add_argument("--no-exact-dedup", action="store_true")
    k.add_argument("--no-near-dedup", action="store_true")
    k.add_argument("--near-threshold", type=float, default=0.8)
    k.add_argument("--num-perm", type=int, default=128)
    k.add_argument("--ngram", type=int, default=5, help="characters per MinHash shingle")
    k.add_argument("--strict", action="store_true", help="fail on the first malformed line")
    k.set_defaults(func=run_clean)

    t = cmds.add_parser("tokenize", help="tokenise JSONL / text files and directories into shards")
    t.add_argument("inputs", nargs="+", help="JSONL or text files, or directories of them")
    t.add_argument("-o", "--output", required=True, help="shard directory")
    t.add_argument("--tokenizer", required=True, help="local HF tokenizer directory")
    t.add_argument("--field", default="text", help="JSONL field with the text")
    t.add_argument("--format", dest="fmt", default="auto", choices=("auto", "jsonl", "text"))
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--shard-mb", type=float, default=64.0, help="input megabytes per shard")
    t.add_argument("--no-eos", action="store_true", help="do not end documents with eos")
    t.add_argument("--add-bos", action="store_true", help="start documents with bos")
    t.add_argument("--parse-special", action="store_true", help="special-token strings in text become special tokens")
    t.add_argument("--overwrite", action="store_true", help="replace shards of other inputs in OUTPUT")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_tokenize)

    v = cmds.add_parser("verify", help="check shard directories before training")
    v.add_argument("dirs", nargs="+")
    v.add_argument("--tokenizer", help="tokenizer directory whose fingerprint must match")
    v.add_argument("--full", action="store_true", help="hash all tokens and check every id")
    v.set_defaults(func=run_verify)


def run_corpus(args: argparse.Namespace) -> int:
    from myllm.data.corpus import build_corpus

    stats = build_corpus(args.out_dir, heldout_fraction=args.heldout_fraction, min_chars=args.min_chars)
    print(json.dumps(stats.as_dict(), indent=1))
    return 0


def run_clean(args: argparse.Namespace) -> int:
    from myllm.data.clean import CleanConfig, clean_jsonl

    cfg = CleanConfig(
        field=args.field,
        normalize=None if args.normalize.lower() == "none" else args.normalize.upper(),
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        min_alpha_ratio=args.min_alpha_ratio,
        max_digit_ratio=args.max_digit_ratio,
        exact_dedup=not args.no_exact_dedup,
        near_dedup=not args.no_near_dedup,
        near_threshold=args.near_threshold,
        num_perm=args.num_perm,
        ngram=args.ngram,
        strict=args.strict,
    )
    report = clean_jsonl(args.inputs, args.output, cfg, report_path=args.report)
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items() if v) or "nothing"
    print(f"read {report['read']}, kept {report['kept']}, dropped: {dropped} ({report['seconds']} s)")
    for bad in report["bad_lines"][:10]:
        print(f"  {bad['file']}:{bad['line']}: {bad['error']}")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    from myllm.data.tokenize import tokenize_to_shards

    summary = tokenize_to_shards(
        args.inputs,
        args.output,
        args.tokenizer,
        field=args.field,
        fmt=args.fmt,
        workers=args.workers,
        shard_bytes=max(1, int(args.shard_mb * 2**20)),
        append_eos=not args.no_eos,
        add_bos=args.add_bos,
        parse_special=args.parse_special,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=1))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from myllm.data.shards import verify_shards

    for d in args.dirs:
        index = verify_shards(d, tokenizer=args.tokenizer, full=args.full)
        print(f"{d}: ok: {index['n_docs']} documents, {index['n_tokens']} tokens in {len(index['shards'])} shards")
    return 0
