"""``myllm demo``: the main job on bundled data (see README)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a tiny model from registry blocks, swap a block and run it")
    p.add_argument("--quick", action="store_true", help="the short form CI runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from myllm import blocks

    torch.manual_seed(0)
    print("registered blocks:")
    for kind in blocks.KINDS:
        print(f"  {kind:9s} {', '.join(blocks.available(kind))}")
    sdpa = blocks.build("attention", "sdpa", hidden_size=64, num_heads=4, num_kv_heads=2)
    eager = blocks.build("attention", "eager", hidden_size=64, num_heads=4, num_kv_heads=2)
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 16, 64)
    diff = (sdpa(x)[0] - eager(x)[0]).abs().max().item()
    print(f"sdpa -> eager swap with the same weights: max |diff| = {diff:.2e}")
    return 0
