"""``myllm plot RUN_DIR``: loss curves, expert load per layer and perplexity bars of a run, as PNG files."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="plot a run directory (needs matplotlib)",
        description="Draws loss.png from every metrics.jsonl under RUN_DIR, expert_load.png "
        "from expert_load.json and ppl.png from ppl.json, whichever the run directory holds.",
    )
    p.add_argument("run_dir")
    p.add_argument("-o", "--out-dir", help="where the PNG files go (default: RUN_DIR)")
    p.add_argument("--key", default="loss", help="metric drawn as loss curves (e.g. ce: without MoE balancing)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from myllm.plots import PlotDependencyError, plot_run

    try:
        written = plot_run(args.run_dir, args.out_dir, key=args.key)
    except PlotDependencyError as exc:
        print(f"myllm plot: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
