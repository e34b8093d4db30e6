"""Prepare the data of the DeepSpeed example and print the ``myllm train`` overrides that point run.yaml at it.

    python examples/deepspeed/prepare.py --out runs/examples/deepspeed [--quick]

Builds the stdlib corpus, tokenizer and token shards under ``OUT/data`` (once; reused after) and prints one ``--set`` option
and its value per line (launch.sh passes them on). ``--quick`` adds the overrides of the CPU test: a tiny model,
3 steps, no checkpoints. Progress messages go to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parse_args, prepare_data  # noqa: E402

from myllm.data import load_tokenizer  # noqa: E402

QUICK = {
    "model.config.hidden_size": 32,
    "model.config.intermediate_size": 96,
    "model.config.num_hidden_layers": 2,
    "model.config.num_attention_heads": 4,
    "model.config.num_key_value_heads": 2,
    "data.seq_len": 64,
    "train.max_steps": 3,
    "train.micro_batch_size": 4,
    "schedule.warmup_steps": 1,
    "checkpoint.every": "null",
    "logging.every": 1,
    "logging.progress": "false",
}


def overrides(out: Path, *, quick: bool) -> dict[str, object]:
    """``myllm train`` overrides (``key.path -> value``) that run run.yaml on the data under ``out/data`` (built
    here when missing)."""
    out = Path(out).resolve()
    with contextlib.redirect_stdout(sys.stderr):
        data = prepare_data(out, quick=quick)
    return {
        "output_dir": out,
        "data.path": data.shards,
        "model.tokenizer": data.tokenizer,
        "model.config.vocab_size": len(load_tokenizer(data.tokenizer)),
        **(QUICK if quick else {}),
    }


def main() -> None:
    args = parse_args(__doc__, default_out="runs/examples/deepspeed")
    for key, value in overrides(Path(args.out), quick=args.quick).items():
        print("--set")
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
