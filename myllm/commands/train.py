"""``myllm train CONFIG``: run a training job described by a YAML/JSON run config (see myllm.train.config)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain, SFT or distil a model from a run config (YAML/JSON)",
        description="Train from a run config. Launch under torchrun or deepspeed for multi-process DeepSpeed runs.",
    )
    p.add_argument("config", help="run config file (.yaml, .yml or .json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=100 (repeatable; values parsed as YAML)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from myllm.train import train

    result = train(args.config, overrides=args.overrides)
    if result.rank != 0:  # under torchrun / deepspeed only the first process reports
        return 0
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    if result.adapter_dir is not None:
        print(f"LoRA adapter: {result.adapter_dir}")
    print(f"metrics: {result.metrics_file} ({result.step} steps)")
    return 0
