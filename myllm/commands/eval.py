"""``myllm eval ppl MODEL [MODEL ...] DATA``: held-out perplexity and bits-per-byte of one or more models."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models (perplexity, bits-per-byte)")
    cmds = p.add_subparsers(dest="eval_command", metavar="ACTION", required=True)

    q = cmds.add_parser(
        "ppl",
        help="token perplexity (sliding windows) and bits-per-byte on held-out JSONL",
        description="Token-level perplexity with strided sliding windows (HF's convention: NLL summed over the "
        "scored tokens, exponentiated once) and tokenizer-independent bits-per-byte. Several models may be "
        "given; the last positional argument is the data file.",
    )
    q.add_argument("paths", nargs="+", metavar="MODEL... DATA", help="model directories, then a JSONL file")
    q.add_argument("--tokenizer", help="tokenizer directory (default: each model's own)")
    q.add_argument("--field", default="text", help="JSONL field holding the text")
    q.add_argument("--max-length", type=int, default=None, help="tokens per window (default: model's, <= 1024)")
    q.add_argument("--stride", type=int, default=None, help="window step (default: max length, no overlap)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--limit", type=int, default=None, help="first N documents only")
    q.add_argument("--add-bos", action="store_true", help="condition each document on the bos token")
    q.add_argument("--add-eos", action="store_true", help="append and score the eos token")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    q.add_argument("-o", "--output", help="write the results as JSON ({model: result})")
    q.add_argument("--plot", help="write a PNG comparing the models (needs matplotlib)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from myllm.data.io import ensure_writable_dir, write_json_atomic
    from myllm.eval import JsonlTexts, perplexity
    from myllm.loading import check_model_dir, load_model_and_tokenizer

    if len(args.paths) < 2:
        raise ValueError("give at least one MODEL directory and the DATA file")
    *models, data = args.paths
    labels = _labels(models)
    # every input and output is checked before the first model is loaded
    for m in models:
        check_model_dir(m)
    texts = JsonlTexts(data, args.field, limit=args.limit)
    for out in (args.output, args.plot):
        if out:
            ensure_writable_dir(Path(out).parent)
    if args.plot:
        from myllm.plots import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as exc:
            print(f"myllm eval: error: {exc}", file=sys.stderr)
            return 2

    results = {}
    for label, path in zip(labels, models, strict=True):
        model, tok = load_model_and_tokenizer(path, args.tokenizer, dtype=args.dtype, device=args.device)
        results[label] = {
            "model": str(path),
            "data": str(data),
            **perplexity(
                model,
                tok,
                texts,
                max_length=args.max_length,
                stride=args.stride,
                batch_size=args.batch_size,
                add_bos=args.add_bos,
                add_eos=args.add_eos,
                progress=not args.no_progress,
            ),
        }
        del model
    width = max(len(label) for label in results)
    print(f"{'model':{width}s}  {'ppl':>10s}  {'bits/byte':>9s}  {'tokens':>8s}  {'bytes':>9s}")
    for label, r in results.items():
        print(f"{label:{width}s}  {r['ppl']:10.3f}  {r['bits_per_byte']:9.4f}  {r['tokens']:8d}  {r['bytes']:9d}")
    if args.output:
        write_json_atomic(args.output, results)
    if args.plot:
        from myllm.plots import plot_perplexity_bars

        plot_perplexity_bars(results, args.plot, title=f"held-out evaluation ({Path(data).name})")
    if not args.output:
        print(json.dumps(results, indent=1))
    return 0


def _labels(models: list[str]) -> list[str]:
    """Short unique labels: the directory names, or the full paths when two names collide."""
    from pathlib import Path

    names = [Path(m).name or str(m) for m in models]
    return names if len(set(names)) == len(names) else [str(m) for m in models]
